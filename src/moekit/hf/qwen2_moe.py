"""qwen2_moe (Qwen2MoeForCausalLM): qwen3_moe's layout with a q/k/v bias (`qkv_bias`, default true)
instead of q/k norms, and one shared expert behind a sigmoid gate (tensor names: hf/__init__.py).
With shared_expert_intermediate_size=0 transformers still builds zero-size shared-expert tensors
(and a gate whose output multiplies nothing): load_hf accepts them, save_hf writes them.
"""

from __future__ import annotations

from typing import Dict

from ..config import ModelConfig
from .qwen3_moe import Qwen3MoeSpec
from .spec import Piece, absent_swiglu_pieces, swiglu_pieces


class Qwen2MoeSpec(Qwen3MoeSpec):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    infer_rank = 3  # the most general: whatever no other architecture claims
    defaults = {"max_position_embeddings": 32768, "intermediate_size": 5632}
    qk_norm = None
    qkv_bias = True
    shared_expert = "gated"

    def attention_from_hf(self, hf: dict, strict: bool) -> dict:
        return dict(attention_bias=bool(hf.get("qkv_bias", True)), qk_norm=None, clip_qkv=None)

    def shared_size(self, hf: dict) -> int:
        return int(hf.get("shared_expert_intermediate_size") or 0)

    def hf_fields(self, cfg: ModelConfig) -> dict:
        fields = super().hf_fields(cfg)
        del fields["attention_bias"]
        fields.update(qkv_bias=cfg.attention_bias, shared_expert_intermediate_size=cfg.moe.shared_dim)
        return fields

    def claims(self, cfg: ModelConfig) -> bool:
        return True

    def extra_moe_tensors(self, cfg: ModelConfig, hf_prefix: str, target: str) -> Dict[str, Piece]:
        p, t = hf_prefix, target
        if cfg.moe.shared_dim:
            table = swiglu_pieces(p + "shared_expert.", t + "shared.")
            table[p + "shared_expert_gate.weight"] = Piece(t + "shared_gate.weight")
            return table
        table = absent_swiglu_pieces(p + "shared_expert.", cfg.d_model)
        table[p + "shared_expert_gate.weight"] = Piece(None, shape=(1, cfg.d_model))
        return table
