"""Expert activations as a registry: the one place that holds the gated-activation math.

Each activation maps the fused up-projection H = [G; U] (rows [:F] gate, [F:] up) to A, and
gives the backward dH from (H, dA) for the kernels with a hand-written backward (grouped):

    act = build_activation(cfg)          # MoEConfig.activation, with its parameters
    a_RF = act(h_R2F, numerics)          # forward (numerics pads the transcendental, engine)
    dh_R2F = act.backward(h_R2F, da_RF)  # dH, autograd-free

  swiglu       A = silu(G) * U                                             (Llama, Qwen, DeepSeek)
  swiglu_oai   g = min(G, limit), u = clamp(U, -limit, limit),            (gpt-oss; limit 7.0,
               A = (u + 1) * g * sigmoid(alpha * g)                         alpha 1.702)

The clamps pass gradient where the input lies inside the closed interval (as torch.clamp).
`MoEConfig.swiglu_limit` / `swiglu_alpha` (HF's `swiglu_limit`, `swiglu_alpha`) set limit and alpha.
Adding one: docs/extending.md ("An expert activation").

Legend: R rows, F expert dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..numerics import PLAIN, Numerics
from ..registry import Registry

ACTIVATIONS = Registry("expert activation")
register_activation = ACTIVATIONS.register


def build_activation(cfg) -> "Activation":
    """The activation object of a MoEConfig (`cfg.activation` with its parameters)."""
    return ACTIVATIONS.get(cfg.activation).from_config(cfg)


def swiglu(h_R2F: torch.Tensor, numerics: Numerics = PLAIN) -> torch.Tensor:
    """silu(G) * U of the fused [G; U] rows (dense FFN, shared experts, the `swiglu` activation)."""
    n = h_R2F.shape[-1] // 2
    return numerics.ew(F.silu, h_R2F[..., :n]) * h_R2F[..., n:]


class Activation:
    """Base: `__call__(h_R2F, numerics)` -> a_RF and `backward(h_R2F, da_RF)` -> dh_R2F."""

    name = "base"

    @classmethod
    def from_config(cls, cfg) -> "Activation":
        return cls()

    def __call__(self, h_R2F: torch.Tensor, numerics: Numerics = PLAIN) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, h_R2F: torch.Tensor, da_RF: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


@register_activation("swiglu")
class SwiGLUActivation(Activation):
    def __call__(self, h_R2F, numerics=PLAIN):
        return swiglu(h_R2F, numerics)

    def backward(self, h_R2F, da_RF):
        n = h_R2F.shape[-1] // 2
        g_RF, u_RF = h_R2F[..., :n], h_R2F[..., n:]
        dh_R2F = torch.empty_like(h_R2F)
        torch.mul(da_RF, F.silu(g_RF), out=dh_R2F[..., n:])  # dU = dA * silu(G)
        dh_R2F[..., :n] = torch.ops.aten.silu_backward(da_RF * u_RF, g_RF)  # dG = silu'(G) * dA * U
        return dh_R2F


@register_activation("swiglu_oai")
class ClampedSwiGLU(Activation):
    """gpt-oss's clamped SwiGLU (transformers' GptOssExperts._apply_gate on de-interleaved rows)."""

    def __init__(self, limit: float = 7.0, alpha: float = 1.702):
        self.limit, self.alpha = float(limit), float(alpha)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.swiglu_limit, cfg.swiglu_alpha)

    def __call__(self, h_R2F, numerics=PLAIN):
        n = h_R2F.shape[-1] // 2
        g_RF = h_R2F[..., :n].clamp(max=self.limit)
        u_RF = h_R2F[..., n:].clamp(-self.limit, self.limit)
        return (u_RF + 1) * (g_RF * numerics.ew(torch.sigmoid, g_RF * self.alpha))

    def backward(self, h_R2F, da_RF):
        n = h_R2F.shape[-1] // 2
        g_RF, u_RF = h_R2F[..., :n], h_R2F[..., n:]
        gc_RF, uc_RF = g_RF.clamp(max=self.limit), u_RF.clamp(-self.limit, self.limit)
        sig_RF = torch.sigmoid(gc_RF * self.alpha)
        glu_RF = gc_RF * sig_RF
        dh_R2F = torch.empty_like(h_R2F)
        du_RF = (da_RF * glu_RF).masked_fill_(u_RF.abs() > self.limit, 0.0)
        dh_R2F[..., n:] = du_RF
        dglu_RF = sig_RF.mul_(1 + self.alpha * gc_RF * (1 - sig_RF))  # d(g sigmoid(alpha g))/dg
        dh_R2F[..., :n] = (da_RF * (uc_RF + 1) * dglu_RF).masked_fill_(g_RF > self.limit, 0.0)
        return dh_R2F

    def __repr__(self) -> str:
        return f"ClampedSwiGLU(limit={self.limit}, alpha={self.alpha})"


SWIGLU = SwiGLUActivation()
