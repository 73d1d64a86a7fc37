"""Inference fast path for few tokens (decoding): gather each pair's expert weights.

With a handful of (token, expert) pairs, sorting and a per-expert GEMM loop cost
more in launch and Python overhead than the arithmetic. Here each pair fetches its
expert's matrices by index and one batched matmul does all pairs (gpt-fast style):
a few large ops instead of many small ones. Used without autograd only, when the
pairs are at most the number of experts (each expert's weights are then read
about once, as the grouped path would).

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def use_gathered_weights(x_TD: torch.Tensor, num_pairs: int, num_experts: int) -> bool:
    return not torch.is_grad_enabled() and 0 < num_pairs <= num_experts


@torch.no_grad()
def experts_gathered_weights(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P) -> torch.Tensor:
    n = w2_EDF.shape[-1]
    x_PD1 = x_TD.index_select(0, token_idx_P).unsqueeze(-1)
    h_P2F = torch.bmm(w13_EFD.index_select(0, expert_idx_P), x_PD1).squeeze(-1)
    a_PF1 = (F.silu(h_P2F[:, :n]) * h_P2F[:, n:] * gates_P.to(x_TD.dtype)[:, None]).unsqueeze(-1)
    y_PD = torch.bmm(w2_EDF.index_select(0, expert_idx_P), a_PF1).squeeze(-1)
    return torch.zeros_like(x_TD).index_add_(0, token_idx_P, y_PD)


def experts_static(x_TD, w13_EFD, w2_EDF, gates_TK, expert_idx_TK) -> torch.Tensor:
    """Routed experts with static shapes and no host syncs (torch.compile'd decoding).

    Exactly K experts per token. With T*K <= E pairs each pair gathers its expert's
    weights (as above); with more, every expert runs on every token and the outputs
    are weighted by a (T, E) gate matrix that is 0 off the chosen experts, which reads
    each expert's weights once instead of copying them per pair.
    """
    T, K = expert_idx_TK.shape
    E, n = w13_EFD.shape[0], w2_EDF.shape[-1]
    gates_TK = gates_TK.to(x_TD.dtype)
    if T * K <= E:
        # multiply-and-reduce over gathered weights: under torch.compile the gather fuses
        # into the reduction, so each chosen expert's weights are read once and never copied
        expert_idx_P = expert_idx_TK.reshape(-1)
        x_P1D = x_TD[:, None].expand(T, K, x_TD.shape[-1]).reshape(T * K, 1, -1)
        h_P2F = (w13_EFD[expert_idx_P] * x_P1D).sum(-1)
        a_P1F = (F.silu(h_P2F[:, :n]) * h_P2F[:, n:] * gates_TK.reshape(-1, 1)).unsqueeze(1)
        y_PD = (w2_EDF[expert_idx_P] * a_P1F).sum(-1)
        return y_PD.view(T, K, -1).sum(1)
    gates_ET = torch.zeros(T, E, dtype=x_TD.dtype, device=x_TD.device).scatter(1, expert_idx_TK, gates_TK).t()
    h_ET2F = torch.matmul(x_TD, w13_EFD.transpose(1, 2))
    a_ETF = F.silu(h_ET2F[..., :n]) * h_ET2F[..., n:] * gates_ET[..., None]
    return torch.matmul(a_ETF, w2_EDF.transpose(1, 2)).sum(0)
