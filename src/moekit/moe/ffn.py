"""SwiGLU feed-forward network (dense FFN and shared experts):
y = W2 @ (silu(G) * U), [G; U] = W13 @ x; w13 (2F, D) rows [:F] gate, [F:] up; w2 (D, F).
The activation itself is `activation.swiglu` (the expert activations' registry).
Weights go through the accessor (moe/weights.py), so they may be quantized.

Legend: T tokens, D model dim, F intermediate dim.
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import PLAIN, Numerics
from .activation import swiglu
from .weights import linear


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w13 = nn.Parameter(torch.empty(2 * d_ff, d_model))
        self.w2 = nn.Parameter(torch.empty(d_model, d_ff))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w13.is_meta:  # nothing to fill (and normal_ on meta imports torch._dynamo: ~1 s)
            return
        nn.init.normal_(self.w13, std=self.w13.shape[-1] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[-1] ** -0.5)

    def forward(self, x_TD: torch.Tensor, numerics: Numerics = PLAIN) -> torch.Tensor:
        rowwise = numerics.rowwise_linears
        return linear(swiglu(linear(x_TD, self.w13, rowwise=rowwise), numerics), self.w2, rowwise=rowwise)

    def extra_repr(self) -> str:
        return f"d_model={self.w13.shape[-1]}, d_ff={self.w2.shape[-1]}"
