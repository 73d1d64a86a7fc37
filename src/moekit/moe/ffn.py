"""SwiGLU feed-forward network (dense FFN and shared experts).

    y = W2 @ (silu(G) * U),   [G; U] = W13 @ x
w13 (2F, D): rows [:F] gate, [F:] up;  w2 (D, F).

Legend: T tokens, D model dim, F intermediate dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13, std=self.w13.shape[-1] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[-1] ** -0.5)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        gate_TF, up_TF = F.linear(x_TD, self.w13).chunk(2, dim=-1)
        return F.linear(F.silu(gate_TF) * up_TF, self.w2)

    def extra_repr(self) -> str:
        return f"d_model={self.w13.shape[1]}, d_ff={self.w2.shape[1]}"
