"""Routers as registered classes: which experts each token goes to, and with what gate.

    routing = build_router(cfg)(x_TD, token_ids_T, numerics)
    routing = router(x_TD, token_ids_T, numerics, forced_TK)   # replay: these experts (rows of -1: free)

Forced selection (routing replay, RL): the experts are the given ids, the gates are computed by
the router for them as for its own choice (gradients flow to the router); top-k routers only.
Every router returns a `Routing` (K experts per token, or a variable count for expert choice
and token rounding: `expert_idx_TK` None). The interface and how to add a router:
docs/architecture.md (Router interface), docs/extending.md; formulas: docs/formulas.md.

Legend: T tokens, D model dim, E experts, K experts per token, G groups, e experts per group,
P pairs, V hash vocab, C capacity per expert (expert choice), M chosen experts per token
padded to the largest count (token rounding).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..numerics import PLAIN, Numerics
from ..registry import Registry
from .rounding import round_selection
from .weights import linear

ROUTERS = Registry("router")
register_router = ROUTERS.register
router_class = ROUTERS.get


def build_router(cfg) -> "Router":
    return router_class(cfg.router)(cfg)


@dataclass
class Routing:
    token_idx_P: torch.Tensor  # int64, token of each pair
    expert_idx_P: torch.Tensor  # int64, expert of each pair
    gates_P: torch.Tensor  # float, differentiable gate of each pair
    top1_T: torch.Tensor  # int64, each token's first choice (Switch loss f_i)
    logits_TE: Optional[torch.Tensor]  # raw router logits (fp32); None for hash
    num_tokens: int
    router: "Router"
    expert_idx_TK: Optional[torch.Tensor] = None  # K experts per token (None: variable count)
    gates_TK: Optional[torch.Tensor] = None

    def probs(self) -> Optional[torch.Tensor]:
        """(T, E) per-token distribution over experts for the balance losses (None for hash)."""
        return None if self.logits_TE is None else self.router.probs(self.logits_TE)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing math runs in float32, or float64 when the input is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def topk_routing(router: "Router", expert_idx_TK, gates_TK, logits_TE) -> Routing:
    T, K = expert_idx_TK.shape
    token_idx_P = torch.arange(T, device=expert_idx_TK.device).repeat_interleave(K)
    return Routing(token_idx_P, expert_idx_TK.reshape(-1), gates_TK.reshape(-1), expert_idx_TK[:, 0], logits_TE, T,
                   router, expert_idx_TK, gates_TK)


class Router(nn.Module):
    """Base: a linear router (weight (E, D), optional `bias` (E,) in the logits), the selection-only
    `expert_bias`, optional noise."""

    name = "base"

    def __init__(self, cfg):
        super().__init__()
        self.check(cfg)
        self.cfg = cfg
        E, D = cfg.num_experts, cfg.d_model
        self.weight = nn.Parameter(torch.empty(E, D))
        self.bias = nn.Parameter(torch.zeros(E)) if cfg.router_bias else None  # in the logits (gpt-oss)
        # added to the selection score only, never to the gates (aux-loss-free balancing)
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.noise_weight = nn.Parameter(torch.zeros(E, D)) if cfg.router_noise else None
        self.reset_parameters()

    @classmethod
    def check(cls, cfg) -> None:
        """Router-specific config checks (ValueError naming the values); called by MoEConfig."""
        if cfg.num_groups > 1:
            raise ValueError(f"group-limited routing (num_groups={cfg.num_groups}) needs router='sigmoid_topk'")
        if cfg.token_rounding is not None and not cls.supports_rounding:
            raise ValueError(f"token_rounding applies to top-k routers, not router={cls.name!r}")

    supports_rounding = False
    causal = True  # a token's experts depend on that token alone

    def reset_parameters(self) -> None:
        if self.weight.is_meta:  # nothing to fill (and normal_ on meta imports torch._dynamo: ~1 s)
            return
        nn.init.normal_(self.weight, std=self.cfg.d_model**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    def logits(self, x_TD: torch.Tensor, numerics: Numerics = PLAIN) -> torch.Tensor:
        logits_TE = linear(x_TD, self.weight, self.bias, numerics.rowwise_linears).to(score_dtype(x_TD.dtype))
        if self.noise_weight is not None and self.training:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight).to(logits_TE.dtype))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return logits_TE

    def probs(self, logits_TE: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits_TE, dim=-1)

    def token_id_limit(self) -> Optional[int]:
        """Token ids this router can route (None: any); the hash router's table size."""
        return None

    def check_inputs(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor]) -> None:
        """Input checks that need the data (host syncs): skipped by the static (compiled) step."""

    def extra_repr(self) -> str:
        return f"router={self.name!r}, num_experts={self.cfg.num_experts}, top_k={self.cfg.top_k}"


class TopKRouter(Router):
    """K experts per token by top-k over `selection_scores` (SonicMoE token rounding optional)."""

    supports_rounding = True

    def selection_scores(self, logits_TE: torch.Tensor, numerics: Numerics) -> torch.Tensor:
        raise NotImplementedError

    def gates(self, logits_TE, logit_TK, valid_TK, numerics: Numerics) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x_TD, token_ids_T=None, numerics: Numerics = PLAIN,
                forced_TK: Optional[torch.Tensor] = None) -> Routing:
        cfg = self.cfg
        logits_TE = self.logits(x_TD, numerics)
        with torch.no_grad():
            select_TE = self.selection_scores(logits_TE, numerics)
            topk_idx_TK = torch.topk(select_TE, cfg.top_k, dim=-1).indices
        if forced_TK is not None:
            if cfg.token_rounding is not None:
                raise ValueError("forced routing (routed_experts) needs K experts per token; token_rounding "
                                 "varies the count")
            topk_idx_TK = forced_selection(forced_TK, topk_idx_TK)
        if cfg.token_rounding is None:
            gates_TK = self.gates(logits_TE, pick(logits_TE, topk_idx_TK), None, numerics)
            return topk_routing(self, topk_idx_TK, gates_TK * cfg.routed_scaling_factor, logits_TE)
        # token rounding: a variable number of experts per token; the chosen ones padded to M columns
        mask_TE = round_selection(select_TE, topk_idx_TK, cfg.rounding_tile, cfg.token_rounding)
        count_T = mask_TE.sum(-1)
        M = max(int(count_T.max()), 1) if count_T.numel() else 1
        idx_TM = torch.sort(mask_TE.to(torch.int8), dim=-1, descending=True, stable=True).indices[:, :M]
        valid_TM = torch.arange(M, device=x_TD.device)[None, :] < count_T[:, None]
        gates_TM = self.gates(logits_TE, pick(logits_TE, idx_TM), valid_TM, numerics)
        token_idx_P, col_P = valid_TM.nonzero(as_tuple=True)
        expert_idx_P = idx_TM[token_idx_P, col_P]
        gates_P = gates_TM[token_idx_P, col_P] * cfg.routed_scaling_factor
        return Routing(token_idx_P, expert_idx_P, gates_P, topk_idx_TK[:, 0], logits_TE, logits_TE.shape[0], self)


def check_forced(forced_TK: torch.Tensor, num_tokens: int, num_experts: int, top_k: int) -> None:
    """ValueError unless forced_TK is (num_tokens, top_k) integer ids: per row K distinct experts in
    [0, num_experts), or all -1 (that token routes freely). Host syncs: not in the static step."""
    if forced_TK.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8):
        raise ValueError(f"routed_experts must hold integer expert ids, got dtype {forced_TK.dtype}")
    if tuple(forced_TK.shape) != (num_tokens, top_k):
        raise ValueError(f"routed_experts has {tuple(forced_TK.shape)} ids per layer; expected "
                         f"({num_tokens} tokens, top_k={top_k})")
    free_T = (forced_TK == -1).all(-1)
    ids_TK = forced_TK[~free_T]
    if ids_TK.numel() and (ids_TK.min() < 0 or ids_TK.max() >= num_experts):
        raise ValueError(f"routed_experts ids must lie in [0, {num_experts}) (or a whole row of -1: route freely)")
    if top_k > 1 and ids_TK.numel() and (ids_TK.sort(-1).values.diff(dim=-1) == 0).any():
        raise ValueError("routed_experts repeats an expert within a token's row; a token's K experts are distinct")


def forced_selection(forced_TK: torch.Tensor, free_TK: torch.Tensor) -> torch.Tensor:
    """The forced ids, and the router's own choice in rows of -1."""
    forced_TK = forced_TK.to(free_TK.device, free_TK.dtype)
    return torch.where((forced_TK[:, :1] < 0), free_TK, forced_TK)


def pick(logits_TE: torch.Tensor, idx_TK: torch.Tensor) -> torch.Tensor:
    """logits_TE[t, idx_TK[t, k]]; indexing's backward keeps the indices, gather's the (T, E) logits."""
    return logits_TE[torch.arange(idx_TK.shape[0], device=idx_TK.device)[:, None], idx_TK]


def masked_softmax(logit_TK: torch.Tensor, valid_TK: Optional[torch.Tensor]) -> torch.Tensor:
    if valid_TK is None:
        return torch.softmax(logit_TK, dim=-1)
    return torch.softmax(logit_TK.masked_fill(~valid_TK, float("-inf")), dim=-1).masked_fill(~valid_TK, 0.0)


@register_router("softmax_topk")
class SoftmaxTopK(TopKRouter):
    """Softmax over all E, then top-k (Qwen3-MoE, Mixtral, OLMoE). Normalised gates are the softmax
    over the chosen logits; otherwise the full-softmax probabilities exp(logit - logsumexp)."""

    def selection_scores(self, logits_TE, numerics):
        return torch.softmax(logits_TE, dim=-1) + self.expert_bias.to(logits_TE.dtype)

    def gates(self, logits_TE, logit_TK, valid_TK, numerics):
        if self.cfg.norm_topk_prob:
            return masked_softmax(logit_TK, valid_TK)
        gates_TK = numerics.ew(torch.exp, logit_TK - torch.logsumexp(logits_TE, dim=-1, keepdim=True))
        return gates_TK if valid_TK is None else gates_TK.masked_fill(~valid_TK, 0.0)


@register_router("topk_softmax")
class TopKSoftmax(TopKRouter):
    """Top-k of the logits, softmax over the K chosen (SonicMoE's router)."""

    def selection_scores(self, logits_TE, numerics):
        return logits_TE + self.expert_bias.to(logits_TE.dtype)

    def gates(self, logits_TE, logit_TK, valid_TK, numerics):
        return masked_softmax(logit_TK, valid_TK)


@register_router("sigmoid_topk")
class SigmoidTopK(TopKRouter):
    """DeepSeek-V3: s = sigmoid(logits); selection on s + bias, group-limited (keep the topk_groups
    groups with the largest sum of their top-2 scores); gates from the unbiased s, optionally
    normalised over the chosen experts."""

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.num_groups > 1:
            per_group = cfg.num_experts // cfg.num_groups
            if per_group < 2:
                raise ValueError(f"group-limited routing needs >= 2 experts per group, got {per_group}")
            if cfg.top_k > cfg.topk_groups * per_group:
                raise ValueError(f"top_k={cfg.top_k} exceeds the experts in the kept groups "
                                 f"(topk_groups={cfg.topk_groups} x {per_group} experts per group)")

    def probs(self, logits_TE):
        scores_TE = torch.sigmoid(logits_TE)
        return scores_TE / scores_TE.sum(dim=-1, keepdim=True)

    def selection_scores(self, logits_TE, numerics):
        return self.group_limit(numerics.ew(torch.sigmoid, logits_TE) + self.expert_bias.to(logits_TE.dtype))

    def group_limit(self, select_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.num_groups == 1:
            return select_TE
        T, G = select_TE.shape[0], cfg.num_groups
        grouped_TGe = select_TE.view(T, G, -1)
        group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        keep_idx = group_score_TG.topk(cfg.topk_groups, dim=-1).indices
        keep_TG = torch.zeros(T, G, dtype=torch.bool, device=select_TE.device).scatter_(1, keep_idx, True)
        return grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf")).view(T, -1)

    def gates(self, logits_TE, logit_TK, valid_TK, numerics):
        gates_TK = numerics.ew(torch.sigmoid, logit_TK)
        if valid_TK is not None:
            gates_TK = gates_TK.masked_fill(~valid_TK, 0.0)
        if self.cfg.norm_topk_prob:
            gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
        return gates_TK


def balanced_hash_table(token_counts_V: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Greedy balanced assignment: most frequent tokens first, each into the K emptiest experts.

    Returns a (V, K) int64 CPU table of distinct experts per token id. Ties go to the lower
    expert id and, among equally frequent tokens, to the lower token id (deterministic).
    """
    counts = token_counts_V.detach().to("cpu", torch.float64)
    rows: list = [None] * counts.numel()
    heap = [(0.0, e) for e in range(num_experts)]  # (load, expert): a valid heap already
    for token in torch.argsort(counts, descending=True, stable=True).tolist():
        chosen = [heapq.heappop(heap) for _ in range(top_k)]
        rows[token] = [e for _, e in chosen]
        # a tiny load for zero-frequency ids still spreads them round-robin
        weight = max(counts[token].item(), 1e-9)
        for load, e in chosen:
            heapq.heappush(heap, (load + weight, e))
    return torch.tensor(rows, dtype=torch.int64, device="cpu").view(-1, top_k)


@register_router("hash")
class HashRouter(Router):
    """Hash layers: route by token id through a balanced (V, K) table; gates 1/K (times the scale)."""

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        if cfg.hash_vocab_size <= 0:
            raise ValueError("router='hash' needs hash_vocab_size > 0 (the token-id table size)")
        if cfg.router_noise:
            raise ValueError("router_noise has no meaning for router='hash' (it has no logits)")
        if cfg.router_bias:
            raise ValueError("router_bias has no meaning for router='hash' (it has no logits)")

    def __init__(self, cfg):
        super().__init__(cfg)
        table = balanced_hash_table(torch.ones(cfg.hash_vocab_size, device="cpu"), cfg.num_experts, cfg.top_k)
        self.register_buffer("hash_table", table.to(self.weight.device))

    @torch.no_grad()
    def build_hash_table(self, token_counts_V: torch.Tensor) -> None:
        """Rebuild the table from token frequencies (balanced assignment)."""
        if token_counts_V.numel() != self.cfg.hash_vocab_size:
            raise ValueError(f"token_counts has {token_counts_V.numel()} entries, expected "
                             f"hash_vocab_size={self.cfg.hash_vocab_size}")
        table = balanced_hash_table(token_counts_V, self.cfg.num_experts, self.cfg.top_k)
        self.hash_table.copy_(table.to(self.hash_table.device))

    def token_id_limit(self) -> Optional[int]:
        return self.cfg.hash_vocab_size

    def check_inputs(self, x_TD, token_ids_T) -> None:
        num_tokens = x_TD.shape[0]
        if token_ids_T is None:
            raise ValueError("router='hash' routes by token id: call moe(x, token_ids=...) with the input ids")
        if token_ids_T.numel() != num_tokens:
            raise ValueError(f"token_ids has {token_ids_T.numel()} ids but x has {num_tokens} tokens")
        if token_ids_T.numel() and (token_ids_T.min() < 0 or token_ids_T.max() >= self.cfg.hash_vocab_size):
            raise ValueError(f"token_ids must lie in [0, hash_vocab_size={self.cfg.hash_vocab_size})")

    def forward(self, x_TD, token_ids_T=None, numerics: Numerics = PLAIN,
                forced_TK: Optional[torch.Tensor] = None) -> Routing:
        cfg = self.cfg
        expert_idx_TK = self.hash_table[token_ids_T.reshape(-1).long()]
        if forced_TK is not None:
            expert_idx_TK = forced_selection(forced_TK, expert_idx_TK)
        gates_TK = torch.full(expert_idx_TK.shape, cfg.routed_scaling_factor / cfg.top_k,
                              dtype=score_dtype(x_TD.dtype), device=x_TD.device)
        return topk_routing(self, expert_idx_TK, gates_TK, None)


@register_router("expert_choice")
class ExpertChoice(Router):
    """Each expert takes its top-c tokens, c = capacity_factor*T*K/E (not causal: encoders/training)."""

    causal = False

    def forward(self, x_TD, token_ids_T=None, numerics: Numerics = PLAIN,
                forced_TK: Optional[torch.Tensor] = None) -> Routing:
        if forced_TK is not None:
            raise ValueError("forced routing (routed_experts) needs per-token top-k routing; with "
                             "router='expert_choice' each expert picks its tokens")
        cfg = self.cfg
        logits_TE = self.logits(x_TD, numerics)
        T, E = logits_TE.shape
        capacity = min(T, max(1, math.ceil(cfg.capacity_factor * T * cfg.top_k / E)))
        probs_TE = torch.softmax(logits_TE.detach(), dim=-1)
        select_ET = probs_TE.t() + self.expert_bias.to(probs_TE.dtype)[:, None]
        token_idx_EC = torch.topk(select_ET, capacity, dim=-1).indices
        expert_idx_EC = torch.arange(E, device=logits_TE.device)[:, None].expand(E, capacity)
        token_idx_P, expert_idx_P = token_idx_EC.reshape(-1), expert_idx_EC.reshape(-1)
        log_probs_P = logits_TE[token_idx_P, expert_idx_P] - torch.logsumexp(logits_TE, dim=-1)[token_idx_P]
        gates_P = torch.exp(log_probs_P) * cfg.routed_scaling_factor
        return Routing(token_idx_P, expert_idx_P, gates_P, logits_TE.detach().argmax(dim=-1), logits_TE, T, self)
