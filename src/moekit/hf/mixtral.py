"""mixtral (MixtralForCausalLM): softmax over the top-k logits (softmax_topk, norm_topk_prob=True), MoE
in every layer, `sliding_window`; expert size `intermediate_size`; per-expert tensors under `block_sparse_moe`.
"""

from __future__ import annotations

from typing import Optional

from ..config import ModelConfig
from .spec import COMMON_KEYS, ArchSpec, dense_layer_indices, gates_renormalised


class MixtralSpec(ArchSpec):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    infer_rank = 2
    required = (*COMMON_KEYS, "intermediate_size", "num_local_experts", "num_experts_per_tok")
    defaults = {"max_position_embeddings": 4096 * 32, "rope_theta": 1e6, "rms_norm_eps": 1e-5}
    always_renormalise = True
    num_experts_key = "num_local_experts"
    expert_size_key = "intermediate_size"
    expert_names = ("w1", "w3", "w2")

    def sliding_window(self, hf: dict) -> Optional[int]:
        return hf.get("sliding_window")

    def moe_module(self, layout: str) -> str:
        return "block_sparse_moe." if layout == "per_expert" else "mlp."

    def hf_fields(self, cfg: ModelConfig) -> dict:
        return dict(intermediate_size=cfg.moe.d_expert, num_local_experts=cfg.moe.num_experts, sliding_window=None)

    def claims(self, cfg: ModelConfig) -> bool:
        """Every layer MoE without shared experts or q/k/v bias, top-k gates renormalised."""
        moe = cfg.moe
        return (cfg.qk_norm is None and moe is not None and not dense_layer_indices(cfg)
                and moe.num_shared_experts == 0 and not cfg.attention_bias and gates_renormalised(moe))
