"""Routed experts: the weights and the backend seam (`experts_impl`).

Weights (DESIGN.md layout):
    w13 (E, 2F, D): rows [:F] are the gate projection, rows [F:] the up projection
    w2  (E, D, F):  down projection

Legend: T tokens, D model dim, F expert dim, E experts, P (token, expert) pairs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MoEConfig
from .decode import experts_gathered_weights, use_gathered_weights
from .grouped import experts_grouped
from .reference import experts_reference

BACKENDS = {"reference": experts_reference, "grouped": experts_grouped}


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
    if name not in BACKENDS:
        raise ValueError(f"unknown experts_impl {name!r}; choose one of {sorted(BACKENDS) + ['triton']}")
    return BACKENDS[name]


class Experts(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        E, F, D = cfg.num_experts, cfg.d_expert, cfg.d_model
        self.w13 = nn.Parameter(torch.empty(E, 2 * F, D))
        self.w2 = nn.Parameter(torch.empty(E, D, F))
        self.impl = cfg.experts_impl
        self.layout = cfg.grouped_layout
        self._backend = get_backend(cfg.experts_impl)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w13, std=self.w13.shape[-1] ** -0.5)
        nn.init.normal_(self.w2, std=self.w2.shape[-1] ** -0.5)

    def set_impl(self, name: str, layout: str = None) -> None:
        """Switch backend (and the grouped row layout) in place; weights are shared by all backends."""
        self._backend = get_backend(name)
        self.impl = name
        if layout is not None:
            self.layout = layout

    def forward(self, x_TD: torch.Tensor, gates_P: torch.Tensor, token_idx_P: torch.Tensor, expert_idx_P: torch.Tensor) -> torch.Tensor:
        w13_EFD, w2_EDF = self.w13, self.w2
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):  # e.g. bf16 compute over fp32 master weights
            dtype = torch.get_autocast_dtype(device_type)
            x_TD, w13_EFD, w2_EDF = x_TD.to(dtype), w13_EFD.to(dtype), w2_EDF.to(dtype)
        if self.impl == "grouped":
            if use_gathered_weights(x_TD, expert_idx_P.numel(), w13_EFD.shape[0]):
                return experts_gathered_weights(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P)
            return experts_grouped(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P, self.layout)
        return self._backend(x_TD, w13_EFD, w2_EDF, gates_P, token_idx_P, expert_idx_P)

    def extra_repr(self) -> str:
        E, F2, D = self.w13.shape
        return f"num_experts={E}, d_model={D}, d_expert={F2 // 2}, impl={self.impl!r}"
