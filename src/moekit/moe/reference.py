"""Reference expert computation: a per-expert loop with plain autograd, the correctness oracle
for every other kernel (slow and memory-hungry on purpose). Pair (t, e) adds
gate * W2[e] @ (silu(G) * U), [G; U] = W13[e] @ x_t.

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs, M pairs of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def experts_reference(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, gates_P: torch.Tensor,
                      token_idx_P: torch.Tensor, expert_idx_P: torch.Tensor) -> torch.Tensor:
    T, D = x_TD.shape
    n = w2_EDF.shape[-1]
    out_TD = torch.zeros(T, D, dtype=x_TD.dtype, device=x_TD.device)
    for e in range(w13_EFD.shape[0]):
        pairs_M = (expert_idx_P == e).nonzero(as_tuple=True)[0]
        if pairs_M.numel() == 0:
            continue
        tokens_M = token_idx_P[pairs_M]
        x_MD = x_TD[tokens_M]
        h_M2F = x_MD @ w13_EFD[e].t()
        a_MF = F.silu(h_M2F[:, :n]) * h_M2F[:, n:]
        y_MD = a_MF @ w2_EDF[e].t()
        out_TD = out_TD.index_add(0, tokens_M, y_MD * gates_P[pairs_M, None].to(y_MD.dtype))
    return out_TD
