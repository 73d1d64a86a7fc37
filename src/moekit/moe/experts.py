"""Routed experts: the weights, and which kernel runs (docs/architecture.md, "Experts").

    w13 (E, 2F, D): rows [:F] gate, [F:] up;   w2 (E, D, F): down
    b13 (E, 2F), b2 (E, D): optional biases (MoEConfig.expert_bias; zero-init, never quantized)
    act: the activation (MoEConfig.activation, moe/activation.py)
Kernels read weights only through the accessor (moe/weights.py), so they may be quantized.
Every kernel but Triton takes the biases and the activation (`kernel_args`); Triton runs plain
SwiGLU experts only and refuses the others with a ValueError.
`forward` picks the kernel from the call (static flag, numerics, autograd, pair count) and the
backend (`set_impl`: a runtime setting, never a checkpoint field).

Legend: T tokens, D model dim, F expert dim, E experts, K experts per token, P pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import PLAIN, Numerics
from .activation import SWIGLU, build_activation
from .gathered import experts_gathered, experts_static, use_gathered
from .grouped import experts_grouped
from .invariant import experts_invariant
from .reference import experts_reference
from .weights import dense, rowwise_only


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
        self.b13 = nn.Parameter(torch.zeros(E, 2 * F)) if cfg.expert_bias else None
        self.b2 = nn.Parameter(torch.zeros(E, D)) if cfg.expert_bias else None
        self.act = build_activation(cfg)
        self.set_impl(cfg.experts_impl, cfg.grouped_layout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w13.is_meta:  # nothing to fill (and normal_ on meta imports torch._dynamo: ~1 s)
            return
        nn.init.normal_(self.w13, std=self.w13.shape[-1] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[-1] ** -0.5)
        for b in (self.b13, self.b2):
            if b is not None:
                nn.init.zeros_(b)

    @property
    def plain(self) -> bool:
        """No biases and plain SwiGLU: what every backend (Triton included) runs. (getattr: an
        `ExpertParallel` is built without these attributes.)"""
        b13, b2 = getattr(self, "b13", None), getattr(self, "b2", None)
        return getattr(self, "act", SWIGLU).name == "swiglu" and b13 is None and b2 is None

    def kernel_args(self, dtype: torch.dtype) -> dict:
        """The biases (in the compute dtype) and the activation: every kernel's keyword arguments."""
        b13, b2 = self.b13, self.b2
        return {"b13_E2F": None if b13 is None else b13.to(dtype), "b2_ED": None if b2 is None else b2.to(dtype),
                "act": self.act}

    def features(self) -> str:
        """What makes the experts non-plain, in words (for error messages)."""
        parts = [] if getattr(self, "b13", None) is None else ["expert biases (expert_bias=True)"]
        act = getattr(self, "act", SWIGLU)
        return " and ".join(parts + ([] if act.name == "swiglu" else [f"activation={act.name!r}"])) or "none"

    def set_impl(self, name: str, layout: str = None) -> None:
        """Switch the backend (and the grouped row layout) in place; weights are shared by all backends."""
        if name == "triton" and not self.plain:
            raise ValueError("experts_impl='triton' runs plain SwiGLU experts only; this layer has "
                             f"{self.features()}: use experts_impl='grouped' (or 'reference')")
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
        extra = self.kernel_args(dtype)
        if rowwise_only(w13) or rowwise_only(w2):  # every pair through the weights' own matvec, any T
            if routing.expert_idx_TK is None:
                raise ValueError("8-bit activations need top-k routing (K experts per token); this router gives "
                                 "a variable number per token")
            return experts_static(x_TD, w13, w2, routing.gates_TK, routing.expert_idx_TK, allow_dense=False,
                                  numerics=numerics, **extra)
        if static:
            return experts_static(x_TD, w13, w2, routing.gates_TK, routing.expert_idx_TK,
                                  allow_dense=not numerics.batch_invariant, numerics=numerics, **extra)
        if numerics.batch_invariant:
            return experts_invariant(x_TD, w13, w2, routing.expert_idx_TK, routing.gates_TK, numerics, **extra)
        pairs = (routing.gates_P, routing.token_idx_P, routing.expert_idx_P)
        if self.impl == "grouped" and use_gathered(routing.expert_idx_P.numel(), w13.shape[0]):
            return experts_gathered(x_TD, w13, w2, *pairs, **extra)
        w13_EFD, w2_EDF = dense(w13, dtype=dtype), dense(w2, dtype=dtype)
        if self.impl == "grouped":
            return experts_grouped(x_TD, w13_EFD, w2_EDF, *pairs, self.layout, **extra,
                                   gemm=getattr(self, "gemm", None))  # lowp.apply_precision sets it
        if self.impl == "triton":  # plain experts only (set_impl refused the others)
            return get_backend(self.impl)(x_TD, w13_EFD, w2_EDF, *pairs)
        return get_backend(self.impl)(x_TD, w13_EFD, w2_EDF, *pairs, **extra)

    def extra_repr(self) -> str:
        E, F2, D = self.w13.shape
        return f"num_experts={E}, d_model={D}, d_expert={F2 // 2}, impl={self.impl!r}"
