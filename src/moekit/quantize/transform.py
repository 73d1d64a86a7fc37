"""`quantize_model`: weight-only quantization as a transform on a built `Transformer`, and size helpers.

    quantize_model(model, "int4-g64")      # in place; returns the model
    size_report(model)                     # {"total_bytes": ..., "quantized_bytes": ..., ...}

What is quantized, what stays float and how checkpoints record it: docs/architecture.md
("Quantization as a weight transform"). The float weights are dropped as they are replaced (the
memory reduction is real); state-dict keys keep their prefixes. No data-dependent control flow,
so it also runs on a meta-device model (how `load_model` builds a quantized skeleton).
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from . import activations, formats
from ..model import Transformer
from ..runtime import forget_compiled
from .modules import QuantizedLinear, QuantizedWeight

def quantize_model(model: nn.Module, method: str, quantize_head: bool = False, experts_only: bool = False) -> nn.Module:
    """Quantize `model`'s weights in place with `method` (see `formats.METHODS`); returns the model.
    `experts_only`: the routed experts' w13/w2 only (as gpt-oss ships MXFP4); attention, dense and
    shared FFNs stay float."""
    formats.get_format(method)
    if not isinstance(model, Transformer):
        raise ValueError(f"quantize_model expects a moekit Transformer, got {type(model).__name__}")
    done = getattr(model, "quantization", None)
    if done is not None:
        raise ValueError(f"the model is already quantized ({done}); quantize a float model")
    if quantize_head and experts_only:
        raise ValueError("quantize_head=True contradicts experts_only=True; give one of them")
    if quantize_head and model.cfg.tie_embeddings:
        raise ValueError("quantize_head=True with tie_embeddings=True would keep a float embedding and a quantized "
                         "copy of the same matrix; leave the head in float (quantize_head=False)")
    with torch.no_grad():
        for block in model.layers:
            for name, child in list(block.attn.named_children()):  # every projection, of any attention kind
                if isinstance(child, nn.Linear) and not experts_only:
                    setattr(block.attn, name, QuantizedLinear.from_float(child, method))
            if experts_only:
                swiglus = [block.ffn.experts] if block.is_moe else []
            else:
                swiglus = [block.ffn.experts, block.ffn.shared] if block.is_moe else [block.ffn]
            for module in [m for m in swiglus if m is not None]:
                for name in ("w13", "w2"):  # the float parameter is dropped as it is replaced
                    weight = getattr(module, name)
                    delattr(module, name)
                    setattr(module, name, QuantizedWeight.from_float(weight, method))
        if quantize_head:
            model.lm_head = QuantizedLinear.from_float(model.lm_head, method)
    model.quantization = {"method": method, "quantize_head": bool(quantize_head)}
    if experts_only:  # (recorded only when set: older checkpoints' quantization.json stays the same)
        model.quantization["experts_only"] = True
    forget_compiled(model)  # steps compiled for float modules
    return model


def quantized_weights(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, QuantizedWeight)]


def quantized_bytes(model: nn.Module) -> int:
    """Bytes stored by the quantized weights (packed values and scales)."""
    return sum(w.nbytes for w in quantized_weights(model))


def model_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and persistent buffers (tied tensors once): the weight memory."""
    tensors = model.state_dict(keep_vars=True).values()
    unique = {(t.data_ptr(), t.dtype, tuple(t.shape)) if t.device.type != "meta" else id(t): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in unique.values())


def size_report(model: nn.Module) -> Dict[str, object]:
    """Weight memory of a (quantized or float) model: totals, the quantized part, bits per quantized weight."""
    qbytes, qcount = quantized_bytes(model), sum(w.numel() for w in quantized_weights(model))
    total = model_bytes(model)
    return {
        "method": (getattr(model, "quantization", None) or {}).get("method", "float"),
        "total_bytes": total,
        "quantized_bytes": qbytes,
        "float_bytes": total - qbytes,
        "quantized_weights": qcount,
        "bits_per_quantized_weight": 8.0 * qbytes / qcount if qcount else None,
    }


def set_activations(model: nn.Module, kind: str) -> int:
    """Make every q8_0 / q4_0 weight of `model` multiply `kind` activations ("q8_0": 8-bit, see
    activations.py; "float": the default). Returns how many weights it set; a model with no such
    weight is refused for "q8_0" (the setting would do nothing)."""
    activations.check_kind(kind)
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight) and m.method in activations.WEIGHT_METHODS]
    if kind != "float" and not weights:
        methods = sorted({m.method for m in model.modules() if isinstance(m, QuantizedWeight)})
        raise ValueError(f"activations={kind!r} needs q8_0 or q4_0 weights; this model has "
                         f"{', '.join(methods) if methods else 'no quantized weights'} (quantize it with q8_0 or q4_0)")
    for w in weights:
        w.set_activations(kind)
    forget_compiled(model)  # steps compiled for the old numerics
    return len(weights)
