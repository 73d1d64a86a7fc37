"""minimax_m2 (MiniMaxM2ForCausalLM, MiniMax-M2): Mixtral-style experts (`block_sparse_moe`, w1/w3/w2,
size intermediate_size) in every layer, a sigmoid router with the selection-only
`e_score_correction_bias` (no groups, no scaling, the top-k gates always renormalised), q/k RMSNorm
over the whole projection width (qk_norm="full"), RoPE on the first `rotary_dim` dims of each head
(ModelConfig.rotary_dim). transformers' head_dim default is 128, not hidden_size / heads.

Tensor names beside the base table (hf/__init__.py), per-expert layout as Mixtral's:

    model.layers.i.block_sparse_moe.e_score_correction_bias   layers.i.ffn.router.expert_bias (float32)
    (fused layout, transformers in memory: model.layers.i.mlp.e_score_correction_bias)
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..config import ModelConfig, MoEConfig
from .glm4_moe import parse_partial_rotary
from .spec import COMMON_KEYS, ArchSpec, ParsedConfig, Piece, first_present, refuse, rope_params


class MiniMaxM2Spec(ArchSpec):
    model_type = "minimax_m2"
    architecture = "MiniMaxM2ForCausalLM"
    infer_rank = -2  # a sigmoid router with a q/k norm over the whole projection
    required = (*COMMON_KEYS, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    # MiniMaxM2Config's defaults
    defaults = {"max_position_embeddings": 196608, "rope_theta": 5e6, "rms_norm_eps": 1e-6, "head_dim": 128}
    qk_norm = "full"
    partial_rotary = True  # RoPE on the first rotary_dim dims of each head
    always_renormalise = True
    routers = ("sigmoid_topk",)
    routing = "sigmoid scores (router='sigmoid_topk')"
    expert_bias = True
    num_experts_key = "num_local_experts"
    expert_size_key = "intermediate_size"
    expert_names = ("w1", "w3", "w2")

    # ----------------------------------------------------------- config.json -> ModelConfig
    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            refuse(f"minimax_m2 with scoring_func={hf['scoring_func']!r} is not supported (transformers: sigmoid)", strict)
        if not hf.get("use_qk_norm", True) or hf.get("qk_norm_type", "per_layer") != "per_layer":
            refuse(f"minimax_m2 with use_qk_norm={hf.get('use_qk_norm')!r}, qk_norm_type={hf.get('qk_norm_type')!r} "
                   "is not supported (transformers: a q/k norm over the whole projection)", strict)
        if hf.get("shared_intermediate_size"):
            refuse(f"minimax_m2 with shared_intermediate_size={hf['shared_intermediate_size']} is not supported "
                   "(transformers' MiniMaxM2 has no shared expert)", strict)
        hf = {**hf, "head_dim": int(self.value(hf, "head_dim"))}
        rotary = hf.get("rotary_dim")
        if rotary is not None:
            factor = int(rotary) / hf["head_dim"]
        else:
            factor = float(first_present({**rope_params(hf), **hf}, "partial_rotary_factor") or 1.0)
        return parse_partial_rotary(self, hf, factor, dtype, strict)

    def moe_from_hf(self, hf: dict, d_model: int) -> Optional[MoEConfig]:
        return MoEConfig(
            d_model=d_model, d_expert=int(self.value(hf, self.expert_size_key)),
            num_experts=int(self.value(hf, self.num_experts_key)), top_k=int(self.value(hf, "num_experts_per_tok")),
            router="sigmoid_topk", norm_topk_prob=True, aux_loss_coef=float(self.value(hf, "router_aux_loss_coef")),
        )

    # ----------------------------------------------------------- ModelConfig -> config.json
    def hf_fields(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        return dict(intermediate_size=moe.d_expert, num_local_experts=moe.num_experts, rotary_dim=cfg.rope_dim,
                    use_qk_norm=True, qk_norm_type="per_layer", scoring_func="sigmoid", use_routing_bias=True)

    def problems(self, cfg: ModelConfig) -> List[str]:
        problems = super().problems(cfg)
        if cfg.moe is not None and cfg.moe.num_groups != 1:
            problems.append(f"num_groups={cfg.moe.num_groups} (minimax_m2's router has no expert groups)")
        return problems

    def claims(self, cfg: ModelConfig) -> bool:
        return cfg.qk_norm == "full" and cfg.moe is not None and cfg.moe.router in self.routers

    # ----------------------------------------------------------- tensor names
    def moe_module(self, layout: str) -> str:
        return "block_sparse_moe." if layout == "per_expert" else "mlp."

    def extra_moe_tensors(self, cfg: ModelConfig, hf_prefix: str, target: str) -> Dict[str, Piece]:
        return {hf_prefix + "e_score_correction_bias": Piece(target + "router.expert_bias", float32=True)}
