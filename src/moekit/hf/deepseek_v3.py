"""deepseek_v3 (DeepseekV3ForCausalLM; Kimi K2's kimi_k2 has the same layout): multi-head latent
attention (attention="mla", attention/mla.py), glm4_moe's router and shared experts (sigmoid scores,
e_score_correction_bias, n_group/topk_group, routed_scaling_factor), the first
first_k_dense_replace layers dense. Tensor names beside glm4_moe's MoE ones, layer i:

    model.layers.i.self_attn.q_proj.weight                 layers.i.attn.q_proj.weight (q_lora_rank None)
    model.layers.i.self_attn.q_a_proj.{weight,bias}        layers.i.attn.q_a_proj.* (bias: attention_bias)
    model.layers.i.self_attn.q_a_layernorm.weight          layers.i.attn.q_a_layernorm.weight
    model.layers.i.self_attn.q_b_proj.weight               layers.i.attn.q_b_proj.weight
    model.layers.i.self_attn.kv_a_proj_with_mqa.{weight,bias}  layers.i.attn.kv_a_proj_with_mqa.*
    model.layers.i.self_attn.kv_a_layernorm.weight         layers.i.attn.kv_a_layernorm.weight
    model.layers.i.self_attn.kv_b_proj.weight              layers.i.attn.kv_b_proj.weight
    model.layers.i.self_attn.o_proj.{weight,bias}          layers.i.attn.o_proj.*

rope_interleave (transformers' default true) is kept as ModelConfig.rope_interleave; YaRN's
mscale_all_dim (softmax scale) and cos/sin attention_factor travel in cfg.rope_scaling. The
multi-token-prediction layers (index >= num_hidden_layers, num_nextn_predict_layers) are not
built (as in transformers): load_hf skips their tensors and save_hf writes num_nextn_predict_layers=0.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional

from ..config import ModelConfig
from ..shape import FFN, Arch, Attention
from .glm4_moe import Glm4MoeSpec
from .spec import COMMON_KEYS, ParsedConfig, Piece, rope_params, rope_scaling_to_hf

MLA_KEYS = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
MTP_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class DeepseekV3Spec(Glm4MoeSpec):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    infer_rank = -2  # MLA is decisive
    required = (*COMMON_KEYS, *MLA_KEYS, "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok")
    # DeepseekV3Config's defaults
    defaults = {"max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "intermediate_size": 18432,
                "n_shared_experts": 1, "first_k_dense_replace": 3, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                "n_group": 8, "topk_group": 4}
    qk_norm = None
    optional_qk_norm = False
    num_experts_key = "n_routed_experts"

    # ----------------------------------------------------------- config.json -> ModelConfig
    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        self.check_required(hf)
        rope = int(hf["qk_rope_head_dim"])
        hf = {**hf, "head_dim": rope, "num_key_value_heads": hf["num_attention_heads"]}
        parsed = super(Glm4MoeSpec, self).parse_config(hf, dtype, strict)
        cfg = parsed.cfg
        if cfg.rope_scaling is not None:  # MLA applies these itself (nothing to fold on load)
            extra = {"attention_factor": parsed.attention_factor}
            if rope_params(hf).get("mscale_all_dim"):
                extra["mscale_all_dim"] = float(rope_params(hf)["mscale_all_dim"])
            cfg = cfg.replace(rope_scaling={**cfg.rope_scaling, **extra})
        return ParsedConfig(cfg, 1.0, parsed.max_positions, parsed.hf_dtype)

    def attention_from_hf(self, hf: dict, strict: bool) -> dict:
        q_lora = hf.get("q_lora_rank")
        return dict(attention="mla", attention_bias=bool(hf.get("attention_bias", False)), qk_norm=None,
                    clip_qkv=None, q_lora_rank=None if q_lora is None else int(q_lora),
                    rope_interleave=bool(hf.get("rope_interleave", True)),
                    **{k: int(hf[k]) for k in MLA_KEYS})

    # ----------------------------------------------------------- ModelConfig -> config.json
    def hf_fields(self, cfg: ModelConfig) -> dict:
        fields = super().hf_fields(cfg)
        for key in ("use_qk_norm", "partial_rotary_factor"):
            del fields[key]
        fields.update(q_lora_rank=cfg.q_lora_rank, rope_interleave=cfg.rope_interleave,
                      **{k: getattr(cfg, k) for k in MLA_KEYS})
        scaling = rope_scaling_to_hf(cfg)
        if scaling is not None and scaling["rope_type"] == "yarn":
            scaling["attention_factor"] = float(cfg.rope_scaling.get("attention_factor", 1.0))
            if cfg.rope_scaling.get("mscale_all_dim"):
                scaling["mscale_all_dim"] = float(cfg.rope_scaling["mscale_all_dim"])
        fields["rope_scaling"] = scaling
        return fields

    def config_to_hf(self, cfg: ModelConfig, dtype: str) -> dict:
        hf = super().config_to_hf(cfg, dtype)
        hf["head_dim"] = cfg.qk_rope_head_dim  # what DeepseekV3Config sets (the rotary dim)
        return hf

    def problems(self, cfg: ModelConfig) -> List[str]:
        problems = [p for p in super().problems(cfg) if not p.startswith("attention=")]
        if cfg.attention != "mla":
            problems.append(f"attention={cfg.attention!r} ({self.model_type} has multi-head latent attention)")
        return problems

    def claims(self, cfg: ModelConfig) -> bool:
        return cfg.attention == "mla"

    # ----------------------------------------------------------- tensor names
    def tensor_table(self, cfg: ModelConfig, layout: str) -> Dict[str, Piece]:
        table: Dict[str, Piece] = {}
        for key, piece in super().tensor_table(cfg, layout).items():
            if ".self_attn." not in key:
                table[key] = piece
            elif key.endswith(".self_attn.q_proj.weight"):  # the base layout's first attention tensor
                table.update(self.mla_tensors(cfg, key[: -len("q_proj.weight")], piece.target[: -len("q_proj.weight")]))
        return table

    def mla_tensors(self, cfg: ModelConfig, p: str, t: str) -> Dict[str, Piece]:
        names = ["q_proj.weight"] if cfg.q_lora_rank is None else [
            "q_a_proj.weight", *(["q_a_proj.bias"] if cfg.attention_bias else []), "q_a_layernorm.weight",
            "q_b_proj.weight"]
        names += ["kv_a_proj_with_mqa.weight", *(["kv_a_proj_with_mqa.bias"] if cfg.attention_bias else []),
                  "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight",
                  *(["o_proj.bias"] if cfg.attention_bias else [])]
        return {p + name: Piece(t + name) for name in names}

    def skips(self, key: str, cfg: ModelConfig) -> bool:
        """The MTP layers' tensors (layer index >= num_hidden_layers): not built, so not loaded."""
        m = MTP_LAYER.match(key)
        return m is not None and int(m.group(1)) >= cfg.n_layers

    # ----------------------------------------------------------- analysis
    def to_arch(self, hf: dict, name: str):
        """The analyzer's MLA `Arch` (kept beside parse_config: the analyzer's ModelConfig path counts MHA)."""
        self.check_required(hf)
        h, rope, nope = hf["num_attention_heads"], hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
        attn = Attention("mla", h, h, nope + rope, qkv_bias=bool(hf.get("attention_bias")),
                         q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
                         qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=hf["v_head_dim"])
        first_dense = hf.get("first_k_dense_replace", 0)
        n = hf["moe_intermediate_size"]
        moe = FFN("moe", num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"], d_expert=n,
                  d_shared=(hf.get("n_shared_experts") or 0) * n)
        dense = FFN("dense", d_ff=hf["intermediate_size"])
        ffns = [dense if i < first_dense else moe for i in range(hf["num_hidden_layers"])]
        notes = ("MLA: KV cache holds the compressed latent (kv_lora_rank + qk_rope_head_dim per layer), "
                 "as DeepSeek/vLLM cache it",
                 "the multi-token-prediction (MTP) module is not counted (HF transformers does not build it)")
        return Arch(name, hf["hidden_size"], hf["vocab_size"], attn, tuple(ffns),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    max_seq_len=hf.get("max_position_embeddings", 4096),
                    dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), notes=notes)


class KimiK2Spec(DeepseekV3Spec):
    model_type = "kimi_k2"
