"""RMSNorm with HF's numerics: float32 normalisation, then `weight * x.to(dtype)` (LLaMA family),
or, zero-centred (`ModelConfig.zero_centred_norm`, Qwen3-Next / Qwen3.5), `(x * (1 + weight)).to(dtype)`
in float32 with the weight stored as its offset from 1 (so weight decay pulls it toward the identity).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .runtime import materialized


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, zero_centred: bool = False):
        super().__init__()
        self.zero_centred = zero_centred
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The identity: weight 1, or 0 when zero-centred."""
        if not self.weight.is_meta:
            self.weight.fill_(0.0 if self.zero_centred else 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.zero_centred:
            return materialized((x_norm * (1.0 + self.weight.float())).to(x.dtype))
        return materialized(self.weight * x_norm.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", zero_centred" if self.zero_centred else "")
