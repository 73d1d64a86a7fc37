"""Sampling in one place: logits processors, parameter checks, stop handling, prompt checks, shared
by `generate`, `speculative`, the engine (`choose_tokens`, `SamplingParams`) and the server.

Processors, in the order applied to a row of the last position's logits (float32):
  1. repetition penalty (CTRL / HF) over the prompt and generated tokens (`generate` and the engine,
     greedy mode included): a positive logit is divided by the penalty, a negative one multiplied by it;
  2. temperature == 0: greedy (argmax), the steps below are skipped;
  3. logits / temperature, then top-k (ties with the k-th kept), then top-p, then min-p (tokens
     with probability < min_p x the most likely one's are dropped; HF's MinPLogitsWarper, applied
     in the same order as HF) (`filter_logits`);
  4. a draw from the softmax (`draw`) with a `torch.Generator` (`new_generator`, seeded by `seed`).
`sample_next` is steps 2-4, `filtered_probs` the distribution steps 2-3 define. The checks raise
SamplingParamError, a ValueError whose `param` names the field, with one message for every
caller (the engine re-raises it as `ParamError`, the server answers 400 with it).

Legend: B batch rows, V vocab, R engine rows (requests with logits this step).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch

StopSpec = Optional[Union[int, Sequence[Union[int, Sequence[int]]]]]


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL penalty on tokens already seen: logit/penalty if positive, logit*penalty if not."""
    if penalty == 1.0:
        return logits_BV
    penalised_BV = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised_BV, logits_BV)


def apply_presence_frequency(logits_1V: torch.Tensor, out_ids: Sequence[int], presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties over the generated tokens: logit - presence * [count > 0] - frequency * count."""
    if not out_ids or (presence == 0 and frequency == 0):
        return logits_1V
    count_V = torch.bincount(torch.tensor(out_ids, device=logits_1V.device), minlength=logits_1V.shape[-1])
    count_V = count_V[:logits_1V.shape[-1]].to(logits_1V.dtype)
    return logits_1V - presence * (count_V > 0).to(logits_1V.dtype) - frequency * count_V


def apply_logit_bias(logits_1V: torch.Tensor, bias: Sequence[Tuple[int, float]]) -> torch.Tensor:
    """OpenAI's logit_bias: (token id, value) pairs added to the logits."""
    if not bias:
        return logits_1V
    ids, values = zip(*bias)
    out = logits_1V.clone()
    out[..., list(ids)] += torch.tensor(values, dtype=out.dtype, device=out.device)
    return out


def apply_temperature(logits_BV: torch.Tensor, temperature: float) -> torch.Tensor:
    """(logits - row max) / temperature (temperature > 0; 0 means greedy and is handled by the caller).
    The shift leaves the softmax unchanged and keeps a tiny temperature (1e-38) from overflowing to
    +inf, whose softmax would be NaN: the top token gets 0, the others at most 0."""
    return (logits_BV - logits_BV.max(dim=-1, keepdim=True).values) / temperature


def top_k_filter(logits_BV: torch.Tensor, top_k: Optional[int]) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th are kept); the rest -> -inf."""
    if top_k is None or top_k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, top_p: Optional[float]) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability is >= top_p
    (a token is dropped when the tokens ranked above it already reach top_p: at least one is kept)."""
    if top_p is None or top_p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = torch.softmax(sorted_BV, dim=-1)
    mass_before_BV = torch.cumsum(probs_BV, dim=-1) - probs_BV
    drop_sorted_BV = mass_before_BV >= top_p
    drop_sorted_BV[..., 0] = False  # the most likely token stays, even when top_p rounds to 0 in float32
    drop_BV = torch.zeros_like(drop_sorted_BV).scatter_(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def min_p_filter(logits_BV: torch.Tensor, min_p: Optional[float]) -> torch.Tensor:
    """Keep the tokens whose probability is >= min_p x the row's largest one (the top token always
    stays); the rest -> -inf. None or 0 = off."""
    if not min_p:
        return logits_BV
    probs_BV = torch.softmax(logits_BV, dim=-1)
    drop_BV = probs_BV < min_p * probs_BV.max(dim=-1, keepdim=True).values
    return logits_BV.masked_fill(drop_BV, float("-inf"))


def filter_logits(logits_BV: torch.Tensor, temperature: float, top_k: Optional[int],
                  top_p: Optional[float], min_p: Optional[float] = None) -> torch.Tensor:
    """Step 3 of the module docstring: temperature, then top-k, top-p and min-p (temperature > 0)."""
    return min_p_filter(top_p_filter(top_k_filter(apply_temperature(logits_BV, temperature), top_k), top_p), min_p)


def greedy(logits_BV: torch.Tensor) -> torch.Tensor:
    """The argmax of each row (B,) int64."""
    return torch.argmax(logits_BV, dim=-1)


def draw(probs_BV: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """One draw per row of `probs` ((B, V) -> (B,), (V,) -> a 0-d tensor), from `generator`."""
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator], min_p: Optional[float] = None) -> torch.Tensor:
    """One token per row (B,) int64: argmax when temperature == 0, else a filtered draw."""
    if temperature == 0.0:
        return greedy(logits_BV)
    return draw(torch.softmax(filter_logits(logits_BV, temperature, top_k, top_p, min_p), dim=-1), generator)


def filtered_probs(logits_XV: torch.Tensor, temperature: float, top_k: Optional[int],
                   top_p: Optional[float], min_p: Optional[float] = None) -> torch.Tensor:
    """The sampling distribution of each row (float32): the filters above, one-hot argmax when greedy."""
    logits_XV = logits_XV.float()
    if temperature == 0.0:
        return torch.zeros_like(logits_XV).scatter_(-1, logits_XV.argmax(-1, keepdim=True), 1.0)
    return torch.softmax(filter_logits(logits_XV, temperature, top_k, top_p, min_p), dim=-1)


def new_generator(temperature: float, seed: Optional[int], device) -> Optional[torch.Generator]:
    """The sampling generator (None when greedy); seed None draws one from torch's global RNG."""
    if temperature == 0:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
    return generator


def top_logprobs(logprobs_V: torch.Tensor, n: int) -> List[Tuple[int, float]]:
    """The n most likely (token, logprob) of one row of log-probabilities, most likely first."""
    values, ids = torch.topk(logprobs_V, n)
    return list(zip(ids.tolist(), values.tolist()))


def choose_tokens(logits_RV: torch.Tensor, seqs, argmax_G: Optional[torch.Tensor] = None
                  ) -> List[Tuple[int, Optional[float], Optional[list]]]:
    """The engine's per-row choice: (token, logprob or None, top (id, logprob) list or None) per row
    (the top list when params.top_logprobs > 0); seqs[r] has .params, .generator,
    .prompt and .out (the tokens so far, for the repetition penalty). Plain greedy rows take the argmax
    (batched; `argmax_G`, when given, is `greedy` of the first G rows, computed by the caller); the others go
    one at a time through the penalty and `sample_next` with the request's own generator, so a seeded request
    draws the same tokens alone, among others, or in `generate(model, [prompt], seed=s)`. Logprobs are under
    the raw logits."""
    R = logits_RV.shape[0]
    out: List[Optional[int]] = [None] * R
    greedy_rows = [r for r, s in enumerate(seqs) if s.params.plain_greedy]
    if len(greedy_rows) == R and argmax_G is not None and argmax_G.shape[0] == R:  # (computed already)
        out = argmax_G.tolist()
    elif len(greedy_rows) == R:  # (every row greedy, the common case: no gather)
        out = greedy(logits_RV).tolist()
    elif greedy_rows:
        rows_GV = logits_RV.index_select(0, torch.tensor(greedy_rows, device=logits_RV.device))
        for r, t in zip(greedy_rows, greedy(rows_GV).tolist()):
            out[r] = t
    for r in range(R):
        if out[r] is None:
            p = seqs[r].params
            logits_1V = logits_RV[r:r + 1].float()
            if p.repetition_penalty != 1:
                seen_1V = torch.zeros_like(logits_1V, dtype=torch.bool)
                seen_1V[0, torch.tensor(seqs[r].prompt + seqs[r].out, device=logits_1V.device)] = True
                logits_1V = apply_repetition_penalty(logits_1V, seen_1V, float(p.repetition_penalty))
            logits_1V = apply_presence_frequency(logits_1V, seqs[r].out, p.presence_penalty, p.frequency_penalty)
            logits_1V = apply_logit_bias(logits_1V, p.logit_bias)
            if len(seqs[r].out) < p.min_tokens:  # no end yet: the single-token stops (EOS included) are out
                ends = torch.tensor([s[0] for s in seqs[r].stops if len(s) == 1], dtype=torch.long,
                                    device=logits_1V.device)
                logits_1V = logits_1V.index_fill(-1, ends, float("-inf"))
            out[r] = int(sample_next(logits_1V, float(p.temperature), p.top_k, p.top_p, seqs[r].generator,
                                     p.min_p)[0])
    want = [r for r, s in enumerate(seqs) if s.params.logprobs]
    if not want:
        return [(token, None, None) for token in out]
    logprobs: List[Optional[float]] = [None] * R
    tops: List[Optional[list]] = [None] * R
    idx = torch.tensor(want, device=logits_RV.device)
    lp_RV = torch.log_softmax(logits_RV.index_select(0, idx).float(), dim=-1)
    for j, r in enumerate(want):
        logprobs[r] = float(lp_RV[j, out[r]])
        if seqs[r].params.top_logprobs:
            tops[r] = top_logprobs(lp_RV[j], seqs[r].params.top_logprobs)
    return list(zip(out, logprobs, tops))


class SamplingParamError(ValueError):
    """An invalid sampling parameter or input; `param` names the field."""

    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_max_tokens(value, name: str = "max_tokens", minimum: int = 1) -> None:
    """An integer >= minimum (generate allows 0 max_new_tokens; also speculative's gamma and ngram)."""
    if not _is_int(value) or value < minimum:
        raise SamplingParamError(f"{name} must be an integer >= {minimum}, got {value!r}", name)


def check_temperature(value, name: str = "temperature") -> None:
    """A finite number >= 0 (0 = greedy)."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise SamplingParamError(f"{name} must be a finite number >= 0 (0 = greedy), got {value!r}", name)


def check_top_k(value, name: str = "top_k") -> None:
    """None (off) or an integer >= 1."""
    if value is not None and (not _is_int(value) or value < 1):
        raise SamplingParamError(f"{name} must be an integer >= 1 (or unset), got {value!r}", name)


def check_top_p(value, name: str = "top_p") -> None:
    """None (off) or a number in (0, 1] (1 = off)."""
    if value is not None and (not _is_number(value) or not 0 < value <= 1):  # NaN fails 0 < value
        raise SamplingParamError(f"{name} must be a number in (0, 1] (or unset), got {value!r}", name)


def check_repetition_penalty(value, name: str = "repetition_penalty") -> None:
    """A finite number > 0 (1.0 = off)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise SamplingParamError(f"{name} must be a finite number > 0 (1.0 = off), got {value!r}", name)


def check_penalty(value, name: str) -> None:
    """presence_penalty / frequency_penalty: a number in [-2, 2] (OpenAI's range; 0 = off)."""
    if not _is_number(value) or not -2 <= value <= 2:
        raise SamplingParamError(f"{name} must be a number in [-2, 2], got {value!r}", name)


def check_logit_bias(bias, vocab_size: int, name: str = "logit_bias") -> None:
    """(token id, value) pairs with ids in [0, vocab_size) and values in [-100, 100] (OpenAI's range)."""
    for token, value in bias:
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise SamplingParamError(f"{name} has a token id {token!r} outside [0, {vocab_size})", name)
        if not _is_number(value) or not -100 <= value <= 100:
            raise SamplingParamError(f"{name} values must be in [-100, 100], got {value!r}", name)


def check_min_p(value, name: str = "min_p") -> None:
    """None (off) or a number in [0, 1] (0 = off)."""
    if value is not None and (not _is_number(value) or not 0 <= value <= 1):  # NaN fails 0 <= value
        raise SamplingParamError(f"{name} must be a number in [0, 1] (or unset), got {value!r}", name)


def check_seed(value, name: str = "seed") -> None:
    """None (a random seed) or an integer in torch.Generator's range [-2**63, 2**64)."""
    if value is not None and not _is_int(value):
        raise SamplingParamError(f"{name} must be an integer, got {value!r}", name)
    if value is not None and not -2**63 <= value < 2**64:
        raise SamplingParamError(f"{name} must be a 64-bit integer, got one of {len(str(value))} digits", name)


def check_sampling(max_tokens, temperature, top_k=None, top_p=None, repetition_penalty=1.0, seed=None, *,
                   max_tokens_name: str = "max_tokens", min_tokens: int = 1, min_p=None) -> None:
    """Every sampling field, in this order; raises SamplingParamError for the first invalid one."""
    check_max_tokens(max_tokens, max_tokens_name, min_tokens)
    check_temperature(temperature)
    check_top_k(top_k)
    check_top_p(top_p)
    check_min_p(min_p)
    check_repetition_penalty(repetition_penalty)
    check_seed(seed)


MAX_STOP_STRINGS = 64  # each one is checked against the text after every token: bound the work


def check_stop_strings(stop, name: str = "stop") -> None:
    """A list/tuple of at most MAX_STOP_STRINGS non-empty strings (a bare string is refused: wrap it)."""
    if isinstance(stop, str):
        raise SamplingParamError(f"{name} must be a list of strings (wrap a single string in a list)", name)
    if not isinstance(stop, (list, tuple)):
        raise SamplingParamError(f"{name} must be a list of strings, got {stop!r}", name)
    if len(stop) > MAX_STOP_STRINGS:
        raise SamplingParamError(f"{name} holds {len(stop)} strings; the limit is {MAX_STOP_STRINGS}", name)
    for item in stop:
        if not isinstance(item, str) or not item:
            raise SamplingParamError(f"{name} strings must be non-empty strings, got {item!r}", name)


def _is_iterable(v) -> bool:
    return not isinstance(v, (str, bytes)) and hasattr(v, "__iter__")


def _stop_items(spec) -> list:
    if spec is None:
        return []
    return list(spec) if _is_iterable(spec) else [spec]  # a non-int is refused below, by its entry


def normalise_stops(stop: StopSpec, eos_token_id: StopSpec, vocab_size: int,
                    name: str = "stop") -> List[Tuple[int, ...]]:
    """All stop conditions (stop entries, then EOS ids) as token-id tuples (a single id -> a 1-tuple);
    each of `stop` / `eos_token_id` is None, one id, or a list of ids and/or id sequences."""
    seqs = []
    for item in _stop_items(stop) + _stop_items(eos_token_id):
        seq = (item,) if _is_int(item) else tuple(item) if _is_iterable(item) else ()
        if not seq or not all(_is_int(t) and 0 <= t < vocab_size for t in seq):
            raise SamplingParamError(f"{name} entry {item!r} must be a token id or a non-empty list of ids "
                                     f"in [0, {vocab_size})", name)
        seqs.append(seq)
    return seqs


def ends_with_stop(ids: List[int], stops: List[Tuple[int, ...]]) -> int:
    """Length of the stop sequence that `ids` ends with, 0 when none."""
    for seq in stops:
        n = len(seq)
        if len(ids) >= n and tuple(ids[-n:]) == seq:
            return n
    return 0


def _as_list(value, message: str, name: str):
    """A tensor as a list; a sequence other than a string as itself; else SamplingParamError."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise SamplingParamError(f"{message}, got {type(value).__name__}", name)
    return value


def normalise_prompts(prompts, vocab_size: int, name: str = "prompts") -> List[List[int]]:
    """A batch of prompts (token-id lists or tensors, each non-empty, ids in [0, vocab_size)) as lists."""
    prompts = _as_list(prompts, "prompts must be a list of token-id lists", name)
    if len(prompts) == 0:
        raise SamplingParamError("prompts is empty: pass at least one prompt (a list of token ids)", name)
    out = []
    for i, prompt in enumerate(prompts):
        prompt = _as_list(prompt, f"prompt {i} must be a list of token ids", name)
        if len(prompt) == 0:
            raise SamplingParamError(f"prompt {i} is empty: every prompt needs at least one token", name)
        for t in prompt:
            if not _is_int(t):
                raise SamplingParamError(f"prompt {i} holds a non-integer token {t!r}", name)
            if not 0 <= t < vocab_size:
                raise SamplingParamError(f"prompt {i} holds token id {t} outside [0, vocab_size={vocab_size})", name)
        out.append([int(t) for t in prompt])
    return out
