"""gpt_oss (GptOssForCausalLM, gpt-oss-20b / -120b): MoE in every layer with a router bias (top-k of the
logits, softmax over the k: router="topk_softmax", router_bias), experts with biases and the clamped
SwiGLU (MoEConfig.activation="swiglu_oai", swiglu_limit, swiglu_alpha), attention sinks and a bias on
q/k/v and o_proj (attention_bias), alternating sliding-window and full layers (layer_types,
sliding_window: the window layers' cache holds only the window), YaRN with truncate=False, head_dim 64.

Tensor names beside the base ones (embeddings, norms, q/k/v/o), layer i:

    model.layers.i.self_attn.{q,k,v,o}_proj.bias   layers.i.attn.{q,k,v,o}_proj.bias
    model.layers.i.self_attn.sinks (H,)            layers.i.attn.sinks
    model.layers.i.mlp.router.{weight,bias}        layers.i.ffn.router.{weight,bias}
    model.layers.i.mlp.experts.gate_up_proj        (E, D, 2F) gate/up interleaved columns (gate = [..., ::2],
                                                   up = [..., 1::2]) -> layers.i.ffn.experts.w13 (E, 2F, D)
    model.layers.i.mlp.experts.gate_up_proj_bias   (E, 2F) interleaved -> layers.i.ffn.experts.b13
    model.layers.i.mlp.experts.down_proj           (E, F, D) -> layers.i.ffn.experts.w2 (E, D, F)
    model.layers.i.mlp.experts.down_proj_bias      (E, D) -> layers.i.ffn.experts.b2

MXFP4 checkpoints (config.json quantization_config.quant_method "mxfp4", as the hub's) hold the two
expert matrices as `<name>_blocks` (E, rows, cols / 32, 16) uint8 (two E2M1 codes a byte) and
`<name>_scales` (E, rows, cols / 32) E8M0, rows x cols being HF's matrix transposed: hf/load.py reads them.
save_hf writes plain (bf16/fp32) tensors. The hub files hold one layout; save_hf writes it for both.
"""

from __future__ import annotations

from typing import Dict, List, Optional

from ..config import ModelConfig, MoEConfig
from .spec import COMMON_KEYS, ArchSpec, ParsedConfig, Piece, rope_params

# GptOssConfig's RoPE when config.json names none
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}
HF_LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}


class GptOssSpec(ArchSpec):
    model_type = "gpt_oss"
    architecture = "GptOssForCausalLM"
    infer_rank = -3  # sinks and the clamped SwiGLU are decisive
    required = (*COMMON_KEYS, "num_local_experts", "intermediate_size")
    # GptOssConfig's defaults
    defaults = {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 150000.0, "head_dim": 64,
                "num_experts_per_tok": 4, "sliding_window": 128, "swiglu_limit": 7.0, "swiglu_alpha": 1.702}
    always_renormalise = True
    qkv_bias = True  # with o_proj's (attention_out_bias): one config.json flag
    routing = "a softmax over the top-k router logits"
    num_experts_key = "num_local_experts"
    expert_size_key = "intermediate_size"
    mxfp4_matrices = (".experts.gate_up_proj", ".experts.down_proj")  # what an MXFP4 checkpoint packs

    # ----------------------------------------------------------- config.json -> ModelConfig
    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        hf = {**hf, "head_dim": int(self.value(hf, "head_dim"))}
        if not rope_params(hf):
            hf["rope_scaling"] = DEFAULT_ROPE
        return super().parse_config(hf, dtype, strict)

    def attention_from_hf(self, hf: dict, strict: bool) -> dict:
        n = int(hf["num_hidden_layers"])
        types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        unknown = sorted({t for t in types if t not in HF_LAYER_TYPES})
        if unknown:
            raise ValueError(f"config.json (gpt_oss) has layer_types {unknown}; moekit reads {sorted(HF_LAYER_TYPES)}")
        layer_types = tuple(HF_LAYER_TYPES[t] for t in types)
        sliding = "sliding" in layer_types
        bias = bool(hf.get("attention_bias", True))
        return dict(attention_bias=bias, attention_out_bias=bias, attention_sinks=True, qk_norm=None, clip_qkv=None,
                    layer_types=layer_types if sliding else (),
                    sliding_window=int(self.value(hf, "sliding_window")) if sliding else None)

    def moe_from_hf(self, hf: dict, d_model: int) -> Optional[MoEConfig]:
        return MoEConfig(
            d_model=d_model, d_expert=int(self.value(hf, self.expert_size_key)),
            num_experts=int(self.value(hf, self.num_experts_key)), top_k=int(self.value(hf, "num_experts_per_tok")),
            router="topk_softmax", router_bias=True, activation="swiglu_oai", expert_bias=True,
            swiglu_limit=float(self.value(hf, "swiglu_limit")), swiglu_alpha=float(self.value(hf, "swiglu_alpha")),
            aux_loss_coef=float(self.value(hf, "router_aux_loss_coef")),
        )

    # ----------------------------------------------------------- ModelConfig -> config.json
    def hf_fields(self, cfg: ModelConfig) -> dict:
        moe = cfg.moe
        names = {v: k for k, v in HF_LAYER_TYPES.items()}
        fields = dict(num_local_experts=moe.num_experts, intermediate_size=moe.d_expert,
                      swiglu_limit=moe.swiglu_limit, swiglu_alpha=moe.swiglu_alpha, attention_bias=cfg.attention_bias,
                      layer_types=[names[cfg.layer_type(i)] for i in range(cfg.n_layers)],
                      sliding_window=cfg.sliding_window or self.default("sliding_window"))
        if cfg.rope_scaling is None:  # else transformers falls back to gpt-oss's YaRN
            fields["rope_scaling"] = {"rope_type": "default"}
        return fields

    def problems(self, cfg: ModelConfig) -> List[str]:
        problems = super().problems(cfg)
        moe = cfg.moe
        if moe is None:
            return problems
        need = {"attention_sinks": cfg.attention_sinks, "router_bias": moe.router_bias,
                "expert_bias": moe.expert_bias, "activation='swiglu_oai'": moe.activation == "swiglu_oai"}
        problems += [f"{name} missing (gpt_oss always has it)" for name, ok in need.items() if not ok]
        if cfg.attention_bias != cfg.attention_out_bias:
            problems.append(f"attention_bias={cfg.attention_bias} with attention_out_bias={cfg.attention_out_bias} "
                            "(gpt_oss has one flag for q/k/v and o_proj biases)")
        if "linear" in cfg.layer_types:
            problems.append("linear-attention layers (gpt_oss has full and sliding-window layers)")
        if moe.num_groups != 1:
            problems.append(f"num_groups={moe.num_groups} (gpt_oss's router has no expert groups)")
        return problems

    def claims(self, cfg: ModelConfig) -> bool:
        return cfg.attention_sinks or (cfg.moe is not None and cfg.moe.activation == "swiglu_oai")

    # ----------------------------------------------------------- tensor names
    def tensor_table(self, cfg: ModelConfig, layout: str) -> Dict[str, Piece]:
        table = {}
        for key, piece in super().tensor_table(cfg, layout).items():
            table[key] = piece
            if key.endswith("self_attn.o_proj.weight"):
                p, t = key[: -len("o_proj.weight")], piece.target[: -len("o_proj.weight")]
                if cfg.attention_out_bias:
                    table[p + "o_proj.bias"] = Piece(t + "o_proj.bias")
                table[p + "sinks"] = Piece(t + "sinks")
        return table

    def moe_tensors(self, cfg: ModelConfig, i: int, layout: str) -> Dict[str, Piece]:
        p, t = f"model.layers.{i}.mlp.", f"layers.{i}.ffn."
        return {
            p + "router.weight": Piece(t + "router.weight"),
            p + "router.bias": Piece(t + "router.bias"),
            p + "experts.gate_up_proj": Piece(t + "experts.w13", layout="interleave_t"),
            p + "experts.gate_up_proj_bias": Piece(t + "experts.b13", layout="interleave"),
            p + "experts.down_proj": Piece(t + "experts.w2", layout="t"),
            p + "experts.down_proj_bias": Piece(t + "experts.b2"),
        }
