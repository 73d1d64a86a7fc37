"""qwen3_moe (Qwen3MoeForCausalLM): q/k RMSNorm per head, norm_topk_prob, dense layers (layer i when
(i + 1) % decoder_sparse_step != 0 or i in mlp_only_layers), a sliding window if use_sliding_window.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ..config import ModelConfig
from .spec import COMMON_KEYS, ArchSpec, gates_renormalised


class Qwen3MoeSpec(ArchSpec):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    infer_rank = 0  # a per-head q/k norm is decisive
    required = (*COMMON_KEYS, "moe_intermediate_size", ("num_experts", "num_local_experts"), "num_experts_per_tok")
    defaults = {"max_position_embeddings": 32768, "intermediate_size": 6144}
    qk_norm = "head"
    dense_layers = True
    num_experts_key = ("num_experts", "num_local_experts")
    expert_size_key = "moe_intermediate_size"

    def sliding_window(self, hf: dict) -> Optional[int]:
        return hf.get("sliding_window") if hf.get("use_sliding_window") else None

    def layer_pattern(self, hf: dict) -> Tuple[int, Tuple[int, ...]]:
        return int(hf.get("decoder_sparse_step") or 1), tuple(hf.get("mlp_only_layers") or ())

    def hf_fields(self, cfg: ModelConfig) -> dict:
        moe, step = cfg.moe, cfg.sparse_step
        # dense layers that decoder_sparse_step does not explain go to mlp_only_layers
        extra_dense = [i for i in range(cfg.n_layers) if cfg.is_dense_layer(i) and (i + 1) % step == 0]
        return dict(intermediate_size=cfg.d_ff, moe_intermediate_size=moe.d_expert, num_experts=moe.num_experts,
                    norm_topk_prob=gates_renormalised(moe), decoder_sparse_step=step, mlp_only_layers=extra_dense,
                    use_sliding_window=False, sliding_window=None, attention_bias=False)
