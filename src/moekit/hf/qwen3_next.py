"""qwen3_next (Qwen3NextForCausalLM, Qwen3-Next): a hybrid of Gated DeltaNet layers ("linear_attention",
attention/gated_deltanet.py, fused in_proj_qkvz / in_proj_ba) and gated full attention
("full_attention": q_proj emits query and gate per head, per-head q/k RMSNorm, RoPE on the first
partial_rotary_factor of each head), zero-centred RMSNorms (x * (1 + w)), a softmax router with
norm_topk_prob and one shared expert behind a sigmoid gate; dense layers as qwen3_moe
(decoder_sparse_step, mlp_only_layers). layer_types, else every full_attention_interval-th layer full.

Tensor names beside the base table (hf/__init__.py), layer i a linear-attention layer (its
self_attn.* tensors are absent):

    model.layers.i.linear_attn.{in_proj_qkvz,in_proj_ba,out_proj}.weight  layers.i.attn.<same>.weight
    model.layers.i.linear_attn.{conv1d.weight,A_log,dt_bias,norm.weight}  layers.i.attn.<same>
    shared expert as qwen2_moe (mlp.shared_expert.*, mlp.shared_expert_gate.weight)

The multi-token-prediction tensors (mtp.*) are skipped.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..config import ModelConfig
from .glm4_moe import parse_partial_rotary, partial_rotary_problems
from .qwen2_moe import Qwen2MoeSpec
from .spec import COMMON_KEYS, ParsedConfig, Piece, first_present, refuse, rope_params

HF_LAYER_TYPES = {"linear_attention": "linear", "full_attention": "full"}
LINEAR_KEYS = {  # config.json -> ModelConfig
    "linear_num_key_heads": "linear_num_key_heads", "linear_num_value_heads": "linear_num_value_heads",
    "linear_key_head_dim": "linear_key_head_dim", "linear_value_head_dim": "linear_value_head_dim",
    "linear_conv_kernel_dim": "linear_conv_kernel",
}
LINEAR_DEFAULTS = {"linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
                   "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
                   "head_dim": 256, "partial_rotary_factor": 0.25}


def hybrid_layer_types(spec, hf: dict) -> tuple:
    """ModelConfig.layer_types from config.json's layer_types, else full_attention_interval."""
    n = int(hf["num_hidden_layers"])
    types = hf.get("layer_types")
    if types is None:
        every = int(spec.value(hf, "full_attention_interval"))
        return tuple("full" if (i + 1) % every == 0 else "linear" for i in range(n))
    bad = sorted({t for t in types if t not in HF_LAYER_TYPES})
    if bad:
        raise ValueError(f"config.json ({spec.model_type}) layer_types has {bad}; moekit knows "
                         f"{sorted(HF_LAYER_TYPES)}")
    return tuple(HF_LAYER_TYPES[t] for t in types)


def parse_hybrid(spec, hf: dict, dtype: Optional[str], strict: bool, fused: bool) -> ParsedConfig:
    """The base config with partial rotary, then the hybrid's fields (layer types, Gated DeltaNet shape,
    gated attention output, zero-centred norms)."""
    hf = {**hf, "head_dim": int(spec.value(hf, "head_dim"))}
    factor = float(first_present({**rope_params(hf), **hf}, "partial_rotary_factor") or
                   spec.default("partial_rotary_factor"))
    parsed = parse_partial_rotary(spec, hf, factor, dtype, strict)
    if parsed.attention_factor != 1.0:
        refuse(f"{spec.model_type} with YaRN attention_factor={parsed.attention_factor:g} is not supported", strict)
    linear = {ours: int(spec.value(hf, theirs)) for theirs, ours in LINEAR_KEYS.items()}
    parsed.cfg = parsed.cfg.replace(layer_types=hybrid_layer_types(spec, hf), attn_output_gate=True,
                                    zero_centred_norm=True, linear_fused_proj=fused, **linear)
    return parsed


def hybrid_fields(cfg: ModelConfig) -> dict:
    """config.json's hybrid entries."""
    names = {"linear": "linear_attention", "full": "full_attention"}
    fields = {theirs: getattr(cfg, ours) for theirs, ours in LINEAR_KEYS.items()}
    fields.update(layer_types=[names[cfg.layer_type(i)] for i in range(cfg.n_layers)],
                  partial_rotary_factor=cfg.rope_dim / cfg.head_dim, attention_bias=False)
    return fields


def hybrid_problems(mt: str, cfg: ModelConfig, fused: bool) -> List[str]:
    problems = partial_rotary_problems(mt, cfg)
    types = {cfg.layer_type(i) for i in range(cfg.n_layers)}
    if "linear" not in types:
        problems.append(f"no 'linear' layer_types ({mt} interleaves Gated DeltaNet and full attention)")
    if types - {"linear", "full"}:
        problems.append(f"layer_types {sorted(types - {'linear', 'full'})} ({mt} has linear and full layers)")
    if not cfg.attn_output_gate:
        problems.append(f"attn_output_gate=False ({mt} gates the attention output)")
    if not cfg.zero_centred_norm:
        problems.append(f"zero_centred_norm=False ({mt}'s RMSNorms compute x * (1 + w))")
    if "linear" in types and cfg.linear_fused_proj != fused:
        problems.append(f"linear_fused_proj={cfg.linear_fused_proj} ({mt} has "
                        f"{'fused in_proj_qkvz / in_proj_ba' if fused else 'split in_proj_qkv / z / b / a'})")
    return problems


def linear_attn_tensors(cfg: ModelConfig, i: int, hf_prefix: str = "model.") -> Dict[str, Piece]:
    p, t = f"{hf_prefix}layers.{i}.linear_attn.", f"layers.{i}.attn."
    projs = ("in_proj_qkvz", "in_proj_ba") if cfg.linear_fused_proj else ("in_proj_qkv", "in_proj_z", "in_proj_b",
                                                                          "in_proj_a")
    names = [f"{n}.weight" for n in projs] + ["conv1d.weight", "dt_bias", "A_log", "norm.weight", "out_proj.weight"]
    return {p + n: Piece(t + n) for n in names}


def hybrid_table(table: Dict[str, Piece], cfg: ModelConfig, hf_prefix: str = "model.") -> Dict[str, Piece]:
    """The base table with each linear layer's self_attn.* replaced by its linear_attn.* tensors."""
    out: Dict[str, Piece] = {}
    for key, piece in table.items():
        layer = key.split(".")[2] if key.startswith("model.layers.") else None
        if layer is not None and cfg.layer_type(int(layer)) == "linear" and ".self_attn." in key:
            continue
        if key.startswith("model."):
            key = hf_prefix + key[len("model."):]
        out[key] = piece
        if layer is not None and key.endswith("input_layernorm.weight") and cfg.layer_type(int(layer)) == "linear":
            out.update(linear_attn_tensors(cfg, int(layer), hf_prefix))
    return out


class Qwen3NextSpec(Qwen2MoeSpec):
    model_type = "qwen3_next"
    architecture = "Qwen3NextForCausalLM"
    infer_rank = -3  # a hybrid with fused projections: no other architecture holds it
    required = (*COMMON_KEYS, "moe_intermediate_size", "num_experts", "num_experts_per_tok")
    defaults = {"max_position_embeddings": 32768, "intermediate_size": 5632, "shared_expert_intermediate_size": 512,
                **LINEAR_DEFAULTS}
    qk_norm = "head"
    qkv_bias = False
    partial_rotary = True
    fused_proj = True
    text_prefix = "model."  # where the decoder's tensors live (qwen3_5_moe: model.language_model.)

    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        return parse_hybrid(self, hf, dtype, strict, self.fused_proj)

    def attention_from_hf(self, hf: dict, strict: bool) -> dict:
        if hf.get("attention_bias"):
            refuse(f"{self.model_type} with attention_bias=True is not supported", strict)
        return dict(attention_bias=False, qk_norm="head", clip_qkv=None)

    def shared_size(self, hf: dict) -> int:
        return int(self.value(hf, "shared_expert_intermediate_size"))

    def hf_fields(self, cfg: ModelConfig) -> dict:
        fields = super().hf_fields(cfg)
        del fields["qkv_bias"], fields["use_sliding_window"], fields["sliding_window"]
        fields.update(hybrid_fields(cfg))
        return fields

    def problems(self, cfg: ModelConfig) -> List[str]:
        problems = super().problems(cfg) + hybrid_problems(self.model_type, cfg, self.fused_proj)
        if cfg.moe is not None and cfg.moe.num_shared_experts and cfg.moe.num_shared_experts != 1:
            problems.append(f"num_shared_experts={cfg.moe.num_shared_experts} ({self.model_type} has one)")
        return problems

    def claims(self, cfg: ModelConfig) -> bool:
        return "linear" in cfg.layer_types and cfg.linear_fused_proj == self.fused_proj

    def tensor_table(self, cfg: ModelConfig, layout: str) -> Dict[str, Piece]:
        return hybrid_table(super().tensor_table(cfg, layout), cfg, self.text_prefix)

    def skips(self, key: str, cfg: ModelConfig) -> bool:
        return key.startswith("mtp.")
