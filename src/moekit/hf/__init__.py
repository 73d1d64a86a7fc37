"""Load and save HF-format checkpoints (config.json + safetensors).

    model = load_hf("path/to/hf_dir")                 # Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE
    save_hf(model, "out_dir", layout="per_expert")     # loads in transformers with the same logits
    moekit convert SRC DST [--dtype bfloat16] [--model-type mixtral] [--layout fused]

Only `safetensors` is needed (imported when used); transformers is not.

Supported `model_type`s (one `ArchSpec` file each) and what sets them apart:

    qwen3_moe  q/k RMSNorm per head (qk_norm="head"), optional dense layers
               (decoder_sparse_step, mlp_only_layers), norm_topk_prob
    qwen2_moe  q/k/v bias, a shared expert behind a sigmoid gate, dense layers, norm_topk_prob
    olmoe      q/k RMSNorm over the whole projection (qk_norm="full"), clip_qkv, norm_topk_prob
    mixtral    softmax over the top-k logits (= softmax_topk with norm_topk_prob=True)

and, for the analyzer only (`moekit.analyze.from_hf_config`; load_hf refuses them):
deepseek_v3 (MLA), llama (dense, with o_proj/MLP biases), gpt2 (the GPT-3-style dense layout).

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
    qwen2_moe shared expert:
    model.layers.i.mlp.shared_expert.{gate,up}_proj.weight  layers.i.ffn.shared.w13 rows [:n_s] / [n_s:]
    model.layers.i.mlp.shared_expert.down_proj.weight       layers.i.ffn.shared.w2
    model.layers.i.mlp.shared_expert_gate.weight            layers.i.ffn.shared_gate.weight

Two conventions keep the logits identical in both directions:

- YaRN: transformers multiplies cos/sin by an attention factor (0.1 ln(factor) + 1 unless
  given); moekit's RoPE does not. `load_hf` folds that factor into the q and k projections
  (or into the q/k norm weights), and `save_hf` writes `attention_factor: 1.0`.
- A sliding window W is exact for sequences of at most W tokens, so `load_hf` caps
  `max_seq_len` at W (moekit refuses longer sequences) and says so in `cfg.notes`.

Which architecture `save_hf` writes when `model_type` is not given (`infer_model_type`): the
first spec, in `infer_rank` order, that `claims` the config: qk_norm "head" -> qwen3_moe;
qk_norm "full" -> olmoe; mixtral when every layer is MoE without shared experts or q/k/v bias
and the top-k gates are renormalised; else qwen2_moe. A model the chosen architecture cannot
represent exactly raises ValueError listing why (`ArchSpec.problems`).

How to add an architecture: write `hf/<model_type>.py` with an `ArchSpec` subclass (copy the
closest one): set `model_type`, `architecture`, the `required` config keys and transformers'
`defaults`, the feature flags (qk_norm, qkv_bias, clip_qkv, dense_layers, shared_expert,
always_renormalise) and the config.json names of the MoE shape, then override the hooks where
the layout differs: `hf_fields` (config.json it writes), `sliding_window`, `layer_pattern`,
`attention_from_hf`, `moe_module`/`expert_names`/`extra_moe_tensors` (tensor names),
`problems`/`check_parsed` (what it cannot hold) and `claims`/`infer_rank` (inference). For an
architecture moekit cannot run, set `loadable = False` and implement `to_arch(hf, name)` for
the analyzer instead. Then add one `register(...)` line below; load_hf, save_hf,
`moekit convert` and the analyzer pick it up. Generic code never compares model_type strings.

Files: spec.py (ArchSpec, Piece, the registry), one file per architecture, io.py (config.json,
safetensors shards, index, progress), load.py (load_hf), save.py (save_hf, the convert CLI).

Legend: L layers, E experts, D model dim, n expert dim, V vocab.
"""

from .deepseek_v3 import DeepseekV3Spec
from .gpt2 import Gpt2Spec
from .io import CONFIG_FILE, INDEX_FILE, MAX_SHARD_BYTES, SINGLE_FILE, PathLike
from .llama import LlamaSpec
from .load import load_hf
from .mixtral import MixtralSpec
from .olmoe import OlmoeSpec
from .qwen2_moe import Qwen2MoeSpec
from .qwen3_moe import Qwen3MoeSpec
from .save import SIDE_FILES, TOKEN_ID_KEYS, check_representable, cli, save_hf
from .spec import (LAYOUTS, SPECS, ArchSpec, Piece, config_from_hf, config_to_hf, get_spec, infer_model_type,
                   loadable_types, register)

# the registry: one line per architecture, in the order messages list them
register(Qwen3MoeSpec())
register(MixtralSpec())
register(Qwen2MoeSpec())
register(OlmoeSpec())
register(DeepseekV3Spec())  # analysis only
register(LlamaSpec())  # analysis only
register(Gpt2Spec())  # analysis only

SUPPORTED = loadable_types()  # the built-in loadable types (loadable_types() also sees ones registered later)
ARCHITECTURES = {mt: SPECS[mt].architecture for mt in SUPPORTED}

__all__ = [
    "load_hf", "save_hf", "cli", "config_from_hf", "config_to_hf", "infer_model_type", "check_representable",
    "SUPPORTED", "ARCHITECTURES", "LAYOUTS", "CONFIG_FILE", "SINGLE_FILE", "INDEX_FILE", "MAX_SHARD_BYTES",
    "SIDE_FILES", "TOKEN_ID_KEYS", "PathLike", "ArchSpec", "Piece", "SPECS", "register", "get_spec", "loadable_types",
]
