"""`quantize_model`: weight-only quantization as a transform on a built `Transformer`, and size helpers.

    from moekit.quantize import quantize_model, size_report
    quantize_model(model, "int4-g64")      # in place; returns the model
    size_report(model)                     # {"total_bytes": ..., "quantized_bytes": ..., ...}

Quantized: every attention projection (q/k/v/o), the dense SwiGLU FFNs, the shared experts
and the routed experts (experts.w13 (E, 2F, D), experts.w2 (E, D, F)). Kept in float: the
embedding, norms, the router (and Qwen2-MoE's shared-expert gate), attention biases, and the
lm_head unless `quantize_head=True` (the head is small next to the experts of an MoE, and its
error goes straight into the logits; a tied head cannot be quantized without keeping a second,
float copy for the embedding, so that combination is refused). A transform of the weights,
not of the modules: each Linear becomes a QuantizedLinear, and the w13/w2 parameters of every
SwiGLU and Experts module are replaced by `QuantizedWeight`s, which the modules and the expert
kernels read through the weight accessor (moe/weights.py). State-dict keys keep their
prefixes. The float weights are dropped as they are replaced: the memory reduction is real.

`model.quantization` records {"method", "quantize_head"}; `save_model` writes it to the
checkpoint (quantization.json) and `load_model` rebuilds the quantized modules before loading
the stored buffers. The transform has no data-dependent control flow, so it also runs on a
meta-device model (that is how `load_model` builds the skeleton).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from . import formats
from ..model import Transformer
from .modules import QuantizedLinear, QuantizedWeight

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


def quantize_model(model: nn.Module, method: str, quantize_head: bool = False) -> nn.Module:
    """Quantize `model`'s weights in place with `method` (see `formats.METHODS`); returns the model."""
    formats.get_format(method)
    if not isinstance(model, Transformer):
        raise ValueError(f"quantize_model expects a moekit Transformer, got {type(model).__name__}")
    done = getattr(model, "quantization", None)
    if done is not None:
        raise ValueError(f"the model is already quantized ({done}); quantize a float model")
    if quantize_head and model.cfg.tie_embeddings:
        raise ValueError("quantize_head=True with tie_embeddings=True would keep a float embedding and a quantized "
                         "copy of the same matrix; leave the head in float (quantize_head=False)")
    with torch.no_grad():
        for block in model.layers:
            for name in ATTENTION_PROJECTIONS:
                setattr(block.attn, name, QuantizedLinear.from_float(getattr(block.attn, name), method))
            swiglus = [block.ffn.experts, block.ffn.shared] if block.is_moe else [block.ffn]
            for module in swiglus:
                if module is not None:
                    quantize_weights(module, method)
        if quantize_head:
            model.lm_head = QuantizedLinear.from_float(model.lm_head, method)
    model.quantization = {"method": method, "quantize_head": bool(quantize_head)}
    model.__dict__.pop("_compiled_decode_step", None)  # a step compiled for the float modules
    return model


def quantize_weights(module: nn.Module, method: str, names=("w13", "w2")) -> None:
    """Replace the float parameters `names` of `module` by QuantizedWeights (in place)."""
    for name in names:
        weight = getattr(module, name)
        delattr(module, name)
        setattr(module, name, QuantizedWeight.from_float(weight, method))


def quantized_weights(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, QuantizedWeight)]


def quantized_bytes(model: nn.Module) -> int:
    """Bytes stored by the quantized weights (packed values and scales)."""
    return sum(w.nbytes for w in quantized_weights(model))


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (tied tensors once): the weight memory."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape)) if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def size_report(model: nn.Module) -> Dict[str, object]:
    """Weight memory of a (quantized or float) model: totals, the quantized part, bits per quantized weight."""
    qws = quantized_weights(model)
    qbytes = sum(w.nbytes for w in qws)
    qcount = sum(w.numel() for w in qws)
    total = model_bytes(model)
    return {
        "method": (getattr(model, "quantization", None) or {}).get("method", "float"),
        "total_bytes": total,
        "quantized_bytes": qbytes,
        "float_bytes": total - qbytes,
        "quantized_weights": qcount,
        "bits_per_quantized_weight": 8.0 * qbytes / qcount if qcount else None,
    }
