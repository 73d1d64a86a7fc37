"""Integer routing metadata for the kernels, from the (token, expert) pairs (PyTorch ops,
no host synchronisation, traceable by torch.compile).

    order_P     sorted position -> original pair (stable sort by expert)       int64
    tok_P       token of each sorted pair                                      int32
    offsets_E1  expert e owns sorted rows [offsets[e], offsets[e+1])           int32
    ptr_T1      token t owns pos[ptr[t]:ptr[t+1]] (CSR by token)               int32
    pos_P       sorted position of each pair, listed token by token           int32

O(P) integers: this, the gates and H are all the layer keeps for backward besides X.

Legend: T tokens, E experts, P (token, expert) pairs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class RoutingMeta(NamedTuple):
    order_P: torch.Tensor
    tok_P: torch.Tensor
    offsets_E1: torch.Tensor
    ptr_T1: torch.Tensor
    pos_P: torch.Tensor


def _csr_offsets(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    """Start of each id 0..n-1 in a sorted id list, plus the end: (n + 1,) int32."""
    bounds = torch.arange(n + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.searchsorted(sorted_ids, bounds).to(torch.int32)


@torch.no_grad()
def routing_metadata(token_idx_P: torch.Tensor, expert_idx_P: torch.Tensor, num_tokens: int, num_experts: int) -> RoutingMeta:
    P = expert_idx_P.shape[0]
    order_P = torch.argsort(expert_idx_P, stable=True)
    offsets_E1 = _csr_offsets(expert_idx_P[order_P], num_experts)
    tok_P = token_idx_P[order_P].to(torch.int32)
    arange_P = torch.arange(P, device=expert_idx_P.device, dtype=order_P.dtype)
    sorted_pos_P = torch.empty_like(order_P).scatter_(0, order_P, arange_P)  # pair -> sorted position
    by_token_P = torch.argsort(token_idx_P, stable=True)
    ptr_T1 = _csr_offsets(token_idx_P[by_token_P], num_tokens)
    pos_P = sorted_pos_P[by_token_P].to(torch.int32)
    return RoutingMeta(order_P, tok_P, offsets_E1, ptr_T1, pos_P)
