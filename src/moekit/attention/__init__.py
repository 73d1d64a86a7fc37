"""Attention kinds behind one interface (see base.py): `build_attention(cfg, layer_idx)`."""

from .base import ATTENTION_KINDS, attend_spans, attention_class, register_attention
from .gated_deltanet import GatedDeltaNet
from .gqa import GQAttention
from .mla import MLAttention


def build_attention(cfg, layer_idx: int):
    return attention_class(cfg.attention_kind(layer_idx))(cfg, layer_idx)


__all__ = ["ATTENTION_KINDS", "GatedDeltaNet", "GQAttention", "MLAttention", "attend_spans", "attention_class",
           "build_attention", "register_attention"]
