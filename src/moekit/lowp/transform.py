"""`apply_precision(model, recipe)`: run a built model's GEMMs under a low-precision recipe.

Quantised parts (recipes.PARTS, minus the recipe's `keep`; default keep: the head):
- attention: every nn.Linear inside each attention module (q/k/v/o projections, MLA's, ...)
  becomes a `LowpLinear`;
- ffn: dense SwiGLU FFNs and shared experts become `LowpSwiGLU` (both GEMMs);
- experts: the routed experts' grouped backend runs every GEMM (two forward, two dgrad, two
  wgrad) under the recipe (`Experts.gemm`, read by moe/grouped.py and moe/gmm.py);
- head: the output projection (`LowpLinear`; still tied to the embedding when tied).
The router, the norms and the embedding lookup are never quantised.

The swap changes the modules' class in place: the same Parameter objects under the same names, so
state dicts, checkpoints and optimizer groups are those of the plain model; `remove_precision` swaps
back. Saved for backward: what the plain model saves, in the same (compute) dtype; the quantised
copies are temporaries (docs/low_precision.md).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..moe.experts import Experts
from ..moe.ffn import SwiGLU, swiglu
from ..numerics import PLAIN, Numerics
from ..runtime import forget_compiled
from .matmul import lowp_linear
from .recipes import PARTS, Recipe, get_recipe, parse_keep


class LowpLinear(nn.Linear):
    recipe: Recipe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lowp_linear(x, self.weight, self.recipe, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", precision={self.recipe.spec!r}"


class LowpSwiGLU(SwiGLU):
    recipe: Recipe

    def forward(self, x_TD: torch.Tensor, numerics: Numerics = PLAIN) -> torch.Tensor:
        return lowp_linear(swiglu(lowp_linear(x_TD, self.w13, self.recipe), numerics), self.w2, self.recipe)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", precision={self.recipe.spec!r}"


def swap(module: nn.Module, cls: type, recipe: Recipe) -> None:
    module.__class__ = cls  # same object, parameters and hooks; only forward changes
    module.recipe = recipe


def apply_precision(model: nn.Module, recipe: Union[str, Recipe, None],
                    keep: Optional[Sequence[str]] = None) -> nn.Module:
    """Run `model`'s GEMMs under `recipe` (a Recipe or a spec such as 'mxfp4-bwd:sr=0'), in place;
    `keep`: parts left in high precision (overrides the recipe's keep). None / 'none': no change."""
    from ..model import Transformer

    if isinstance(recipe, str):
        recipe = get_recipe(recipe)
    if recipe is None:
        return model
    if not isinstance(model, Transformer):
        raise ValueError(f"apply_precision expects a moekit Transformer, got {type(model).__name__}")
    if getattr(model, "quantization", None) is not None:
        raise ValueError("apply_precision: the model's weights are quantized for inference; train a float model")
    if getattr(model, "precision", None) is not None:
        raise ValueError(f"apply_precision: the model already runs under {model.precision!r}")
    keep = recipe.keep if keep is None else parse_keep("+".join(keep))
    parts = [p for p in PARTS if p not in keep]
    for block in model.layers:
        if "attention" in parts:
            for child in block.attn.modules():
                if type(child) is nn.Linear:
                    swap(child, LowpLinear, recipe)
        ffns = [block.ffn.shared] if block.is_moe else [block.ffn]
        for ffn in ffns:
            if "ffn" in parts and type(ffn) is SwiGLU:
                swap(ffn, LowpSwiGLU, recipe)
        if block.is_moe and "experts" not in parts:
            block.ffn.experts.gemm = None
        elif block.is_moe:
            experts = block.ffn.experts
            if not isinstance(experts, Experts) or experts.impl != "grouped":
                raise ValueError(f"apply_precision quantises the routed experts in the grouped backend; this model "
                                 f"uses {getattr(experts, 'impl', type(experts).__name__)!r} (set_experts_impl"
                                 f"('grouped'), or keep=experts)")
            experts.gemm = recipe
    if "head" in parts and type(model.lm_head) is nn.Linear:
        swap(model.lm_head, LowpLinear, recipe)
    model.precision = recipe.spec
    forget_compiled(model)  # steps compiled for the plain modules
    return model


def remove_precision(model: nn.Module) -> nn.Module:
    """Undo apply_precision in place."""
    for module in model.modules():
        if isinstance(module, (LowpLinear, LowpSwiGLU)):
            module.__class__ = nn.Linear if isinstance(module, LowpLinear) else SwiGLU
            del module.recipe
        if isinstance(module, Experts):
            module.gemm = None
    model.precision = None
    return model
