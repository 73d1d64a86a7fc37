"""Load and save HF-format checkpoints (config.json + safetensors).

    model = load_hf("path/to/hf_dir")                 # Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE, GLM-4.5 (glm4_moe),
                                                       # DeepSeek-V3 / Kimi K2 (deepseek_v3, kimi_k2: MLA), MiniMax-M2,
                                                       # gpt-oss (gpt_oss; MXFP4 experts stay packed: hf/packed.py)
    save_hf(model, "out_dir", layout="per_expert")     # loads in transformers with the same logits
    export_problems(model_cfg)                         # [] when save_hf will take it (checked before training)
    moekit convert SRC DST [--dtype bfloat16] [--model-type mixtral] [--layout fused]   # SRC: any load_model source

Only `safetensors` is needed (imported when used); transformers is not. One `ArchSpec` file per
`model_type` says what sets it apart (docs/architecture.md#hf-specs; adding one:
docs/extending.md#an-hf-architecture). Analysis only (load_hf refuses them): llama, gpt2. With `model.tokenizer` set, save_hf also writes what AutoTokenizer needs (hf/tokenizer.py).

Tensor names, HF (with the "model." prefix) -> moekit; `i` layer, `e` expert, n expert dim:

    model.embed_tokens.weight                      embed.weight
    model.norm.weight                              norm.weight
    lm_head.weight (absent when tied)              lm_head.weight
    model.layers.i.input_layernorm.weight          layers.i.attn_norm.weight
    model.layers.i.post_attention_layernorm.weight layers.i.ffn_norm.weight
    model.layers.i.self_attn.{q,k,v,o}_proj.weight layers.i.attn.{q,k,v,o}_proj.weight
    model.layers.i.self_attn.{q,k,v}_proj.bias     layers.i.attn.{q,k,v}_proj.bias
    model.layers.i.self_attn.{q,k}_norm.weight     layers.i.attn.{q,k}_norm.weight
    model.layers.i.mlp.{gate,up}_proj.weight       layers.i.ffn.w13 rows [:d_ff] / [d_ff:] (dense layer)
    model.layers.i.mlp.down_proj.weight            layers.i.ffn.w2 (dense layer)
    model.layers.i.mlp.gate.weight                 layers.i.ffn.router.weight
    fused layout (transformers >= 5 in memory):
    model.layers.i.mlp.experts.gate_up_proj (E,2n,D) layers.i.ffn.experts.w13 (rows [:n] gate, [n:] up)
    model.layers.i.mlp.experts.down_proj (E,D,n)     layers.i.ffn.experts.w2
    per-expert layout (what the hub and transformers' save_pretrained hold):
    model.layers.i.mlp.experts.e.gate_proj.weight  layers.i.ffn.experts.w13[e, :n]
    model.layers.i.mlp.experts.e.up_proj.weight    layers.i.ffn.experts.w13[e, n:]
    model.layers.i.mlp.experts.e.down_proj.weight  layers.i.ffn.experts.w2[e]
    mixtral per-expert: model.layers.i.block_sparse_moe.experts.e.{w1,w3,w2}.weight and
                        model.layers.i.block_sparse_moe.gate.weight (router)
    qwen2_moe shared expert (zero-size tensors when shared_expert_intermediate_size=0):
    model.layers.i.mlp.shared_expert.{gate,up}_proj.weight  layers.i.ffn.shared.w13 rows [:n_s] / [n_s:]
    model.layers.i.mlp.shared_expert.down_proj.weight       layers.i.ffn.shared.w2
    model.layers.i.mlp.shared_expert_gate.weight            layers.i.ffn.shared_gate.weight
    glm4_moe: router bias and ungated shared experts (zero-size tensors when n_shared_experts=0):
    model.layers.i.mlp.gate.e_score_correction_bias          layers.i.ffn.router.expert_bias (float32)
    model.layers.i.mlp.shared_experts.{gate,up}_proj.weight  layers.i.ffn.shared.w13 rows [:n_s] / [n_s:]
    model.layers.i.mlp.shared_experts.down_proj.weight       layers.i.ffn.shared.w2

Logits match in both directions: `load_hf` folds transformers' YaRN cos/sin factor into q and k
(`save_hf` writes attention_factor 1.0) and caps max_seq_len at a sliding window (exact up to W tokens).
A model the chosen architecture cannot represent exactly raises ValueError listing why.

Legend: E experts, D model dim, n expert dim, n_s shared expert dim.
"""

from .convert import SIDE_FILES, cli
from .deepseek_v3 import DeepseekV3Spec, KimiK2Spec
from .glm4_moe import Glm4MoeSpec
from .gpt2 import Gpt2Spec
from .gpt_oss import GptOssSpec
from .io import CONFIG_FILE, INDEX_FILE, MAX_SHARD_BYTES, SINGLE_FILE, PathLike
from .llama import LlamaSpec
from .minimax_m2 import MiniMaxM2Spec
from .load import load_hf
from .mixtral import MixtralSpec
from .olmoe import OlmoeSpec
from .qwen2_moe import Qwen2MoeSpec
from .qwen3_5_moe import Qwen35MoeSpec, Qwen35MoeTextSpec
from .qwen3_moe import Qwen3MoeSpec
from .qwen3_next import Qwen3NextSpec
from .save import check_representable, export_problems, save_hf
from .tokenizer import TOKEN_ID_KEYS
from .spec import (LAYOUTS, SPECS, ArchSpec, Piece, config_from_hf, config_to_hf, get_spec, infer_model_type,
                   loadable_types, register)

# the registry: one line per architecture, in the order messages list them
register(Qwen3MoeSpec())
register(MixtralSpec())
register(Qwen2MoeSpec())
register(OlmoeSpec())
register(Glm4MoeSpec())
register(DeepseekV3Spec())  # MLA (attention/mla.py); its tensor names: hf/deepseek_v3.py
register(KimiK2Spec())  # DeepSeek-V3's layout
register(MiniMaxM2Spec())  # Mixtral-style experts, sigmoid router, partial rotary
register(GptOssSpec())  # sinks, sliding windows, biased clamped-SwiGLU experts (MXFP4 checkpoints)
register(Qwen3NextSpec())  # hybrid: Gated DeltaNet + gated attention (attention/gated_deltanet.py)
register(Qwen35MoeTextSpec())  # Qwen3.5/3.6-MoE text model: qwen3_next with split projections
register(Qwen35MoeSpec())  # its multimodal checkpoints: the text model is loaded
register(LlamaSpec())  # analysis only
register(Gpt2Spec())  # analysis only

SUPPORTED = loadable_types()  # the built-in loadable types (loadable_types() also sees ones registered later)
ARCHITECTURES = {mt: SPECS[mt].architecture for mt in SUPPORTED}

__all__ = [
    "load_hf", "save_hf", "export_problems", "cli", "config_from_hf", "config_to_hf", "infer_model_type",
    "check_representable",
    "SUPPORTED", "ARCHITECTURES", "LAYOUTS", "CONFIG_FILE", "SINGLE_FILE", "INDEX_FILE", "MAX_SHARD_BYTES",
    "SIDE_FILES", "TOKEN_ID_KEYS", "PathLike", "ArchSpec", "Piece", "SPECS", "register", "get_spec", "loadable_types",
]
