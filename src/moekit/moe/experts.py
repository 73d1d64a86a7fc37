"""Routed experts: the weights, the weight accessor and the kernel seam.

Weights (see docs/architecture.md):
    w13 (E, 2F, D): rows [:F] are the gate projection, rows [F:] the up projection
    w2  (E, D, F):  down projection
Either may be replaced by a stand-in weight (moe/weights.py: quantized today; low precision
and expert parallelism are transforms of the same kind): the kernels read weights only
through the accessor.

Kernels (one file each; the backend is a runtime setting, `set_impl`, never a checkpoint field):
    reference   per-expert loop, plain autograd: the oracle          (moe/reference.py)
    grouped     memory-efficient autograd (caches X and H only)      (moe/grouped.py, gmm.py)
    triton      the same contract in Triton kernels (GPU)            (moe/triton/)
    gathered    few pairs, no autograd: gather each pair's weights   (moe/gathered.py)
    static      K per token, static shapes: the compiled decode step (moe/gathered.py)
    invariant   batch-invariant rows (the engine's numerics policy)  (moe/invariant.py)
Which one runs is decided here, from the call (`forward`'s numerics and static flag, autograd,
the pair count) and the backend setting.

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


def get_backend(name: str):
    if name == "triton":
        return triton_backend()
    if name == "reference":
        return experts_reference
    if name == "grouped":
        return experts_grouped
    raise ValueError(f"unknown experts_impl {name!r}; choose one of ['grouped', 'reference', 'triton']")


class Experts(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E, F, D = cfg.num_experts, cfg.d_expert, cfg.d_model
        self.w13 = nn.Parameter(torch.empty(E, 2 * F, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F))
        self.set_impl(cfg.experts_impl, cfg.grouped_layout)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13, std=self.w13.shape[-1] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[-1] ** -0.5)

    def set_impl(self, name: str, layout: str = None) -> None:
        """Switch the backend (and the grouped row layout) in place; weights are shared by all backends."""
        get_backend(name)
        self.impl = name
        if layout is not None:
            self.layout = layout

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

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
        if self.impl == "grouped" and use_gathered(routing.expert_idx_P.numel(), self.num_experts):
            return experts_gathered(x_TD, w13, w2, *pairs)
        w13_EFD, w2_EDF = dense(w13, dtype=dtype), dense(w2, dtype=dtype)
        if self.impl == "grouped":
            return experts_grouped(x_TD, w13_EFD, w2_EDF, *pairs, self.layout)
        return get_backend(self.impl)(x_TD, w13_EFD, w2_EDF, *pairs)

    def extra_repr(self) -> str:
        E, F2, D = self.w13.shape
        return f"num_experts={E}, d_model={D}, d_expert={F2 // 2}, impl={self.impl!r}"
