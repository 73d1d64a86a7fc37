"""glm4_moe (Glm4MoeForCausalLM, GLM-4.5): DeepSeek-V3-style routing (sigmoid scores, the
selection-only `e_score_correction_bias`, group-limited top-k n_group/topk_group, norm_topk_prob,
routed_scaling_factor), n_shared_experts ungated shared experts of moe_intermediate_size each, the
first first_k_dense_replace layers dense, q/k/v bias (attention_bias), optional per-head q/k norm,
partial rotary: RoPE on the first int(head_dim * partial_rotary_factor) dims of each head
(ModelConfig.rotary_dim; transformers' default when config.json has none is 0.5, as the GLM-4.5 releases).

Tensor names beside the base table (hf/__init__.py), layer i an MoE layer:

    model.layers.i.mlp.gate.e_score_correction_bias          layers.i.ffn.router.expert_bias (float32)
    model.layers.i.mlp.shared_experts.{gate,up}_proj.weight  layers.i.ffn.shared.w13 rows [:n_s] / [n_s:]
    model.layers.i.mlp.shared_experts.down_proj.weight       layers.i.ffn.shared.w2

transformers keeps zero-size shared-expert tensors when n_shared_experts=0 (as qwen2_moe).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from ..config import ModelConfig, MoEConfig
from .spec import (COMMON_KEYS, ArchSpec, ParsedConfig, Piece, absent_swiglu_pieces, dense_layer_indices, first_present,
                   refuse, rope_params, swiglu_pieces)


def parse_partial_rotary(spec: ArchSpec, hf: dict, factor: float, dtype: Optional[str], strict: bool) -> ParsedConfig:
    """The base `parse_config` of `hf` with RoPE on the first int(head_dim * factor) dims of each head
    (transformers' rounding): the factor is taken out of config.json and set as ModelConfig.rotary_dim."""
    rope = {k: v for k, v in rope_params(hf).items() if k != "partial_rotary_factor"}
    plain = {**hf, "partial_rotary_factor": 1.0, "rope_scaling": rope or None, "rope_parameters": None}
    parsed = ArchSpec.parse_config(spec, plain, dtype, strict)
    head_dim = parsed.cfg.head_dim
    rotary_dim = int(head_dim * factor)
    if rotary_dim != head_dim and parsed.attention_factor != 1.0:
        refuse(f"{spec.model_type} with YaRN attention_factor={parsed.attention_factor:g} and partial rotary is not "
               "supported (transformers scales only the rotated dims; moekit folds the factor into whole q and k)",
               strict)
    if rotary_dim != head_dim:
        try:
            parsed.cfg = parsed.cfg.replace(rotary_dim=rotary_dim)
        except ValueError as e:
            refuse(f"{spec.model_type} with a rotary dim of {rotary_dim} (head_dim={head_dim} x "
                   f"partial_rotary_factor={factor}): {e}", strict)  # the analyzer: RoPE changes no shape
    return parsed


def partial_rotary_problems(mt: str, cfg: ModelConfig) -> List[str]:
    """Why cfg's rotary dim cannot be written as partial_rotary_factor ([] when it can)."""
    factor = cfg.rope_dim / cfg.head_dim
    if int(cfg.head_dim * factor) != cfg.rope_dim:
        return [f"rotary_dim={cfg.rotary_dim} ({mt}'s int(head_dim * partial_rotary_factor) does not give it back)"]
    return []


class Glm4MoeSpec(ArchSpec):
    model_type = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    infer_rank = -1  # a sigmoid router is decisive: no other architecture computes it
    required = (*COMMON_KEYS, "moe_intermediate_size", ("n_routed_experts", "num_local_experts"), "num_experts_per_tok")
    # Glm4MoeConfig's defaults
    defaults = {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "intermediate_size": 10944,
                "n_shared_experts": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 1.0,
                "n_group": 1, "topk_group": 1, "partial_rotary_factor": 0.5}
    qk_norm = "head"
    optional_qk_norm = True
    qkv_bias = True
    partial_rotary = True  # RoPE on the first rotary_dim dims of each head
    dense_layers = True
    shared_expert = "plain"
    routers = ("sigmoid_topk",)
    routing = "sigmoid scores (router='sigmoid_topk')"
    scaled_gates = True
    expert_bias = True
    num_experts_key = ("n_routed_experts", "num_local_experts")

    # ----------------------------------------------------------- config.json -> ModelConfig
    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        partial = first_present({**rope_params(hf), **hf}, "partial_rotary_factor")
        partial = float(self.default("partial_rotary_factor") if partial is None else partial)
        return parse_partial_rotary(self, hf, partial, dtype, strict)

    def attention_from_hf(self, hf: dict, strict: bool) -> dict:
        return dict(attention_bias=bool(hf.get("attention_bias", False)),
                    qk_norm="head" if hf.get("use_qk_norm") else None, clip_qkv=None)

    def layer_pattern(self, hf: dict) -> Tuple[int, Tuple[int, ...]]:
        first_k = min(int(self.value(hf, "first_k_dense_replace")), int(hf["num_hidden_layers"]))
        return 1, tuple(range(first_k))

    def moe_from_hf(self, hf: dict, d_model: int) -> Optional[MoEConfig]:
        d_expert, shared = int(self.value(hf, "moe_intermediate_size")), int(self.value(hf, "n_shared_experts"))
        return MoEConfig(
            d_model=d_model, d_expert=d_expert, num_experts=int(self.value(hf, self.num_experts_key)),
            top_k=int(self.value(hf, "num_experts_per_tok")), router="sigmoid_topk",
            norm_topk_prob=bool(self.value(hf, "norm_topk_prob")), num_groups=int(self.value(hf, "n_group")),
            topk_groups=int(self.value(hf, "topk_group")),
            routed_scaling_factor=float(self.value(hf, "routed_scaling_factor")),
            num_shared_experts=shared, d_shared=shared * d_expert if shared else None,
        )

    # ----------------------------------------------------------- ModelConfig -> config.json
    def hf_fields(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        return dict(intermediate_size=cfg.d_ff, moe_intermediate_size=moe.d_expert, n_routed_experts=moe.num_experts,
                    n_shared_experts=moe.num_shared_experts, first_k_dense_replace=len(dense_layer_indices(cfg)),
                    norm_topk_prob=moe.norm_topk_prob, routed_scaling_factor=moe.routed_scaling_factor,
                    n_group=moe.num_groups, topk_group=moe.topk_groups, use_qk_norm=cfg.qk_norm == "head",
                    attention_bias=cfg.attention_bias, partial_rotary_factor=cfg.rope_dim / cfg.head_dim, num_nextn_predict_layers=0)

    def problems(self, cfg: ModelConfig) -> List[str]:
        problems = super().problems(cfg) + partial_rotary_problems(self.model_type, cfg)
        moe, dense = cfg.moe, dense_layer_indices(cfg)
        if moe is None:
            return problems
        if dense != list(range(len(dense))):
            problems.append(f"dense layers {dense} (glm4_moe has dense layers only first: first_k_dense_replace)")
        if moe.num_shared_experts and moe.shared_dim != moe.num_shared_experts * moe.d_expert:
            problems.append(f"d_shared={moe.shared_dim} (glm4_moe's shared experts are n_shared_experts x "
                            f"moe_intermediate_size = {moe.num_shared_experts * moe.d_expert} wide)")
        if moe.num_experts // moe.num_groups < 2:
            problems.append(f"{moe.num_experts // moe.num_groups} expert per group (transformers' glm4_moe router "
                            "scores each group by its top 2)")
        return problems

    def claims(self, cfg: ModelConfig) -> bool:
        return cfg.moe is not None and cfg.moe.router in self.routers

    # ----------------------------------------------------------- tensor names
    def extra_moe_tensors(self, cfg: ModelConfig, hf_prefix: str, target: str) -> Dict[str, Piece]:
        p, t = hf_prefix, target
        table = {p + "gate.e_score_correction_bias": Piece(t + "router.expert_bias", float32=True)}
        if cfg.moe.shared_dim:
            table.update(swiglu_pieces(p + "shared_experts.", t + "shared."))
        else:
            table.update(absent_swiglu_pieces(p + "shared_experts.", cfg.d_model))
        return table
