"""Qwen3.5 / Qwen3.6 MoE: qwen3_next's hybrid (hf/qwen3_next.py) with Qwen3.5's split Gated DeltaNet
projections (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), MoE in every layer, the top-k gates always
renormalised, one sigmoid-gated shared expert.

    qwen3_5_moe_text (Qwen3_5MoeForCausalLM)              the text model: load_hf and save_hf
    qwen3_5_moe (Qwen3_5MoeForConditionalGeneration)      the released multimodal checkpoints: load_hf
        reads the text model (config.json's text_config, tensors under model.language_model.) and
        skips the vision tower (model.visual.*) with a note; save_hf writes qwen3_5_moe_text.

Rotary: Qwen3.5's interleaved multimodal sections (mrope_section) rotate each frequency by the
temporal, height or width position; for text the three positions are the same token index, so it
is the plain partial rotary of Qwen3-Next (RoPE on the first partial_rotary_factor of each head).
Tensor names: hf/qwen3_next.py, with linear_attn.in_proj_{qkv,z,b,a}.weight.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from ..config import ModelConfig
from .qwen3_next import Qwen3NextSpec
from .spec import ParsedConfig


class Qwen35MoeTextSpec(Qwen3NextSpec):
    model_type = "qwen3_5_moe_text"
    architecture = "Qwen3_5MoeForCausalLM"
    infer_rank = -3
    defaults = {**Qwen3NextSpec.defaults, "max_position_embeddings": 32768, "num_experts": 256,
                "num_experts_per_tok": 8}
    dense_layers = False
    always_renormalise = True
    fused_proj = False

    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        hf = {**hf, "mlp_only_layers": None, "decoder_sparse_step": 1, "norm_topk_prob": True}
        if hf.get("intermediate_size") is None:  # no dense layer reads it; ModelConfig wants a positive d_ff
            hf["intermediate_size"] = hf.get("moe_intermediate_size")
        return super().parse_config(hf, dtype, strict)

    def layer_pattern(self, hf: dict) -> Tuple[int, Tuple[int, ...]]:
        return 1, ()

    def hf_fields(self, cfg: ModelConfig) -> dict:
        fields = super().hf_fields(cfg)
        for key in ("intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"):
            del fields[key]
        return fields


class Qwen35MoeSpec(Qwen35MoeTextSpec):
    model_type = "qwen3_5_moe"
    architecture = "Qwen3_5MoeForConditionalGeneration"
    infer_rank = None  # save_hf writes the text model (qwen3_5_moe_text)
    text_prefix = "model.language_model."

    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        text = dict(hf.get("text_config") or {})
        if not text:
            raise ValueError("config.json (qwen3_5_moe) has no text_config")
        for key in ("tie_word_embeddings", "dtype", "torch_dtype"):
            if key in hf and key not in text:
                text[key] = hf[key]
        parsed = super().parse_config(text, dtype, strict)
        parsed.cfg = parsed.cfg.replace(notes=parsed.cfg.notes + "; the text model of a multimodal qwen3_5_moe "
                                        "checkpoint (the vision tower is not loaded)")
        return parsed

    def problems(self, cfg: ModelConfig) -> List[str]:
        return ["the multimodal qwen3_5_moe checkpoint needs a vision tower; save the text model as "
                "model_type='qwen3_5_moe_text'"]

    def skips(self, key: str, cfg: ModelConfig) -> bool:
        return key.startswith(("mtp.", "model.visual."))
