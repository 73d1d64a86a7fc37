"""Speculative decoding for one sequence: a draft model, or draft-free n-gram (prompt-lookup) proposals.

    new_ids, stats = speculative_generate(target, prompt_ids, 64, draft=small_model, gamma=4)  # or ngram=3

Each round proposes up to `gamma` tokens, then the target scores them all in ONE forward. A draft
(same vocabulary) draws x_i from its filtered distribution q_i; ngram proposes the tokens that
followed the latest earlier occurrence of the context's last n tokens (n = ngram, ..., 1), a
point-mass q_i. Verification (Leviathan et al., docs/formulas.md) accepts x_i with probability
min(1, p_i(x_i) / q_i(x_i)), draws the round's last token from normalize(max(0, p_i - q_i)) at the
first rejection or from p_{g+1} when all are accepted, so every emitted token is distributed as
a draw from the target's sampling distribution p. temperature == 0 is greedy: the output equals
`generate(..., temperature=0)` (up to float rounding of near-ties).

KV caches: the target's holds every context token but the last (fed with the proposal: 1 + g
tokens score g + 1 positions). Rejected slots are rolled back by lowering the valid length; the
draft's is valid up to the first slot whose token changed. A model with recurrent layers (Gated
DeltaNet: state that a valid length cannot shorten) snapshots that state before each round and, on
a rejection, restores it and re-feeds the kept tokens with the next round's forward. Stops end the
generation as in `generate` (later tokens of the round are dropped).

Legend: V vocab, X positions scored in one round (g + 1), G proposed tokens (g <= gamma).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .sampling import (StopSpec, check_max_tokens, check_sampling, draw, ends_with_stop, filtered_probs,
                       new_generator, normalise_prompts, normalise_stops)


@dataclass
class SpeculativeStats:
    new_tokens: int = 0  # tokens returned
    proposed: int = 0  # draft / n-gram tokens proposed
    accepted: int = 0  # of those, accepted by the target
    target_forward_passes: int = 0  # verification forwards (prefill not counted)
    draft_forward_passes: int = 0  # draft forwards (prefill included); 0 for n-gram

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Tokens emitted per target verification forward (1.0 for plain decoding)."""
        passes = self.target_forward_passes
        return (self.accepted + passes) / passes if passes else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate, "tokens_per_pass": self.tokens_per_pass}


def verify(p_XV: torch.Tensor, proposal: Sequence[int], q_GV: Optional[torch.Tensor],
           generator: Optional[torch.Generator], greedy: bool = False) -> Tuple[List[int], int]:
    """The acceptance rule: (emitted tokens = accepted proposals + one drawn token, number accepted).
    p_XV: target distributions at the G + 1 positions (row i scores proposal[i]; row G the bonus);
    q_GV: the proposals' distributions, None = point masses (n-gram); greedy: p is one-hot."""
    G = len(proposal)
    if p_XV.shape[0] != G + 1 or (q_GV is not None and q_GV.shape[0] != G):
        raise ValueError(f"verify: {G} proposals need {G + 1} target rows and {G} draft rows, got "
                         f"{p_XV.shape[0]} and {None if q_GV is None else q_GV.shape[0]}")
    if greedy:
        best = p_XV.argmax(-1).tolist()
        n = 0
        while n < G and proposal[n] == best[n]:
            n += 1
        return list(proposal[:n]) + [best[n]], n
    n = G
    if G:
        x_G = torch.tensor(proposal, dtype=torch.long, device=p_XV.device)
        rows = torch.arange(G, device=p_XV.device)
        p_x = p_XV[rows, x_G]
        q_x = q_GV[rows, x_G] if q_GV is not None else torch.ones_like(p_x)
        u = torch.rand(G, generator=generator, device=p_XV.device, dtype=p_x.dtype)
        rejected = (u * q_x >= p_x).tolist()  # accept iff u < p/q (q_x > 0: x was drawn from q)
        n = rejected.index(True) if True in rejected else G
    if n == G:
        return list(proposal) + [int(draw(p_XV[G], generator))], G
    q_V = q_GV[n] if q_GV is not None else torch.zeros_like(p_XV[n]).index_fill_(0, x_G[n:n + 1], 1.0)
    residual_V = (p_XV[n] - q_V).clamp(min=0)
    if not residual_V.sum() > 0:  # p == q up to rounding: the residual is p itself
        residual_V = p_XV[n]
    return list(proposal[:n]) + [int(draw(residual_V, generator))], n


def ngram_proposal(context: Sequence[int], ngram: int, max_tokens: int) -> List[int]:
    """Up to `max_tokens` tokens that followed the latest earlier occurrence of the last n tokens."""
    L = len(context)
    if max_tokens <= 0:
        return []
    for n in range(min(ngram, L - 1), 0, -1):
        pattern = list(context[L - n:])
        for i in range(L - n - 1, -1, -1):  # occurrence context[i:i+n], strictly before the suffix
            if context[i] == pattern[0] and list(context[i:i + n]) == pattern:
                return list(context[i + n:i + n + max_tokens])
    return []


def speculative_generate(target, prompt_ids, max_new_tokens: int, draft=None, gamma: int = 4,
                         ngram: Optional[int] = None, temperature: float = 0.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None, seed: Optional[int] = None, stop: StopSpec = None,
                         stream: Optional[Callable[[List[Optional[int]]], None]] = None
                         ) -> Tuple[List[int], SpeculativeStats]:
    """Up to `max_new_tokens` new ids after `prompt_ids` (one list of ids) and SpeculativeStats.

    Give exactly one of `draft` (a Transformer over the same vocabulary) or `ngram` (the longest
    suffix matched). gamma: tokens proposed per round. temperature / top_k / top_p / seed / stop:
    as in `generate`. stream: called with [token] for each new token.
    """
    if (draft is None) == (ngram is None):
        raise ValueError("speculative_generate needs exactly one proposer: draft=MODEL or ngram=N")
    check_max_tokens(gamma, "gamma")
    if ngram is not None:
        check_max_tokens(ngram, "ngram")
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, Sequence) and prompt_ids and not isinstance(prompt_ids[0], (int, torch.Tensor)):
        raise ValueError("speculative_generate decodes one sequence: pass prompt_ids as one list of token ids")
    prompt = normalise_prompts([prompt_ids], target.cfg.vocab_size)[0]
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed=seed, max_tokens_name="max_new_tokens",
                   min_tokens=0)
    stops = normalise_stops(stop, None, target.cfg.vocab_size)
    models, need = [m for m in (target, draft) if m is not None], len(prompt) + max_new_tokens
    for name, model in zip(("target", "draft"), models):
        if need > model.cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {need} tokens exceeds the {name} model's "
                             f"max_seq_len={model.cfg.max_seq_len}")
    if draft is not None and draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"the draft model's vocab_size={draft.cfg.vocab_size} differs from the target's "
                         f"{target.cfg.vocab_size}; a draft must share the target's tokenizer")
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return [], stats
    generator = new_generator(temperature, seed, target.embed.weight.device)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            out = _speculative_loop(target, draft, prompt, max_new_tokens, gamma, ngram, temperature, top_k, top_p,
                                    generator, stops, stream, stats)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    stats.new_tokens = len(out)
    return out, stats


class _Cached:
    """A model with its KV cache and the number of valid cache slots."""

    def __init__(self, model, slots: int):
        self.model, self.device = model, model.embed.weight.device
        self.cache = model.new_cache(1, slots)
        self.length = 0
        self.recurrent = [layer for layer in self.cache.layers if hasattr(layer, "snapshot")]
        self.marked = None  # (length, recurrent states) at the round's start

    def mark(self) -> None:
        """Remember the recurrent state now (nothing to do for a cache of slots alone)."""
        if self.recurrent:
            self.marked = (self.length, [layer.snapshot() for layer in self.recurrent])

    def rollback(self, length: int) -> None:
        """Keep only the first `length` tokens: lower the valid length, or, with recurrent layers, go back
        to the mark (the caller feeds context[self.length:] again)."""
        if length >= self.length:
            return
        if not self.recurrent:
            self.length = length
            return
        self.length, states = self.marked
        assert self.length <= length, "internal: rollback past the mark"
        for layer, state in zip(self.recurrent, states):
            layer.restore(state)

    def feed(self, tokens: Sequence[int]) -> torch.Tensor:
        """Logits (T, V) after writing `tokens` at the end of the valid cache."""
        tokens_1T = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        logits = self.model(tokens_1T, cache=self.cache, start=self.length)[0]
        self.length += len(tokens)
        return logits


def _speculative_loop(target, draft, prompt, max_new_tokens, gamma, ngram, temperature, top_k, top_p, generator,
                      stops, stream, stats) -> List[int]:
    slots = len(prompt) + max_new_tokens
    greedy = temperature == 0.0
    tgt = _Cached(target, slots)
    if len(prompt) > 1:
        tgt.feed(prompt[:-1])  # prefill: every context token but the last
    dft = _Cached(draft, slots) if draft is not None else None
    context, out = list(prompt), []
    while len(out) < max_new_tokens:
        g_max = min(gamma, max_new_tokens - len(out) - 1)  # the round's last token is drawn from p
        if dft is not None:
            dft.mark()
            proposal, q_rows, feed = [], [], context[dft.length:]  # first the (one or two) tokens it has not seen
            for _ in range(g_max):
                logits_V = dft.feed(feed)[-1]
                stats.draft_forward_passes += 1
                q_V = filtered_probs(logits_V[None], temperature, top_k, top_p)[0]
                x = int(q_V.argmax()) if greedy else int(draw(q_V, generator))
                proposal.append(x)
                q_rows.append(q_V)
                feed = [x]
            q_GV = torch.stack(q_rows).to(tgt.device) if proposal else None
        else:
            proposal, q_GV = ngram_proposal(context, ngram, g_max), None
        tgt.mark()  # the target holds the context but its last token (more after a recurrent rollback)
        logits_XV = tgt.feed(context[tgt.length:] + proposal)[-(len(proposal) + 1):]
        stats.target_forward_passes += 1
        p_XV = filtered_probs(logits_XV, temperature, top_k, top_p)
        emitted, n_accepted = verify(p_XV, proposal, q_GV, generator, greedy=greedy)
        stats.proposed += len(proposal)
        stats.accepted += n_accepted
        # roll back: the target keeps the context plus the accepted tokens (the emitted last one is fed
        # next round); the draft keeps its slots up to the first token that changed
        tgt.rollback(tgt.length - (len(proposal) - n_accepted))
        if dft is not None:
            dft.rollback(min(dft.length, len(context) + n_accepted))
        for token in emitted:
            out.append(token)
            context.append(token)
            n_stop = ends_with_stop(out, stops) if stops else 0
            if n_stop:
                del out[-n_stop:]
                return out
            if stream is not None:
                stream([token])
    return out
