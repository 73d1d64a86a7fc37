"""`lowp_linear(x, w, recipe)`: y = x Wᵀ whose forward, dgrad and wgrad GEMMs each quantise their
operands as the recipe says (recipes.py) and run as the recipe's execution says (`Recipe.product`):
emulated (quantise, dequantise, multiply in float32) or, for FP8 recipes, the codes and scales into
torch's scaled matmul (scaled.py); the result in x's dtype (dW in W's).

Saved for backward: x and W as given (the compute dtype, exactly what F.linear saves); the quantised
copies are temporaries, made again in backward along the dgrad and wgrad reduction dims.

Legend: M rows of x (all leading dims), K in, N out.
"""

from __future__ import annotations

import torch

from .recipes import Recipe


class LowpMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_NK, recipe: Recipe):
        ctx.save_for_backward(x_MK, w_NK)
        ctx.recipe = recipe
        return recipe.product("fwd", x_MK, w_NK, x_MK.dtype)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_NK = ctx.saved_tensors
        recipe = ctx.recipe
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = recipe.product("dgrad", dy_MN, w_NK.T, x_MK.dtype)
        if ctx.needs_input_grad[1]:
            dw = recipe.product("wgrad", dy_MN.T, x_MK.T, w_NK.dtype)
        return dx, dw, None


def lowp_linear(x: torch.Tensor, w: torch.Tensor, recipe: Recipe, bias=None) -> torch.Tensor:
    x_MK = x.reshape(-1, x.shape[-1])
    w = w.to(x.dtype) if w.dtype != x.dtype else w  # autocast-style: the weight in the compute dtype
    y = LowpMatmul.apply(x_MK, w, recipe).reshape(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias.to(y.dtype)
