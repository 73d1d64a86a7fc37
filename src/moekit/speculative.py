"""Speculative decoding for one sequence: a draft model, or draft-free n-gram (prompt-lookup) proposals.

    from moekit.speculative import speculative_generate
    new_ids, stats = speculative_generate(target, prompt_ids, max_new_tokens=64, draft=small_model, gamma=4)
    new_ids, stats = speculative_generate(target, prompt_ids, max_new_tokens=64, ngram=3)
    stats.acceptance_rate, stats.tokens_per_pass

Batch 1: `prompt_ids` is one list of token ids (the engine that batches requests is elsewhere).
Each round proposes up to `gamma` tokens, then the target scores them all in ONE forward:

  draft (a model over the same vocabulary): x_i ~ q_i, drawn one token at a time from the
      draft's filtered distribution q_i (temperature, top-k, top-p applied exactly as for p).
  ngram: the tokens that followed the most recent earlier occurrence of the context's last
      n tokens (n = ngram, then n-1, ..., 1; nothing found = no proposal this round). The
      proposal is deterministic, i.e. q_i is a point mass on x_i.

Verification (Leviathan et al.; docs/formulas.md), with p_i the target's filtered distribution at the
same position: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); at the first rejection
draw the round's last token from normalize(max(0, p_i - q_i)) and drop the rest; when all are
accepted draw a bonus token from p_{g+1}. Each round therefore emits accepted + 1 tokens, and
every emitted token is distributed exactly as a draw from the target's sampling distribution
(softmax(top_p(top_k(logits / temperature)))). With a point-mass q the rule is "accept with
probability p_i(x_i), else draw from p_i with x_i removed". temperature == 0 is greedy: a
proposal is accepted iff it is the target's argmax and the correction is the argmax, so the
output equals `generate(..., temperature=0)` token for token (up to float rounding between a
multi-token forward and one-token forwards deciding a near-tie).

KV caches: the target's cache holds every context token except the last (that one is fed
with the proposal, so one forward of 1 + g tokens scores g + 1 positions). Rejected positions
are "rolled back" by keeping the valid length and overwriting later: `Transformer.forward`
writes at `start` and attends only to slots < start + T. The draft's cache is tracked the same
way; after a round it is valid up to the first slot whose token changed, and the next round
first feeds the (one or two) context tokens it has not seen.

Stop tokens end the generation as in `generate` (the stop ids are not returned; tokens a round
produced after a stop are dropped). Stats: `proposed` / `accepted` draft tokens,
`acceptance_rate` = accepted / proposed, `target_forward_passes` = verification forwards (the
prompt prefill not counted; plain decoding needs one per token), `tokens_per_pass` =
(accepted + passes) / passes, `draft_forward_passes` (draft mode, its prompt prefill included).

The sampling distributions (`filtered_probs`), draws, parameter checks, stop and prompt
handling come from `moekit.sampling` (shared with `generate` and the engine).

Legend: V vocab, X positions scored in one round (g + 1), G proposed tokens (g <= gamma).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .sampling import (StopSpec, check_sampling, draw, ends_with_stop, filtered_probs, new_generator,
                       normalise_prompts, normalise_stops)


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


# ---------------------------------------------------------------------------- the acceptance rule
def verify(p_XV: torch.Tensor, proposal: Sequence[int], q_GV: Optional[torch.Tensor],
           generator: Optional[torch.Generator], greedy: bool = False) -> Tuple[List[int], int]:
    """The acceptance rule: (emitted tokens = accepted proposals + one drawn token, number accepted).

    p_XV: target distributions at the G + 1 positions (row i scores proposal[i]; row G the bonus).
    q_GV: the distributions the proposals were drawn from; None = point masses (n-gram).
    greedy: p is one-hot (temperature 0): accept while the proposal is the argmax, no randomness.
    """
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


# ---------------------------------------------------------------------------- generation
def _check_model_pair(target, draft, need: int) -> None:
    for name, model in (("target", target), ("draft", draft)):
        if model is None:
            continue
        if need > model.cfg.max_seq_len:
            raise ValueError(f"prompt + max_new_tokens = {need} tokens exceeds the {name} model's "
                             f"max_seq_len={model.cfg.max_seq_len}")
    if draft is not None and draft.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"the draft model's vocab_size={draft.cfg.vocab_size} differs from the target's "
                         f"{target.cfg.vocab_size}; a draft must share the target's tokenizer")


def speculative_generate(target, prompt_ids, max_new_tokens: int, draft=None, gamma: int = 4,
                         ngram: Optional[int] = None, temperature: float = 0.0, top_k: Optional[int] = None,
                         top_p: Optional[float] = None, seed: Optional[int] = None, stop: StopSpec = None,
                         stream: Optional[Callable[[List[Optional[int]]], None]] = None
                         ) -> Tuple[List[int], SpeculativeStats]:
    """Generate up to `max_new_tokens` after `prompt_ids` (one list of ids) with speculative decoding.

    Give exactly one of `draft` (a Transformer over the same vocabulary) or `ngram` (n >= 1, the
    longest suffix matched for prompt lookup). gamma: tokens proposed per round (>= 1).
    temperature / top_k / top_p / seed / stop: as in `generate` (0 = greedy). stream: called with
    [token] for each new token. Returns (new token ids, SpeculativeStats); see the module docstring.
    """
    if (draft is None) == (ngram is None):
        raise ValueError("speculative_generate needs exactly one proposer: draft=MODEL or ngram=N")
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma < 1:
        raise ValueError(f"gamma must be an integer >= 1, got {gamma!r}")
    if ngram is not None and (isinstance(ngram, bool) or not isinstance(ngram, int) or ngram < 1):
        raise ValueError(f"ngram must be an integer >= 1, got {ngram!r}")
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, Sequence) and prompt_ids and not isinstance(prompt_ids[0], (int, torch.Tensor)):
        raise ValueError("speculative_generate decodes one sequence: pass prompt_ids as one list of token ids")
    prompt = normalise_prompts([prompt_ids], target.cfg.vocab_size)[0]
    check_sampling(max_new_tokens, temperature, top_k, top_p, seed=seed, max_tokens_name="max_new_tokens",
                   min_tokens=0)
    stops = normalise_stops(stop, None, target.cfg.vocab_size)
    _check_model_pair(target, draft, len(prompt) + max_new_tokens)
    stats = SpeculativeStats()
    if max_new_tokens == 0:
        return [], stats
    generator = new_generator(temperature, seed, target.embed.weight.device)
    models = [m for m in (target, draft) if m is not None]
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
        weight = model.embed.weight
        self.model, self.device = model, weight.device
        self.cache = model.new_cache(1, slots)
        self.length = 0

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
        q_GV = None
        if dft is not None:
            proposal, q_rows = [], []
            if g_max > 0:
                logits_V = dft.feed(context[dft.length:])[-1]  # the (one or two) tokens it has not seen
                stats.draft_forward_passes += 1
                for i in range(g_max):
                    q_V = filtered_probs(logits_V[None], temperature, top_k, top_p)[0]
                    x = int(q_V.argmax()) if greedy else int(draw(q_V, generator))
                    proposal.append(x)
                    q_rows.append(q_V)
                    if i < g_max - 1:
                        logits_V = dft.feed([x])[-1]
                        stats.draft_forward_passes += 1
                q_GV = torch.stack(q_rows).to(tgt.device)
        else:
            proposal = ngram_proposal(context, ngram, g_max)
        logits_XV = tgt.feed([context[-1]] + proposal)
        stats.target_forward_passes += 1
        p_XV = filtered_probs(logits_XV, temperature, top_k, top_p)
        emitted, n_accepted = verify(p_XV, proposal, q_GV, generator, greedy=greedy)
        stats.proposed += len(proposal)
        stats.accepted += n_accepted
        # roll back: the target keeps the context plus the accepted tokens (the emitted last one is fed
        # next round); the draft keeps its slots up to the first token that changed
        tgt.length -= len(proposal) - n_accepted
        if dft is not None:
            dft.length = min(dft.length, len(context) + n_accepted)
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
