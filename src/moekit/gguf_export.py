"""`moekit export MODEL OUT.gguf --type f32|f16|q8_0|q4_0`: a GGUF file llama.cpp runs.

    from moekit.gguf_export import export_gguf, gguf_arch
    export_gguf(model, "out.gguf", "q8_0")     # model from moekit.loading.load_model

Which llama.cpp architecture holds a moekit model (`gguf_arch`; anything else is refused by name):

  qwen3moe  per-head q/k RMSNorm, softmax router with renormalised top-k gates, MoE in every layer
  olmoe     q/k RMSNorm over the whole projection, softmax router WITHOUT renormalisation (llama.cpp's
            olmoe never renormalises), MoE in every layer, head_dim * n_heads == d_model, no clip_qkv
  llama     no q/k norm, renormalised top-k gates, MoE in every layer (llama.cpp's Mixtral layout) or
            no MoE at all; q/k rows permuted from moekit's rotate-half RoPE to llama.cpp's interleaved
            pairs (as convert_hf_to_gguf.py does for llama/mixtral)
  glm4moe   sigmoid router (+ the selection-only expert bias as exp_probs_b), one group, dense layers only
            first, shared experts of num_shared x d_expert, optional per-head q/k norm; zero q/k/v
            biases are written when the model has none (older llama.cpp requires them)

Tensor types: norms, biases and routers are always f32 (as llama.cpp's converter); f16 casts every
matrix; q8_0 / q4_0 quantize every matrix whose input dim is a multiple of 32 with moekit's own
q8_0 / q4_0 (moekit.quantize.formats: bit-exact GGML block_q8_0 / block_q4_0), writing the packed
blocks as they are; other matrices fall back to f16. With q4_0 the output matrix is q8_0 (llama.cpp's
quantizer also keeps it at higher precision). The tokenizer (moekit's GPT-2-style byte-level BPE)
goes in as tokenizer.ggml.model "gpt2" with the "gpt-2" pre-tokenizer, bos = eos = end-of-text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from . import cliargs
from .hf.spec import gates_renormalised
from .loading import load_model
from .quantize import get_format
from .server.chat_template import template_source
from .tokens import end_of_text_id

TYPES = ("f32", "f16", "q8_0", "q4_0")
QBLOCK = 32  # values per GGML Q8_0 / Q4_0 block


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("moekit export needs the 'gguf' package: pip install gguf (or moekit[hf])") from None
    return gguf


# ---------------------------------------------------------------------------- which architecture
@dataclass(frozen=True)
class GgufArch:
    """What sets a llama.cpp architecture apart in the export (its checks are in `gguf_arch`)."""

    name: str
    routers: Tuple[str, ...] = ("softmax_topk", "topk_softmax")  # moekit routers it computes exactly
    permute_qk: bool = False  # llama.cpp's llama RoPE rotates pairs (2i, 2i + 1): permute the q/k rows
    qkv_bias: bool = False  # q/k/v biases always written (zeros when the model has none)
    output_always: bool = False  # output.weight written even with tied embeddings
    ffn_norm: str = "ffn_norm"  # the GGUF name of the norm before the FFN
    router_bias_and_shared: bool = False  # exp_probs_b (the expert bias) and the _shexp tensors
    expert_sized_ffn: bool = False  # feed_forward_length holds the expert size (not d_ff)


QWEN3MOE = GgufArch("qwen3moe")
LLAMA = GgufArch("llama", permute_qk=True, expert_sized_ffn=True)
OLMOE = GgufArch("olmoe", output_always=True, expert_sized_ffn=True)
GLM4MOE = GgufArch("glm4moe", routers=("sigmoid_topk",), qkv_bias=True, ffn_norm="post_attention_norm",
                   router_bias_and_shared=True)


def gguf_arch(model) -> GgufArch:
    """The llama.cpp architecture that runs `model` exactly; ValueError naming what it lacks."""
    cfg = model.cfg
    moe = cfg.moe
    if cfg.attention != "gqa":
        raise ValueError(f"attention={cfg.attention!r}: llama.cpp export supports moekit's gqa attention only")
    if cfg.rope_dim != cfg.head_dim:
        raise ValueError(f"rotary_dim={cfg.rotary_dim}: the export writes RoPE over whole heads only")
    if cfg.clip_qkv is not None:
        raise ValueError("clip_qkv is set: none of llama.cpp's qwen3moe, olmoe, llama or glm4moe clamps q/k/v")
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("type") != "linear":
        raise ValueError(f"rope_scaling {cfg.rope_scaling['type']!r}: the export writes plain or linear RoPE only")
    unsupported = [name for name, on in (
        ("sliding-window or linear-attention layers (layer_types)", any(t != "full" for t in cfg.layer_types)),
        ("attention sinks", getattr(cfg, "attention_sinks", False)), ("attn_output_gate", cfg.attn_output_gate),
        ("zero_centred_norm", cfg.zero_centred_norm)) if on]
    unsupported += [f"experts with {m.experts.features()}" for m in model.moe_layers()[:1] if not m.experts.plain]
    unsupported += ["a router bias"] if moe is not None and moe.router_bias else []
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: the GGUF export writes qwen3moe / glm4moe / olmoe / llama, "
                         "which have none of these")
    dense = [i for i in range(cfg.n_layers) if cfg.is_dense_layer(i)]
    if moe is None:
        if cfg.qk_norm is not None or cfg.attention_bias:
            raise ValueError("a dense model exports as llama.cpp's llama architecture: no q/k norm, no q/k/v bias")
        return LLAMA
    if moe.token_rounding is not None:
        raise ValueError(f"token_rounding={moe.token_rounding!r}: llama.cpp routes every token to exactly top_k experts")
    if moe.router in GLM4MOE.routers:
        return glm4moe_check(model, dense)
    if moe.router not in QWEN3MOE.routers:
        raise ValueError(f"router={moe.router!r}: llama.cpp's MoE architectures route with a softmax or sigmoid top-k")
    if any(bool(layer.ffn.router.expert_bias.any()) for layer in model.layers if layer.is_moe):
        raise ValueError("a softmax router with a nonzero expert bias: llama.cpp has a selection bias only "
                         "in glm4moe (sigmoid router)")
    if moe.num_shared_experts or moe.routed_scaling_factor != 1.0 or cfg.attention_bias:
        raise ValueError("shared experts, routed_scaling_factor != 1 or q/k/v bias with a softmax router: "
                         "llama.cpp's qwen3moe / olmoe / llama hold none of them")
    if dense:
        raise ValueError(f"dense layers {dense} in an MoE model: llama.cpp's qwen3moe / olmoe / llama have "
                         "MoE in every layer")
    renorm = gates_renormalised(moe)
    if cfg.qk_norm == "full":
        if renorm:
            raise ValueError("qk_norm='full' (olmoe) with renormalised top-k gates: llama.cpp's olmoe never renormalises "
                             "(set norm_topk_prob=False with router='softmax_topk')")
        if cfg.head_dim * cfg.n_heads != cfg.d_model:
            raise ValueError("olmoe needs head_dim * n_heads == d_model")
        return OLMOE
    if not renorm:
        raise ValueError("norm_topk_prob=False: llama.cpp's qwen3moe and llama (Mixtral) always renormalise the top-k gates")
    return QWEN3MOE if cfg.qk_norm == "head" else LLAMA


def glm4moe_check(model, dense: List[int]) -> GgufArch:
    cfg, moe = model.cfg, model.cfg.moe
    if moe.num_groups != 1:
        raise ValueError(f"num_groups={moe.num_groups}: llama.cpp's glm4moe has no group-limited routing")
    if dense != list(range(len(dense))):
        raise ValueError(f"dense layers {dense}: llama.cpp's glm4moe has dense layers only first")
    if moe.num_shared_experts == 0 or moe.shared_gate or moe.shared_dim != moe.num_shared_experts * moe.d_expert:
        raise ValueError("llama.cpp's glm4moe needs ungated shared experts of num_shared_experts x d_expert")
    if cfg.qk_norm == "full":
        raise ValueError("qk_norm='full' with a sigmoid router: llama.cpp's glm4moe normalises q/k per head")
    return GLM4MOE


# ---------------------------------------------------------------------------- tensors
def permute_rotary(w_ND: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half RoPE (pairs i, i + Dh/2) to llama.cpp's llama RoPE
    (pairs 2i, 2i + 1): within each head, new row 2i = old row i, new row 2i + 1 = old row i + Dh/2."""
    N, D = w_ND.shape
    return w_ND.reshape(n_heads, 2, N // n_heads // 2, D).transpose(1, 2).reshape(N, D)


def gguf_tensors(model, arch: GgufArch) -> Iterator[Tuple[str, torch.Tensor, str]]:
    """(GGUF name, float32 tensor, role) for every tensor; role "matrix", "embed", "output" or "f32"."""
    cfg = model.cfg
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    yield "token_embd.weight", sd["embed.weight"], "embed"
    for i, layer in enumerate(model.layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k = sd[p + "attn.q_proj.weight"], sd[p + "attn.k_proj.weight"]
        if arch.permute_qk:
            q, k = permute_rotary(q, cfg.n_heads), permute_rotary(k, cfg.n_kv_heads)
        yield b + "attn_norm.weight", sd[p + "attn_norm.weight"], "f32"
        yield b + "attn_q.weight", q, "matrix"
        yield b + "attn_k.weight", k, "matrix"
        yield b + "attn_v.weight", sd[p + "attn.v_proj.weight"], "matrix"
        yield b + "attn_output.weight", sd[p + "attn.o_proj.weight"], "matrix"
        for name, n in (("q", cfg.n_heads), ("k", cfg.n_kv_heads)):
            if cfg.qk_norm is not None:
                yield b + f"attn_{name}_norm.weight", sd[p + f"attn.{name}_norm.weight"], "f32"
            if arch.qkv_bias or cfg.attention_bias:
                yield b + f"attn_{name}.bias", sd.get(p + f"attn.{name}_proj.bias", torch.zeros(n * cfg.head_dim)), "f32"
        if arch.qkv_bias or cfg.attention_bias:
            yield b + "attn_v.bias", sd.get(p + "attn.v_proj.bias", torch.zeros(cfg.n_kv_heads * cfg.head_dim)), "f32"
        yield b + f"{arch.ffn_norm}.weight", sd[p + "ffn_norm.weight"], "f32"
        f = p + "ffn."
        if not layer.is_moe:
            yield from swiglu(b, "", sd[f + "w13"], sd[f + "w2"])
            continue
        yield b + "ffn_gate_inp.weight", sd[f + "router.weight"], "f32"
        if arch.router_bias_and_shared:
            yield b + "exp_probs_b.bias", sd[f + "router.expert_bias"], "f32"
            yield from swiglu(b, "_shexp", sd[f + "shared.w13"], sd[f + "shared.w2"])
        yield from swiglu(b, "_exps", sd[f + "experts.w13"], sd[f + "experts.w2"])
    yield "output_norm.weight", sd["norm.weight"], "f32"
    if not cfg.tie_embeddings or arch.output_always:
        yield "output.weight", sd.get("lm_head.weight", sd["embed.weight"]), "output"


def swiglu(b: str, suffix: str, w13: torch.Tensor, w2: torch.Tensor):
    """moekit's fused w13 ((E,) 2F, D: gate rows, then up rows) and w2 -> ffn_gate/up/down{suffix}."""
    F = w13.shape[-2] // 2
    yield b + f"ffn_gate{suffix}.weight", w13[..., :F, :], "matrix"
    yield b + f"ffn_up{suffix}.weight", w13[..., F:, :], "matrix"
    yield b + f"ffn_down{suffix}.weight", w2, "matrix"


def tensor_type(role: str, w: torch.Tensor, file_type: str) -> str:
    """The GGML type one tensor is written in (see the module docstring)."""
    if role == "f32" or w.dim() < 2 or file_type == "f32":
        return "f32"
    if file_type == "f16" or w.shape[-1] % QBLOCK:
        return "f16"
    return "q8_0" if file_type == "q4_0" and role == "output" else file_type


def ggml_blocks(packed: Dict[str, torch.Tensor]) -> np.ndarray:
    """moekit's packed q8_0 / q4_0 buffers (..., K) -> GGML blocks [fp16 d, codes] as bytes (..., K/32 * block)."""
    scale_B = packed["scale"].contiguous().numpy().view(np.uint8)  # (..., NB * 2)
    codes = packed["qweight"].contiguous().numpy().view(np.uint8)  # (..., NB * code bytes)
    NB = scale_B.shape[-1] // 2
    lead = codes.shape[:-1]
    blocks = np.concatenate([scale_B.reshape(*lead, NB, 2), codes.reshape(*lead, NB, -1)], axis=-1)
    return blocks.reshape(*lead, -1)


def add_tensor(writer, gguf, name: str, w: torch.Tensor, kind: str) -> None:
    if kind == "f32":
        writer.add_tensor(name, w.contiguous().numpy().astype(np.float32))
    elif kind == "f16":
        writer.add_tensor(name, w.to(torch.float16).contiguous().numpy())
    else:
        blocks = ggml_blocks(get_format(kind).quantize(w))
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind.upper()])


# ---------------------------------------------------------------------------- metadata
def add_hparams(writer, gguf, model, arch: GgufArch) -> None:
    cfg, moe = model.cfg, model.cfg.moe
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    if cfg.rope_scaling is not None:  # linear (gguf_arch refuses the others)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if moe is None:
        writer.add_feed_forward_length(cfg.d_ff)
        return
    writer.add_expert_count(moe.num_experts)
    writer.add_expert_used_count(moe.top_k)
    writer.add_expert_feed_forward_length(moe.d_expert)
    # llama and olmoe size their experts with feed_forward_length
    writer.add_feed_forward_length(moe.d_expert if arch.expert_sized_ffn else cfg.d_ff)
    if arch.router_bias_and_shared:
        writer.add_expert_shared_count(moe.num_shared_experts)
        writer.add_leading_dense_block_count(sum(cfg.is_dense_layer(i) for i in range(cfg.n_layers)))
        writer.add_expert_weights_scale(float(moe.routed_scaling_factor))
        writer.add_expert_weights_norm(bool(moe.norm_topk_prob))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_nextn_predict_layers(0)


def add_tokenizer(writer, gguf, tokenizer, vocab_size: int) -> None:
    """moekit's byte-level BPE as llama.cpp's "gpt2" tokenizer with the GPT-2 pre-tokenizer."""
    if tokenizer is None:
        raise ValueError("the checkpoint has no tokenizer.json: llama.cpp needs the vocabulary in the GGUF")
    data = json.loads(tokenizer.to_str())
    model, pre = data.get("model") or {}, data.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) \
            or pre.get("add_prefix_space"):
        raise ValueError("the tokenizer is not moekit's GPT-2-style byte-level BPE; the export writes only that kind")
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size or max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has ids beyond the model's vocab_size={vocab_size}")
    special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # ids the tokenizer never produces (as convert_hf_to_gguf)
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eot = end_of_text_id(tokenizer)
    if eot is not None:
        writer.add_bos_token_id(eot)
        writer.add_eos_token_id(eot)
    writer.add_add_bos_token(False)  # moekit encodes prompts as they are


def checkpoint_chat_template(path: Path) -> Optional[str]:
    """The Jinja chat template a checkpoint carries (tokenizer_config.json or chat_template.jinja), if any."""
    found = template_source(path)
    return None if found is None else found[0]


# ---------------------------------------------------------------------------- the export
def export_gguf(model, out, file_type: str = "f16", chat_template: Optional[str] = None) -> str:
    """Write `model` (with `model.tokenizer`) as a GGUF file at `out`; returns the architecture name."""
    if file_type not in TYPES:
        raise ValueError(f"unknown --type {file_type!r}; choose one of {', '.join(TYPES)}")
    if getattr(model, "quantization", None):
        raise ValueError("the checkpoint is already quantized (moekit quantize); export from the float checkpoint")
    gguf = require_gguf()
    arch = gguf_arch(model)
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"output {str(out)!r} is a directory; give a file name such as model.gguf")
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch.name)
    try:
        writer.add_name(model.cfg.name)
        file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
        writer.add_file_type(gguf.LlamaFileType[file_types[file_type]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hparams(writer, gguf, model, arch)
        add_tokenizer(writer, gguf, getattr(model, "tokenizer", None), model.cfg.vocab_size)
        if chat_template:
            writer.add_chat_template(chat_template)
        with torch.no_grad():
            for name, w, role in gguf_tensors(model, arch):
                add_tensor(writer, gguf, name, w, tensor_type(role, w, file_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return arch.name


def cli(argv: List[str]) -> int:
    parser = cliargs.parser("moekit export", "Write a GGUF file llama.cpp runs (qwen3moe, olmoe, llama/Mixtral, "
                            "glm4moe).")
    parser.add_argument("model", help="a moekit checkpoint, training run directory or HF checkpoint")
    parser.add_argument("out", help="the GGUF file to write")
    parser.add_argument("--type", default="f16", choices=TYPES, help="tensor type")
    args = parser.parse_args(argv)
    if args.type not in TYPES:
        raise ValueError(f"unknown --type {args.type!r}; choose one of {', '.join(TYPES)}")
    model = load_model(args.model, dtype=torch.float32)
    arch = export_gguf(model, args.out, args.type, checkpoint_chat_template(Path(args.model)))
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: llama.cpp architecture {arch}, {args.type}, {size / 2**20:.1f} MiB")
    return 0
