"""olmoe (OlmoeForCausalLM): q/k RMSNorm over the whole projection (qk_norm="full"), clip_qkv,
norm_topk_prob, MoE in every layer; expert size `intermediate_size`; head_dim derived, never written.
"""

from __future__ import annotations

from typing import List

from ..config import ModelConfig
from .spec import COMMON_KEYS, ArchSpec, gates_renormalised, refuse


class OlmoeSpec(ArchSpec):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"
    infer_rank = 1  # a full-projection q/k norm is decisive
    required = (*COMMON_KEYS, "intermediate_size", ("num_experts", "num_local_experts"), "num_experts_per_tok")
    defaults = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.01}
    qk_norm = "full"
    clip_qkv = True
    writes_head_dim = False
    num_experts_key = ("num_experts", "num_local_experts")
    expert_size_key = "intermediate_size"

    def check_parsed(self, cfg: ModelConfig, strict: bool) -> None:
        if cfg.head_dim * cfg.n_heads != cfg.d_model:
            refuse(f"olmoe needs head_dim * num_attention_heads == hidden_size, "
                   f"got {cfg.head_dim} * {cfg.n_heads} != {cfg.d_model}", strict)

    def hf_fields(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        return dict(intermediate_size=moe.d_expert, num_experts=moe.num_experts, norm_topk_prob=gates_renormalised(moe),
                    clip_qkv=cfg.clip_qkv, attention_bias=False)

    def problems(self, cfg: ModelConfig) -> List[str]:
        problems = super().problems(cfg)
        if cfg.moe is not None and cfg.head_dim * cfg.n_heads != cfg.d_model:
            problems.append(f"head_dim*n_heads={cfg.head_dim * cfg.n_heads} != d_model={cfg.d_model} "
                            "(olmoe derives head_dim)")
        return problems
