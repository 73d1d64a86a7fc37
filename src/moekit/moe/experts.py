"""Routed experts: the weights, and which kernel runs (docs/architecture.md, "Experts").

    w13 (E, 2F, D): rows [:F] gate, [F:] up;   w2 (E, D, F): down
Kernels read weights only through the accessor (moe/weights.py), so they may be quantized.
`forward` picks the kernel from the call (static flag, numerics, autograd, pair count) and the
backend (`set_impl`: a runtime setting, never a checkpoint field).

Legend: T tokens, D model dim, F expert dim, E experts, K experts per token, P pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import PLAIN, Numerics
from .gathered import experts_gathered, experts_static, use_gathered
from .grouped import experts_grouped
from .invariant import experts_invariant
from .reference import experts_reference
from .weights import dense


def triton_backend():
    """The Triton kernels (moe/triton), imported on first use: moekit never imports triton itself.

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 was set before the first use
    (the interpreter: slow, for tests); other cases raise ValueError when called."""
    try:
        import triton  # noqa: F401  (the optional dependency itself)
    except ImportError as err:
        raise ValueError(
            "experts_impl='triton' needs the `triton` package, which is not installed "
            f"({err}); install it (pip install triton, or moekit's 'gpu' extra) and use a CUDA device, "
            "or set TRITON_INTERPRET=1 to run the kernels on the CPU interpreter; "
            "or use experts_impl='grouped'"
        ) from err
    from .triton import experts_triton

    return experts_triton


BACKENDS = {"reference": lambda: experts_reference, "grouped": lambda: experts_grouped, "triton": triton_backend}
EXPERT_IMPLS = tuple(BACKENDS)


def get_backend(name: str):
    if name not in BACKENDS:
        raise ValueError(f"unknown experts_impl {name!r}; choose one of {EXPERT_IMPLS}")
    return BACKENDS[name]()


class Experts(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, F, D = cfg.num_experts, cfg.d_expert, cfg.d_model
        self.w13 = nn.Parameter(torch.empty(E, 2 * F, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F))
        self.set_impl(cfg.experts_impl, cfg.grouped_layout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w13.is_meta:  # nothing to fill (and normal_ on meta imports torch._dynamo: ~1 s)
            return
        nn.init.normal_(self.w13, std=self.w13.shape[-1] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[-1] ** -0.5)

    def set_impl(self, name: str, layout: str = None) -> None:
        """Switch the backend (and the grouped row layout) in place; weights are shared by all backends."""
        get_backend(name)
        self.impl = name
        if layout is not None:
            self.layout = layout

    def forward(self, x_TD: torch.Tensor, routing, numerics: Numerics = PLAIN, static: bool = False) -> torch.Tensor:
        w13, w2 = self.w13, self.w2
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):  # e.g. bf16 compute over fp32 master weights
            x_TD = x_TD.to(torch.get_autocast_dtype(device_type))
        dtype = x_TD.dtype
        if static:
            return experts_static(x_TD, w13, w2, routing.gates_TK, routing.expert_idx_TK,
                                  allow_dense=not numerics.batch_invariant)
        if numerics.batch_invariant:
            return experts_invariant(x_TD, w13, w2, routing.expert_idx_TK, routing.gates_TK, numerics)
        pairs = (routing.gates_P, routing.token_idx_P, routing.expert_idx_P)
        if self.impl == "grouped" and use_gathered(routing.expert_idx_P.numel(), w13.shape[0]):
            return experts_gathered(x_TD, w13, w2, *pairs)
        w13_EFD, w2_EDF = dense(w13, dtype=dtype), dense(w2, dtype=dtype)
        if self.impl == "grouped":
            return experts_grouped(x_TD, w13_EFD, w2_EDF, *pairs, self.layout)
        return get_backend(self.impl)(x_TD, w13_EFD, w2_EDF, *pairs)

    def extra_repr(self) -> str:
        E, F2, D = self.w13.shape
        return f"num_experts={E}, d_model={D}, d_expert={F2 // 2}, impl={self.impl!r}"
