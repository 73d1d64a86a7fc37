"""Reference expert computation: a per-expert loop with plain autograd, the correctness oracle
for every other kernel (slow and memory-hungry on purpose). Pair (t, e) adds
gate * (W2[e] @ act(H) + b2[e]), H = [G; U] = W13[e] @ x_t + b13[e] (biases optional; `act`
from moe/activation.py, default SwiGLU: silu(G) * U).

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs, M pairs of one expert.
"""

from __future__ import annotations

from typing import Optional

import torch

from .activation import SWIGLU, Activation


def experts_reference(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, gates_P: torch.Tensor,
                      token_idx_P: torch.Tensor, expert_idx_P: torch.Tensor, b13_E2F: Optional[torch.Tensor] = None,
                      b2_ED: Optional[torch.Tensor] = None, act: Activation = SWIGLU) -> torch.Tensor:
    T, D = x_TD.shape
    out_TD = torch.zeros(T, D, dtype=x_TD.dtype, device=x_TD.device)
    for e in range(w13_EFD.shape[0]):
        pairs_M = (expert_idx_P == e).nonzero(as_tuple=True)[0]
        if pairs_M.numel() == 0:
            continue
        tokens_M = token_idx_P[pairs_M]
        x_MD = x_TD[tokens_M]
        h_M2F = x_MD @ w13_EFD[e].t()
        if b13_E2F is not None:
            h_M2F = h_M2F + b13_E2F[e].to(h_M2F.dtype)
        y_MD = act(h_M2F) @ w2_EDF[e].t()
        if b2_ED is not None:
            y_MD = y_MD + b2_ED[e].to(y_MD.dtype)
        out_TD = out_TD.index_add(0, tokens_M, y_MD * gates_P[pairs_M, None].to(y_MD.dtype))
    return out_TD
