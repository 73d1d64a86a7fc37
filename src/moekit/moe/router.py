"""Routers: which experts each token goes to, and with what gate weight.

Every router returns a `Routing`: a flat list of P (token, expert) pairs with a
differentiable gate per pair. Top-k routers give P = T*K pairs in token-major
order; expert choice gives E*capacity pairs; token rounding gives a variable P.
One pair representation keeps the expert backends router-agnostic.

Legend: T tokens, D model dim, E experts, K experts per token, G groups,
P (token, expert) pairs, V hash vocabulary.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MoEConfig
from .rounding import round_selection


@dataclass
class Routing:
    token_idx_P: torch.Tensor  # int64, token of each pair
    expert_idx_P: torch.Tensor  # int64, expert of each pair
    gates_P: torch.Tensor  # float, differentiable gate of each pair
    top1_T: torch.Tensor  # int64, each token's first choice (Switch loss f_i)
    logits_TE: Optional[torch.Tensor]  # raw router logits (fp32); None for hash
    num_tokens: int
    router: str = "softmax_topk"

    def probs(self) -> Optional[torch.Tensor]:
        """(T, E) per-token distribution over experts for the balance losses: softmax of the
        logits, or s / sum(s) of the sigmoid scores for sigmoid_topk. None for hash."""
        if self.logits_TE is None:
            return None
        if self.router == "sigmoid_topk":
            scores_TE = torch.sigmoid(self.logits_TE)
            return scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        return torch.softmax(self.logits_TE, dim=-1)

    def tokens_per_expert(self, num_experts: int) -> torch.Tensor:
        return torch.bincount(self.expert_idx_P, minlength=num_experts)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    """Routing math runs in float32, or float64 when the input is float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


class Router(nn.Module):
    """Linear router with the selection rules of MoEConfig.router."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D = cfg.num_experts, cfg.d_model
        self.weight = nn.Parameter(torch.empty(E, D))
        # added to the selection score only, never to the gates (aux-loss-free balancing)
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.noise_weight = nn.Parameter(torch.zeros(E, D)) if cfg.router_noise else None
        if cfg.router == "hash":
            table = balanced_hash_table(torch.ones(cfg.hash_vocab_size, device="cpu"), E, cfg.top_k)
            self.register_buffer("hash_table", table.to(self.weight.device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.cfg.d_model**-0.5)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)

    @torch.no_grad()
    def build_hash_table(self, token_counts_V: torch.Tensor) -> None:
        """Rebuild the hash router's table from token frequencies (balanced assignment)."""
        if self.cfg.router != "hash":
            raise ValueError(f"build_hash_table needs router='hash', this router is {self.cfg.router!r}")
        if token_counts_V.numel() != self.cfg.hash_vocab_size:
            raise ValueError(
                f"token_counts has {token_counts_V.numel()} entries, expected hash_vocab_size={self.cfg.hash_vocab_size}"
            )
        table = balanced_hash_table(token_counts_V, self.cfg.num_experts, self.cfg.top_k)
        self.hash_table.copy_(table.to(self.hash_table.device))

    # ------------------------------------------------------------------ forward
    def forward(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None) -> Routing:
        if self.cfg.router == "hash":
            return self._hash(x_TD, token_ids_T)
        logits_TE = self.logits(x_TD)
        if self.cfg.router == "expert_choice":
            return self._expert_choice(logits_TE)
        return self._topk(logits_TE)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = F.linear(x_TD, self.weight).to(_score_dtype(x_TD.dtype))
        if self.noise_weight is not None and self.training:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise_weight).to(logits_TE.dtype))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        return logits_TE

    def _topk(self, logits_TE: torch.Tensor) -> Routing:
        cfg = self.cfg
        T, K = logits_TE.shape[0], cfg.top_k
        with torch.no_grad():
            select_TE = self._selection_scores(logits_TE)
            topk_idx_TK = torch.topk(select_TE, K, dim=-1).indices
        if cfg.token_rounding is None:
            token_idx_P = torch.arange(T, device=logits_TE.device).repeat_interleave(K)
            expert_idx_P = topk_idx_TK.reshape(-1)
        else:
            mask_TE = round_selection(select_TE, topk_idx_TK, cfg.rounding_tile, cfg.token_rounding)
            token_idx_P, expert_idx_P = mask_TE.nonzero(as_tuple=True)
        if cfg.token_rounding is None and not torch.is_grad_enabled():  # inference: (T, K) ops, no autograd
            gates_P = self._gates_topk(logits_TE, topk_idx_TK).reshape(-1)
        else:
            gates_P = self._gates(logits_TE, token_idx_P, expert_idx_P)
        return Routing(token_idx_P, expert_idx_P, gates_P, topk_idx_TK[:, 0], logits_TE, T, cfg.router)

    def route_static(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor] = None):
        """Inference routing with static shapes: (expert_idx_TK, gates_TK), K experts per token.

        Same selection and gates as `forward` without token rounding; no input checks and
        no host syncs (for torch.compile'd decoding).
        """
        cfg = self.cfg
        if cfg.router == "hash":
            expert_idx_TK = self.hash_table[token_ids_T.reshape(-1)]
            gates_TK = torch.full(expert_idx_TK.shape, cfg.routed_scaling_factor / cfg.top_k,
                                  dtype=_score_dtype(x_TD.dtype), device=x_TD.device)
            return expert_idx_TK, gates_TK
        if cfg.router not in ("softmax_topk", "topk_softmax", "sigmoid_topk"):
            raise ValueError(f"static routing supports the top-k and hash routers, not router={cfg.router!r}")
        if cfg.token_rounding is not None:
            raise ValueError("static routing takes K experts per token; token_rounding is not supported")
        logits_TE = self.logits(x_TD)
        expert_idx_TK = torch.topk(self._selection_scores(logits_TE), cfg.top_k, dim=-1).indices
        return expert_idx_TK, self._gates_topk(logits_TE, expert_idx_TK)

    def _gates_topk(self, logits_TE: torch.Tensor, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """`_gates` for exactly K experts per token, as (T, K) ops."""
        cfg = self.cfg
        logit_TK = logits_TE.gather(1, topk_idx_TK)
        if cfg.router == "sigmoid_topk":
            gates_TK = torch.sigmoid(logit_TK)
            if cfg.norm_topk_prob:
                gates_TK = gates_TK / (gates_TK.sum(-1, keepdim=True) + 1e-20)
        elif cfg.router == "softmax_topk" and not cfg.norm_topk_prob:
            gates_TK = torch.exp(logit_TK - torch.logsumexp(logits_TE, dim=-1, keepdim=True))
        else:
            gates_TK = torch.softmax(logit_TK, dim=-1)
        return gates_TK * cfg.routed_scaling_factor

    def _selection_scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        """Scores that pick the experts: the router's scores plus expert_bias (never differentiated)."""
        bias_E = self.expert_bias.to(logits_TE.dtype)
        if self.cfg.router == "softmax_topk":
            return torch.softmax(logits_TE, dim=-1) + bias_E
        if self.cfg.router == "topk_softmax":
            return logits_TE + bias_E
        return self._group_limit(torch.sigmoid(logits_TE) + bias_E)  # sigmoid_topk

    def _gates(self, logits_TE: torch.Tensor, token_idx_P: torch.Tensor, expert_idx_P: torch.Tensor) -> torch.Tensor:
        """Gate of each pair from the unbiased scores.

        Only the selected logits are gathered, so autograd keeps O(P) values instead of
        the (T, E) probabilities:
          softmax_topk, normalised / topk_softmax: softmax over the token's selected logits
          softmax_topk, not normalised:            exp(logit - logsumexp over all E)
          sigmoid_topk:                            sigmoid(logit), optionally normalised
        """
        cfg = self.cfg
        T = logits_TE.shape[0]
        logit_P = logits_TE[token_idx_P, expert_idx_P]
        if cfg.router == "sigmoid_topk":
            gates_P = torch.sigmoid(logit_P)
            normalize = cfg.norm_topk_prob
        elif cfg.router == "softmax_topk" and not cfg.norm_topk_prob:
            gates_P = torch.exp(logit_P - torch.logsumexp(logits_TE, dim=-1)[token_idx_P])
            normalize = False
        else:
            # exp(logit - max over the token's chosen logits): normalised, the softmax over the set
            set_max_T = logit_P.detach().new_zeros(T).scatter_reduce(
                0, token_idx_P, logit_P.detach(), reduce="amax", include_self=False
            )
            gates_P = torch.exp(logit_P - set_max_T[token_idx_P])
            normalize = True
        if normalize:
            sum_T = torch.zeros(T, dtype=gates_P.dtype, device=gates_P.device).index_add(0, token_idx_P, gates_P)
            gates_P = gates_P / (sum_T[token_idx_P] + 1e-20)
        return gates_P * cfg.routed_scaling_factor

    def _group_limit(self, select_TE: torch.Tensor) -> torch.Tensor:
        """Keep the topk_groups groups with the largest sum of their top-2 scores; mask the rest."""
        cfg = self.cfg
        if cfg.num_groups == 1:
            return select_TE
        T, G = select_TE.shape[0], cfg.num_groups
        grouped_TGe = select_TE.view(T, G, -1)
        group_score_TG = grouped_TGe.topk(2, dim=-1).values.sum(dim=-1)
        keep_idx = group_score_TG.topk(cfg.topk_groups, dim=-1).indices
        keep_TG = torch.zeros(T, G, dtype=torch.bool, device=select_TE.device).scatter_(1, keep_idx, True)
        masked_TGe = grouped_TGe.masked_fill(~keep_TG.unsqueeze(-1), float("-inf"))
        return masked_TGe.view(T, -1)

    def _expert_choice(self, logits_TE: torch.Tensor) -> Routing:
        cfg = self.cfg
        T, E = logits_TE.shape
        capacity = min(T, max(1, math.ceil(cfg.capacity_factor * T * cfg.top_k / E)))
        probs_TE = torch.softmax(logits_TE.detach(), dim=-1)
        select_ET = probs_TE.t() + self.expert_bias.to(probs_TE.dtype)[:, None]
        token_idx_EC = torch.topk(select_ET, capacity, dim=-1).indices
        expert_idx_EC = torch.arange(E, device=logits_TE.device)[:, None].expand(E, capacity)
        token_idx_P, expert_idx_P = token_idx_EC.reshape(-1), expert_idx_EC.reshape(-1)
        log_probs_P = logits_TE[token_idx_P, expert_idx_P] - torch.logsumexp(logits_TE, dim=-1)[token_idx_P]
        gates_P = torch.exp(log_probs_P) * cfg.routed_scaling_factor
        return Routing(token_idx_P, expert_idx_P, gates_P, logits_TE.detach().argmax(dim=-1), logits_TE, T, cfg.router)

    def _hash(self, x_TD: torch.Tensor, token_ids_T: Optional[torch.Tensor]) -> Routing:
        cfg = self.cfg
        if token_ids_T is None:
            raise ValueError("router='hash' routes by token id: call moe(x, token_ids=...) with the input ids")
        token_ids_T = token_ids_T.reshape(-1)
        T = x_TD.shape[0]
        if token_ids_T.numel() != T:
            raise ValueError(f"token_ids has {token_ids_T.numel()} ids but x has {T} tokens")
        if token_ids_T.numel() and (token_ids_T.min() < 0 or token_ids_T.max() >= cfg.hash_vocab_size):
            raise ValueError(f"token_ids must lie in [0, hash_vocab_size={cfg.hash_vocab_size})")
        experts_TK = self.hash_table[token_ids_T.long()]
        K = cfg.top_k
        token_idx_P = torch.arange(T, device=x_TD.device).repeat_interleave(K)
        gates_P = torch.full((T * K,), cfg.routed_scaling_factor / K, dtype=_score_dtype(x_TD.dtype), device=x_TD.device)
        return Routing(token_idx_P, experts_TK.reshape(-1), gates_P, experts_TK[:, 0], None, T, cfg.router)
