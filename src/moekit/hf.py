"""Load and save HF-format checkpoints (config.json + safetensors).

    model = load_hf("path/to/hf_dir")                 # Qwen3-MoE, Mixtral, Qwen2-MoE, OLMoE
    save_hf(model, "out_dir", layout="per_expert")     # loads in transformers with the same logits
    moekit convert SRC DST [--dtype bfloat16] [--model-type mixtral] [--layout fused]

Only `safetensors` is needed (imported when used); transformers is not.

Supported `model_type`s and what sets them apart:

    qwen3_moe  q/k RMSNorm per head (qk_norm="head"), optional dense layers
               (decoder_sparse_step, mlp_only_layers), norm_topk_prob
    qwen2_moe  q/k/v bias, a shared expert behind a sigmoid gate, dense layers, norm_topk_prob
    olmoe      q/k RMSNorm over the whole projection (qk_norm="full"), clip_qkv, norm_topk_prob
    mixtral    softmax over the top-k logits (= softmax_topk with norm_topk_prob=True)

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

Which architecture `save_hf` writes when `model_type` is not given (`infer_model_type`):
qk_norm "head" -> qwen3_moe; qk_norm "full" -> olmoe; otherwise mixtral when every layer is
MoE without shared experts or q/k/v bias and the top-k gates are renormalised, else qwen2_moe.
A model the chosen architecture cannot represent exactly raises ValueError listing why.

Legend: L layers, E experts, D model dim, n expert dim, V vocab.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Union

import torch

from .checkpoint import TOKENIZER_FILE, load_tokenizer
from .config import ModelConfig, MoEConfig
from .model import Transformer, rope_inv_freq

PathLike = Union[str, Path]

SUPPORTED = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe")
ARCHITECTURES = {
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
LAYOUTS = ("per_expert", "fused")
CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
# small files beside the weights that `moekit convert` carries over unchanged
SIDE_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# config.json keys `moekit convert` carries over (token ids moekit's config does not hold)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# transformers' class defaults for keys a config.json may leave out
_DEFAULT_ROPE_THETA = {"mixtral": 1e6}
_DEFAULT_EPS = {"mixtral": 1e-5, "olmoe": 1e-5}
_DEFAULT_AUX = {"olmoe": 0.01}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# =============================================================== config: HF -> moekit
@dataclass
class _HFSpec:
    cfg: ModelConfig
    model_type: str
    attention_factor: float  # transformers' YaRN cos/sin factor, folded into q and k on load


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch.dtype, or a name such as "bfloat16"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def _get(hf: dict, *names, default=KeyError):
    for name in names:
        if hf.get(name) is not None:
            return hf[name]
    if default is KeyError:
        raise ValueError(f"config.json has no {' / '.join(repr(n) for n in names)}")
    return default


def _check_model_type(model_type) -> str:
    if model_type not in SUPPORTED:
        raise ValueError(f"unsupported model_type {model_type!r}; moekit reads and writes {', '.join(SUPPORTED)}")
    return model_type


def _yarn_attention_factor(params: dict, factor: float) -> float:
    """transformers' default YaRN cos/sin scale (0.1 ln(s) + 1, or the mscale ratio)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def _rope_from_hf(hf: dict, model_type: str, max_pos: int) -> Tuple[float, Optional[dict], float]:
    """(rope_theta, moekit rope_scaling or None, attention factor) from either config style:
    transformers 5 `rope_parameters` or the older `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or _DEFAULT_ROPE_THETA.get(model_type, 10000.0))
    kind = params.get("rope_type") or params.get("type") or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    original = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos)
    if kind == "default":
        return theta, None, 1.0
    if kind == "linear":
        return theta, {"type": "linear", "factor": float(params["factor"])}, 1.0
    if kind == "llama3":
        scaling = {"type": "llama3", "factor": float(params["factor"]),
                   "low_freq_factor": float(params["low_freq_factor"]),
                   "high_freq_factor": float(params["high_freq_factor"]),
                   "original_max_position_embeddings": original}
        return theta, scaling, 1.0
    if kind == "yarn":
        if params.get("truncate", True) is False:
            raise ValueError("YaRN with truncate=False is not supported")
        factor = float(params.get("factor") or max_pos / original)
        scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                   "beta_fast": float(params.get("beta_fast") or 32.0), "beta_slow": float(params.get("beta_slow") or 1.0)}
        return theta, scaling, _yarn_attention_factor(params, factor)
    raise ValueError(f"unsupported rope type {kind!r}; moekit supports default, linear, llama3 and yarn")


def _sliding_window(hf: dict, model_type: str) -> Optional[int]:
    """The attention window, if any layer uses one (qwen only when use_sliding_window)."""
    uses_window = model_type == "mixtral" or (model_type in ("qwen3_moe", "qwen2_moe") and hf.get("use_sliding_window"))
    window = hf.get("sliding_window") if uses_window else None
    return int(window) if window else None


def _attention_fields(hf: dict, model_type: str) -> dict:
    if model_type == "qwen2_moe":
        bias = bool(hf.get("qkv_bias", True))
    else:
        bias = bool(hf.get("attention_bias", False))
        if bias:  # qwen3_moe / olmoe put a bias on o_proj too; mixtral has none
            raise ValueError(f"{model_type} with attention_bias=True is not supported (moekit's o_proj has no bias)")
    qk_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(model_type)
    clip = hf.get("clip_qkv") if model_type == "olmoe" else None
    return dict(attention_bias=bias, qk_norm=qk_norm, clip_qkv=None if clip is None else float(clip))


def _moe_from_hf(hf: dict, model_type: str, d_model: int) -> Optional[MoEConfig]:
    if model_type == "mixtral":
        num_experts, d_expert, norm = _get(hf, "num_local_experts"), _get(hf, "intermediate_size"), True
    else:
        num_experts = _get(hf, "num_experts", "num_local_experts")
        d_expert = _get(hf, "intermediate_size") if model_type == "olmoe" else _get(hf, "moe_intermediate_size")
        norm = bool(hf.get("norm_topk_prob", False))
    if num_experts == 0:
        return None
    shared = int(hf.get("shared_expert_intermediate_size", 0)) if model_type == "qwen2_moe" else 0
    return MoEConfig(
        d_model=d_model, d_expert=int(d_expert), num_experts=int(num_experts), top_k=int(_get(hf, "num_experts_per_tok")),
        router="softmax_topk", norm_topk_prob=norm,
        aux_loss_coef=float(hf.get("router_aux_loss_coef", _DEFAULT_AUX.get(model_type, 0.001))),
        num_shared_experts=1 if shared else 0, d_shared=shared or None, shared_gate=bool(shared),
    )


def _parse_hf_config(hf: dict, dtype: Optional[torch.dtype] = None) -> _HFSpec:
    model_type = _check_model_type(hf.get("model_type"))
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; moekit's FFNs are SwiGLU (silu)")
    d_model, n_heads = int(_get(hf, "hidden_size")), int(_get(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or d_model // n_heads)
    max_pos = int(_get(hf, "max_position_embeddings"))
    theta, scaling, attention_factor = _rope_from_hf(hf, model_type, max_pos)
    window = _sliding_window(hf, model_type)
    max_seq_len = min(max_pos, window) if window else max_pos
    notes = f"imported from HF {model_type}"
    if window and window < max_pos:
        notes += f"; max_seq_len capped at the sliding window ({window}) where attention is exact"
    if dtype is None:
        dtype = _DTYPES.get(str(hf.get("dtype") or hf.get("torch_dtype") or "float32"), torch.float32)
    cfg = ModelConfig(
        name=model_type, notes=notes,
        vocab_size=int(_get(hf, "vocab_size")), d_model=d_model, n_layers=int(_get(hf, "num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), head_dim=head_dim,
        rope_theta=theta, rope_scaling=scaling,
        norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_EPS.get(model_type, 1e-6))),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        d_ff=int(_get(hf, "intermediate_size")),
        sparse_step=int(hf.get("decoder_sparse_step") or 1) if model_type in ("qwen3_moe", "qwen2_moe") else 1,
        dense_layers=tuple(hf.get("mlp_only_layers") or ()) if model_type in ("qwen3_moe", "qwen2_moe") else (),
        moe=_moe_from_hf(hf, model_type, d_model),
        max_seq_len=max_seq_len, dtype=str(dtype).removeprefix("torch."),
        init_std=float(hf.get("initializer_range", 0.02)),
        **_attention_fields(hf, model_type),
    )
    if model_type == "olmoe" and head_dim * n_heads != d_model:
        raise ValueError(f"olmoe needs head_dim * num_attention_heads == hidden_size, got {head_dim} * {n_heads} != {d_model}")
    if attention_factor != 1.0 and cfg.clip_qkv is not None:
        raise ValueError("YaRN attention_factor != 1 together with clip_qkv cannot be folded into the weights")
    return _HFSpec(cfg, model_type, attention_factor)


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig for an HF config.json dict (raises ValueError when unsupported)."""
    return _parse_hf_config(hf).cfg


# =============================================================== config: moekit -> HF
def _gates_renormalised(moe: MoEConfig) -> bool:
    return moe.router == "topk_softmax" or moe.norm_topk_prob


def infer_model_type(cfg: ModelConfig) -> str:
    """The HF architecture `save_hf` writes by default (rule in the module docstring)."""
    if cfg.qk_norm == "head":
        return "qwen3_moe"
    if cfg.qk_norm == "full":
        return "olmoe"
    moe = cfg.moe
    all_moe = not any(cfg.is_dense_layer(i) for i in range(cfg.n_layers))
    if moe is not None and all_moe and moe.num_shared_experts == 0 and not cfg.attention_bias and _gates_renormalised(moe):
        return "mixtral"
    return "qwen2_moe"


def _config_problems(cfg: ModelConfig, model_type: str) -> List[str]:
    moe = cfg.moe
    if moe is None:
        return ["the model has no MoE layers (cfg.moe is None)"]
    problems = []
    if moe.router not in ("softmax_topk", "topk_softmax"):
        problems.append(f"router={moe.router!r} (HF MoE models route with a softmax over the router logits)")
    if model_type == "mixtral" and not _gates_renormalised(moe):
        problems.append("norm_topk_prob=False (mixtral always renormalises the top-k gates)")
    if moe.routed_scaling_factor != 1.0:
        problems.append(f"routed_scaling_factor={moe.routed_scaling_factor}")
    if moe.router_noise:
        problems.append("router_noise=True (no noise weights in HF)")
    if moe.token_rounding is not None:
        problems.append(f"token_rounding={moe.token_rounding!r}")
    dense = [i for i in range(cfg.n_layers) if cfg.is_dense_layer(i)]
    if dense and model_type in ("mixtral", "olmoe"):
        problems.append(f"dense layers {dense} ({model_type} has MoE in every layer)")
    if moe.num_shared_experts and model_type != "qwen2_moe":
        problems.append(f"shared experts ({model_type} has none; qwen2_moe has one with a sigmoid gate)")
    if moe.num_shared_experts and not moe.shared_gate:
        problems.append("shared experts without shared_gate (qwen2_moe always gates its shared expert)")
    if cfg.attention_bias and model_type != "qwen2_moe":
        problems.append(f"attention_bias=True ({model_type} has no q/k/v-only bias; qwen2_moe has)")
    want_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(model_type)
    if cfg.qk_norm != want_norm:
        problems.append(f"qk_norm={cfg.qk_norm!r} ({model_type} has qk_norm={want_norm!r})")
    if cfg.clip_qkv is not None and model_type != "olmoe":
        problems.append(f"clip_qkv={cfg.clip_qkv} (only olmoe clips q/k/v)")
    if model_type == "olmoe" and cfg.head_dim * cfg.n_heads != cfg.d_model:
        problems.append(f"head_dim*n_heads={cfg.head_dim * cfg.n_heads} != d_model={cfg.d_model} (olmoe derives head_dim)")
    return problems


def check_representable(model: Transformer, model_type: str, config_only: bool = False) -> None:
    """Raise ValueError naming every feature `model_type` cannot represent exactly.
    config_only: skip the checks that read weights (for a model on the meta device)."""
    problems = _config_problems(model.cfg, _check_model_type(model_type))
    biased = [] if config_only else [
        i for i, block in enumerate(model.layers) if block.is_moe and bool(block.ffn.router.expert_bias.any())
    ]
    if biased:
        problems.append(f"non-zero router.expert_bias (aux-loss-free balancing) in layers {biased}")
    if problems:
        raise ValueError(f"cannot save this model as {model_type}: " + "; ".join(problems))


def _rope_to_hf(cfg: ModelConfig) -> Optional[dict]:
    scaling = cfg.rope_scaling
    if not scaling:
        return None
    kind = scaling["type"]
    out = {"rope_type": kind, "factor": float(scaling["factor"])}
    if kind == "llama3":
        out.update(low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
    elif kind == "yarn":
        out.update(original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 4096)),
                   beta_fast=float(scaling.get("beta_fast", 32.0)), beta_slow=float(scaling.get("beta_slow", 1.0)),
                   attention_factor=1.0)  # moekit's RoPE has no cos/sin scale
    return out


def config_to_hf(cfg: ModelConfig, model_type: str, dtype: str) -> dict:
    """config.json contents for `model_type` (call check_representable first)."""
    moe = cfg.moe
    hf = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": _rope_to_hf(cfg),
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
        "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
    }
    if model_type != "olmoe":
        hf["head_dim"] = cfg.head_dim
    if model_type == "mixtral":
        hf.update(intermediate_size=moe.d_expert, num_local_experts=moe.num_experts, sliding_window=None)
    elif model_type == "olmoe":
        hf.update(intermediate_size=moe.d_expert, num_experts=moe.num_experts, norm_topk_prob=_gates_renormalised(moe),
                  clip_qkv=cfg.clip_qkv, attention_bias=False)
    else:
        # dense layers that decoder_sparse_step does not explain go to mlp_only_layers
        step = cfg.sparse_step
        extra_dense = [i for i in range(cfg.n_layers) if cfg.is_dense_layer(i) and (i + 1) % step == 0]
        hf.update(intermediate_size=cfg.d_ff, moe_intermediate_size=moe.d_expert, num_experts=moe.num_experts,
                  norm_topk_prob=_gates_renormalised(moe), decoder_sparse_step=step, mlp_only_layers=extra_dense,
                  use_sliding_window=False, sliding_window=None)
        if model_type == "qwen3_moe":
            hf["attention_bias"] = False
        else:
            hf.update(qkv_bias=cfg.attention_bias, shared_expert_intermediate_size=moe.shared_dim)
    return hf


# =============================================================== tensor-name table
@dataclass(frozen=True)
class _Piece:
    """Where one HF tensor lives in moekit: the state-dict name `target`, optionally one
    expert (index along dim 0) and one half of a fused gate/up tensor.

    target None: a tensor moekit has no place for, accepted only because it cannot change
    the output (qwen2_moe's shared-expert tensors when shared_expert_intermediate_size=0);
    `shape` is then its expected shape and save_hf writes zeros.
    """

    target: Optional[str]
    expert: Optional[int] = None
    half: Optional[str] = None  # "gate": rows [:n], "up": rows [n:]
    shape: Optional[Tuple[int, ...]] = None
    optional: bool = False  # loading: may be absent (a tied lm_head.weight)

    @property
    def whole(self) -> bool:
        return self.expert is None and self.half is None


def _swiglu_keys(hf_prefix: str, target: str, names=("gate_proj", "up_proj", "down_proj")) -> Dict[str, _Piece]:
    gate, up, down = names
    return {
        f"{hf_prefix}{gate}.weight": _Piece(f"{target}w13", half="gate"),
        f"{hf_prefix}{up}.weight": _Piece(f"{target}w13", half="up"),
        f"{hf_prefix}{down}.weight": _Piece(f"{target}w2"),
    }


def _expert_keys(cfg: ModelConfig, model_type: str, i: int, layout: str) -> Dict[str, _Piece]:
    moe, t = cfg.moe, f"layers.{i}.ffn."
    mixtral_per_expert = model_type == "mixtral" and layout == "per_expert"
    p = f"model.layers.{i}." + ("block_sparse_moe." if mixtral_per_expert else "mlp.")
    table = {p + "gate.weight": _Piece(t + "router.weight")}
    if layout == "fused":
        table[p + "experts.gate_up_proj"] = _Piece(t + "experts.w13")
        table[p + "experts.down_proj"] = _Piece(t + "experts.w2")
    else:
        names = ("w1", "w3", "w2") if model_type == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(moe.num_experts):
            for key, piece in _swiglu_keys(f"{p}experts.{e}.", t + "experts.", names).items():
                table[key] = _Piece(piece.target, expert=e, half=piece.half)
    if model_type == "qwen2_moe":
        if moe.shared_dim:
            table.update(_swiglu_keys(p + "shared_expert.", t + "shared."))
            table[p + "shared_expert_gate.weight"] = _Piece(t + "shared_gate.weight")
        else:
            D = cfg.d_model
            for name, shape in (("gate_proj", (0, D)), ("up_proj", (0, D)), ("down_proj", (D, 0))):
                table[f"{p}shared_expert.{name}.weight"] = _Piece(None, shape=shape)
            table[p + "shared_expert_gate.weight"] = _Piece(None, shape=(1, D))
    return table


def _key_table(cfg: ModelConfig, model_type: str, layout: str) -> Dict[str, _Piece]:
    """HF tensor name -> _Piece for one architecture and expert layout, in file order."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    table = {"model.embed_tokens.weight": _Piece("embed.weight")}
    for i in range(cfg.n_layers):
        p, t = f"model.layers.{i}.", f"layers.{i}."
        table[p + "input_layernorm.weight"] = _Piece(t + "attn_norm.weight")
        for x in "qkvo":
            table[f"{p}self_attn.{x}_proj.weight"] = _Piece(f"{t}attn.{x}_proj.weight")
        if cfg.attention_bias:
            for x in "qkv":
                table[f"{p}self_attn.{x}_proj.bias"] = _Piece(f"{t}attn.{x}_proj.bias")
        if cfg.qk_norm is not None:
            for x in "qk":
                table[f"{p}self_attn.{x}_norm.weight"] = _Piece(f"{t}attn.{x}_norm.weight")
        table[p + "post_attention_layernorm.weight"] = _Piece(t + "ffn_norm.weight")
        if cfg.is_dense_layer(i):
            table.update(_swiglu_keys(p + "mlp.", t + "ffn."))
        else:
            table.update(_expert_keys(cfg, model_type, i, layout))
    table["model.norm.weight"] = _Piece("norm.weight")
    if not cfg.tie_embeddings:
        table["lm_head.weight"] = _Piece("lm_head.weight")
    return table


def _piece_view(full: torch.Tensor, piece: _Piece) -> torch.Tensor:
    view = full if piece.expert is None else full[piece.expert]
    if piece.half is not None:
        n = view.shape[0] // 2
        view = view[:n] if piece.half == "gate" else view[n:]
    return view


def _piece_shape(full_shape: Tuple[int, ...], piece: _Piece) -> Tuple[int, ...]:
    if piece.target is None:
        return piece.shape
    shape = list(full_shape if piece.expert is None else full_shape[1:])
    if piece.half is not None:
        shape[0] //= 2
    return tuple(shape)


# =============================================================== progress
class _Progress:
    """tqdm on stderr when importable, else a plain counter line; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.count, self._bar = total, desc, enabled, 0, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="tensor")

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (self.count == self.total or self.count % 64 == 0):
            print(f"\r{self.desc}: {self.count}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)


# =============================================================== load
def _safetensors():
    """(safe_open, save_file), or a clear ImportError."""
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("HF checkpoints need the 'safetensors' package: pip install safetensors (or moekit[hf])") from err
    return safe_open, save_file


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"HF checkpoint {str(path)!r} is not a directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"no {CONFIG_FILE} in {str(path)!r}: not an HF checkpoint directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from err


def _weight_files(path: Path) -> List[Path]:
    """The safetensors files: one model.safetensors or the shards an index names."""
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {str(path)!r} names shard files that do not exist: {missing}")
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ValueError(f"no weights in {str(path)!r}: expected {SINGLE_FILE} or {INDEX_FILE}")


def _load_table(cfg: ModelConfig, model_type: str) -> Dict[str, _Piece]:
    """Both layouts: a checkpoint may hold either (even mixed per layer). A tied model's
    checkpoint may still hold lm_head.weight; load_hf accepts it when it equals the embedding."""
    table = _key_table(cfg, model_type, "per_expert")
    table.update(_key_table(cfg, model_type, "fused"))
    if cfg.tie_embeddings:
        table["lm_head.weight"] = _Piece("lm_head.weight", optional=True)
    return table


def _listing(keys: List[str], limit: int = 8) -> str:
    """'a', 'b' and 3 more"""
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


class _StateBuilder:
    """Collects moekit tensors from HF pieces, checking shapes and coverage."""

    def __init__(self, table: Dict[str, _Piece], shapes: Dict[str, torch.Size], dtype, device):
        self.table, self.shapes, self.dtype, self.device = table, shapes, dtype, device
        self.state: Dict[str, torch.Tensor] = {}
        self.read: Dict[str, List[str]] = defaultdict(list)  # target -> HF keys read
        self.unexpected: List[str] = []

    def expected_shape(self, key: str) -> Optional[Tuple[int, ...]]:
        piece = self.table.get(key)
        if piece is None:
            return None
        return _piece_shape(tuple(self.shapes[piece.target]) if piece.target else (), piece)

    def add(self, key: str, tensor: torch.Tensor) -> None:
        piece = self.table[key]
        if piece.target is None:
            return
        self.read[piece.target].append(key)
        if piece.whole:
            self.state[piece.target] = tensor.to(self.device, self.dtype)
            return
        full = self.state.get(piece.target)
        if full is None:
            full = self.state[piece.target] = torch.empty(self.shapes[piece.target], dtype=self.dtype, device=self.device)
        _piece_view(full, piece).copy_(tensor)

    def check_complete(self) -> None:
        if self.unexpected:
            raise ValueError(
                f"unexpected tensors in the checkpoint (moekit has no place for them): {_listing(self.unexpected)}"
            )
        keys_by_target: Dict[str, List[str]] = defaultdict(list)
        for key, piece in self.table.items():
            if piece.target is not None:
                keys_by_target[piece.target].append(key)
        missing: List[str] = []
        for target, keys in keys_by_target.items():
            if target in self.read or not all(self.table[k].optional for k in keys):
                missing += self._missing_for(target, keys)
        if missing:
            raise ValueError(f"missing tensors in the checkpoint: {', '.join(missing[:8])}"
                             + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))

    def _missing_for(self, target: str, keys: List[str]) -> List[str]:
        """Descriptions of what `target` still lacks: one whole tensor, or every per-expert piece."""
        got = self.read.get(target, [])
        whole_got = [k for k in got if self.table[k].whole]
        if len(whole_got) > 1 or (whole_got and len(got) > len(whole_got)):
            raise ValueError(f"tensors {_listing(got)} all provide {target!r}; a checkpoint must hold only one of them")
        if whole_got:
            return []
        whole_keys = [k for k in keys if self.table[k].whole]
        part_keys = [k for k in keys if not self.table[k].whole]
        if got or not whole_keys:  # (some) pieces read: every piece is needed
            got_set = set(got)
            return [repr(k) for k in part_keys if k not in got_set]
        alternatives = " or ".join(repr(k) for k in whole_keys)
        if part_keys:
            alternatives += f" (or its per-expert tensors such as {part_keys[0]!r})"
        return [alternatives]


def _read_weights(files: List[Path], builder: _StateBuilder, progress: bool) -> None:
    safe_open, _ = _safetensors()
    seen = set()
    total = 0
    if progress:  # headers only
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                total += len(list(f.keys()))
    bar = _Progress(total, "loading tensors", progress)
    for file in files:  # one shard open at a time
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in seen:
                    raise ValueError(f"tensor {key!r} appears in more than one shard")
                seen.add(key)
                want = builder.expected_shape(key)
                if want is None:
                    builder.unexpected.append(key)
                    continue
                found = tuple(f.get_slice(key).get_shape())
                if found != want:
                    raise ValueError(f"tensor {key!r} has shape {found}, expected {want} (from {file.name})")
                builder.add(key, f.get_tensor(key))
                bar.update()
    bar.close()


def _fold_attention_factor(model: Transformer, factor: float) -> None:
    """Scale q and k by `factor` so scores match transformers' YaRN cos/sin scaling (RoPE is linear)."""
    with torch.no_grad():
        for block in model.layers:
            attn = block.attn
            for module in ((attn.q_norm, attn.k_norm) if attn.q_norm is not None else (attn.q_proj, attn.k_proj)):
                for param in module.parameters():
                    param.mul_(factor)


def _check_tied_head(state: Dict[str, torch.Tensor]) -> None:
    """A stored lm_head.weight of a tied model must equal the embedding (transformers would untie)."""
    head = state.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, state["embed.weight"]):
        raise ValueError("config.json has tie_word_embeddings=true but the checkpoint's lm_head.weight differs from "
                         "model.embed_tokens.weight; set tie_word_embeddings to false to load both")


def _materialize(model: Transformer, state: Dict[str, torch.Tensor], device) -> None:
    """Assign the loaded tensors to the meta-device model (no second copy); zero the buffers
    HF does not store (expert_bias, token counters) and rebuild the RoPE table."""
    buffers = {name for name, _ in model.named_buffers()}
    for name, meta in model.state_dict().items():
        if name in state:
            continue
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            state[name] = state["embed.weight"]
        else:
            assert name in buffers, f"internal: no HF tensor maps to parameter {name!r}"
            state[name] = torch.zeros(meta.shape, dtype=meta.dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = rope_inv_freq(model.cfg).to(device)


def load_hf(path: PathLike, dtype=None, device="cpu", progress: bool = False) -> Transformer:
    """Load an HF checkpoint directory as a moekit Transformer (eval mode).

    dtype: torch.dtype or name; None keeps config.json's dtype. Shards are read one at a
    time straight into the final tensors. `model.tokenizer` is the directory's
    tokenizer.json as a `tokenizers.Tokenizer`, or None.
    """
    path = Path(path)
    hf = _read_config(path)
    spec = _parse_hf_config(hf, _resolve_dtype(dtype))
    files = _weight_files(path)
    with torch.device("meta"):
        model = Transformer(spec.cfg)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    builder = _StateBuilder(_load_table(spec.cfg, spec.model_type), shapes, spec.cfg.torch_dtype, torch.device(device))
    _read_weights(files, builder, progress)
    builder.check_complete()
    if spec.cfg.tie_embeddings:
        _check_tied_head(builder.state)
    _materialize(model, builder.state, device)
    if spec.attention_factor != 1.0:
        _fold_attention_factor(model, spec.attention_factor)
    model.tokenizer = load_tokenizer(path)
    return model.eval()


# =============================================================== save
def _plan_shards(sizes: Dict[str, int], max_shard_bytes: int) -> List[List[str]]:
    shards: List[List[str]] = [[]]
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    return shards


def _shard_names(count: int) -> List[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def _remove_old_weights(path: Path) -> None:
    for old in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        if old.is_file():
            old.unlink()


def _hf_tensor(state: Dict[str, torch.Tensor], piece: _Piece, dtype: torch.dtype) -> torch.Tensor:
    if piece.target is None:
        return torch.zeros(piece.shape, dtype=dtype)
    # a copy: safetensors refuses views that share storage (experts of one w13)
    return _piece_view(state[piece.target].detach(), piece).to("cpu", dtype, copy=True).contiguous()


def save_hf(model: Transformer, path: PathLike, model_type: Optional[str] = None, layout: str = "per_expert",
            dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES, extra_config: Optional[dict] = None,
            progress: bool = False) -> Path:
    """Write `model` as an HF checkpoint directory that transformers loads with the same logits.

    model_type: one of SUPPORTED; None infers it (`infer_model_type`).
    layout: "per_expert" (hub / transformers save_pretrained format; loads in transformers 4
        and 5) or "fused" (3-D gate_up_proj/down_proj expert tensors; transformers >= 5 only).
    dtype: torch.dtype or name for the written tensors; None keeps the model's.
    max_shard_bytes: above this the weights are split into shards with an index file.
    extra_config: config.json entries to add (e.g. token ids); they never override ours.
    """
    _, save_file = _safetensors()
    if not isinstance(model, Transformer):
        raise ValueError(f"save_hf expects a moekit Transformer, got {type(model).__name__}")
    cfg = model.cfg
    model_type = model_type or infer_model_type(cfg)
    check_representable(model, model_type)
    dtype = _resolve_dtype(dtype) or model.embed.weight.dtype
    table = _key_table(cfg, model_type, layout)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    _remove_old_weights(path)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: math.prod(_piece_shape(shapes.get(p.target, ()), p)) * itemsize for key, p in table.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    names = _shard_names(len(shards))
    bar = _Progress(len(table), "writing tensors", progress)
    for keys, name in zip(shards, names):
        tensors = {}
        for key in keys:
            tensors[key] = _hf_tensor(state, table[key], dtype)
            bar.update()
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        weight_map = {key: name for keys, name in zip(shards, names) for key in keys}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    hf = config_to_hf(cfg, model_type, str(dtype).removeprefix("torch."))
    for key, value in (extra_config or {}).items():
        hf.setdefault(key, value)
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(path / TOKENIZER_FILE))
    return path


# =============================================================== command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moekit convert",
        description="Re-save an HF-format MoE checkpoint (change dtype, expert layout or architecture name). "
                    f"Reads and writes {', '.join(SUPPORTED)}.",
    )
    parser.add_argument("src", help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory (created; old weight files in it are replaced)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="dtype of the written weights (default: the source's)")
    parser.add_argument("--model-type", choices=SUPPORTED, default=None,
                        help="architecture to write (default: inferred; see moekit.hf.infer_model_type)")
    parser.add_argument("--layout", choices=LAYOUTS, default="per_expert",
                        help="expert tensors: per_expert (hub format, transformers 4 and 5) or fused (transformers >= 5)")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1024**3,
                        help="split the weights into shards of at most this many GiB (default: 2)")
    return parser


def _convert(args) -> None:
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError("DST must differ from SRC")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    source_config = _read_config(src)
    if args.model_type is not None:  # fail before reading the weights
        with torch.device("meta"):
            check_representable(Transformer(config_from_hf(source_config)), args.model_type, config_only=True)
    model = load_hf(src, dtype=args.dtype, progress=True)
    extra = {k: source_config[k] for k in TOKEN_ID_KEYS if source_config.get(k) is not None}
    save_hf(model, dst, model_type=args.model_type, layout=args.layout, max_shard_bytes=int(args.max_shard_gb * 1024**3),
            extra_config=extra, progress=True)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    print(f"wrote {dst} ({args.model_type or infer_model_type(model.cfg)}, {args.layout} layout)", file=sys.stderr)


def cli(argv: Optional[Iterable[str]] = None) -> int:
    """`moekit convert SRC DST [--dtype ...] [--model-type ...] [--layout ...]`; returns the exit code."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    try:
        _convert(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"moekit convert: error: {err}", file=sys.stderr)
        return 2
    return 0
