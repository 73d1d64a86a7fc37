"""Per-request sampling parameters and their validation.

    SamplingParams(max_tokens=64, temperature=0.8, top_p=0.95, top_k=None, min_p=0.05, seed=1,
                   repetition_penalty=1.1, stop=["\\n\\n"], stop_token_ids=[0, [13, 13]], ignore_eos=False,
                   logprobs=False)

Sampling and the field checks are `moekit.sampling`'s, shared with `generate` and the server
(temperature 0 = greedy; repetition_penalty (1.0 = off) over the prompt and the tokens so far,
greedy mode included, as in `generate`; min_p None or 0 = off; a seeded `torch.Generator` per
request); a bad field raises ParamError naming it. Stopping: `stop` strings (need a tokenizer;
the text is cut before the match), `stop_token_ids` (ids or id sequences; not returned), the
engine's EOS ids unless `ignore_eos`, and `max_tokens`.

Routed experts (`return_routed_experts`, on an engine built with `return_routed_experts=True`):
`routed_experts[i]` is generated token i's routing, [MoE layer][k] expert ids in the router's
order, from the forward that FED token i (the decode step at its position; vLLM's routing is
per position in the same sense), i.e. what `model(prompt + tokens)` routes at position P + i.
The last sampled token is never fed, so it has none: n tokens ending by length or a stop string
carry n - 1 entries; a removed stop id was that unfed token, so then every returned token has
one. Events carry the entries known since the last event (one step behind their tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import List, Optional, Sequence, Tuple, Union

from ..sampling import (SamplingParamError, check_logit_bias, check_max_tokens, check_penalty, check_sampling,
                        check_stop_strings, normalise_stops)
from .errors import ParamError


MAX_TOP_LOGPROBS = 20  # vLLM's default cap


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[Union[int, Sequence[int]]] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # record the log-probability of each chosen token
    top_logprobs: int = 0  # with logprobs: also the n most likely tokens at each step, with their logprobs
    presence_penalty: float = 0.0  # OpenAI's, over the generated tokens
    frequency_penalty: float = 0.0
    logit_bias: Sequence[Tuple[int, float]] = ()  # (token id, value) pairs added to the logits
    min_tokens: int = 0  # EOS and single-token stops are masked until this many tokens are generated
    return_routed_experts: bool = False  # record each generated token's experts (needs the engine's option)

    @property
    def plain_logits(self) -> bool:
        """No processor changes the logits before the choice (greedy rows can then be batched)."""
        return (self.repetition_penalty == 1 and self.presence_penalty == 0 and self.frequency_penalty == 0
                and not self.logit_bias and self.min_tokens == 0)

    @cached_property
    def plain_greedy(self) -> bool:
        """The choice is the argmax of the raw logits (greedy, plain logits). Found once: read every step."""
        return self.temperature == 0 and self.plain_logits

    def replace(self, **changes) -> "SamplingParams":
        return replace(self, **changes)

    def validate(self, vocab_size: int, has_tokenizer: bool) -> None:
        """Raise ParamError naming the first invalid field."""
        try:
            check_sampling(self.max_tokens, self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                           self.seed, min_p=self.min_p)
            check_stop_strings(self.stop)
            check_penalty(self.presence_penalty, "presence_penalty")
            check_penalty(self.frequency_penalty, "frequency_penalty")
            check_logit_bias(self.logit_bias, vocab_size)
            check_max_tokens(self.min_tokens, "min_tokens", 0)
        except SamplingParamError as err:
            raise ParamError(str(err), err.param) from None
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ParamError(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs!r}",
                             "logprobs")
        if not isinstance(self.return_routed_experts, bool):
            raise ParamError(f"return_routed_experts must be True or False, got {self.return_routed_experts!r}",
                             "return_routed_experts")
        if self.stop and not has_tokenizer:
            raise ParamError("stop strings need a tokenizer; this engine has none (use stop_token_ids)", "stop")
        stop_sequences(self.stop_token_ids, (), vocab_size)


def stop_sequences(stop_token_ids, eos_ids: Sequence[int], vocab_size: int) -> List[Tuple[int, ...]]:
    """Every stop id / id sequence, then the EOS ids, as tuples (a single id becomes a 1-tuple)."""
    try:
        return normalise_stops(stop_token_ids, eos_ids, vocab_size, name="stop_token_ids")
    except SamplingParamError as err:
        raise ParamError(str(err), err.param) from None


@dataclass
class Completion:
    """The outcome of one request (one choice)."""

    prompt_tokens: int
    token_ids: List[int]
    text: Optional[str]  # None without a tokenizer
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    logprobs: Optional[List[float]] = None
    top_logprobs: Optional[List[List[Tuple[int, float]]]] = None  # per token: the n most likely (id, logprob)
    error: Optional[str] = None
    time_to_first_token: Optional[float] = None  # seconds from submission
    latency: Optional[float] = None  # seconds from submission to the end
    generated_tokens: int = 0  # tokens sampled, stop ids that were removed included (usage)
    routed_experts: Optional[List[List[List[int]]]] = None  # per fed generated token: [MoE layer][k] expert ids


@dataclass
class Event:
    """A streaming update: new tokens (and text) since the last event; `finish_reason` on the last one."""

    token_ids: List[int] = field(default_factory=list)
    text: str = ""
    finish_reason: Optional[str] = None
    completion: Optional[Completion] = None  # set on the last event
    logprobs: List[float] = field(default_factory=list)  # of token_ids, when the request asked for logprobs
    top_logprobs: List[List[Tuple[int, float]]] = field(default_factory=list)  # per token, when top_logprobs > 0
    routed_experts: List[List[List[int]]] = field(default_factory=list)  # entries known since the last event
