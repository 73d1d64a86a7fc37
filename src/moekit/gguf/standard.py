"""llama.cpp's plain-attention MoE architectures: qwen3moe, olmoe, llama (Mixtral layout, or dense)
and glm4moe. Which one holds a model (`standard_arch`; anything else is refused by name):

  qwen3moe  per-head q/k RMSNorm, softmax router with renormalised top-k gates, MoE in every layer
  olmoe     q/k RMSNorm over the whole projection, softmax router WITHOUT renormalisation (llama.cpp's
            olmoe never renormalises), MoE in every layer, head_dim * n_heads == d_model, no clip_qkv
  llama     no q/k norm, renormalised top-k gates, MoE in every layer (llama.cpp's Mixtral layout) or
            no MoE at all; q/k rows permuted from moekit's rotate-half RoPE to llama.cpp's interleaved
            pairs (as convert_hf_to_gguf.py does for llama/mixtral); RoPE over whole heads
  glm4moe   sigmoid router (+ the selection-only expert bias as exp_probs_b), one group, dense layers only
            first, shared experts of num_shared x d_expert, optional per-head q/k norm; zero q/k/v
            biases are written when the model has none (older llama.cpp requires them)

qwen3moe, olmoe and glm4moe rotate halves (llama.cpp's NEOX RoPE) over rope.dimension_count dims, so
partial rotary (GLM-4.5's rotary_dim) is written as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch

from ..hf.spec import gates_renormalised
from .common import (Tensor, add_attention_hparams, add_expert_hparams, float_state, permute_rotary,
                     refuse_rope_scaling, swiglu)


@dataclass(frozen=True)
class GgufArch:
    """What sets a llama.cpp architecture apart in the export (its checks are in `standard_arch`)."""

    name: str
    routers: Tuple[str, ...] = ("softmax_topk", "topk_softmax")  # moekit routers it computes exactly
    permute_qk: bool = False  # llama.cpp's llama RoPE rotates pairs (2i, 2i + 1): permute the q/k rows
    qkv_bias: bool = False  # q/k/v biases always written (zeros when the model has none)
    output_always: bool = False  # output.weight written even with tied embeddings
    ffn_norm: str = "ffn_norm"  # the GGUF name of the norm before the FFN
    router_bias_and_shared: bool = False  # exp_probs_b (the expert bias) and the _shexp tensors
    expert_sized_ffn: bool = False  # feed_forward_length holds the expert size (not d_ff)

    def tensors(self, model) -> Iterator[Tensor]:
        return standard_tensors(model, self)

    def hparams(self, writer, gguf, model) -> None:
        add_hparams(writer, gguf, model, self)


QWEN3MOE = GgufArch("qwen3moe")
LLAMA = GgufArch("llama", permute_qk=True, expert_sized_ffn=True)
OLMOE = GgufArch("olmoe", output_always=True, expert_sized_ffn=True)
GLM4MOE = GgufArch("glm4moe", routers=("sigmoid_topk",), qkv_bias=True, ffn_norm="post_attention_norm",
                   router_bias_and_shared=True)


def standard_arch(model) -> GgufArch:
    """The plain-attention llama.cpp architecture that runs `model` exactly; ValueError naming what it lacks."""
    cfg = model.cfg
    moe = cfg.moe
    if cfg.attention != "gqa":
        raise ValueError(f"attention={cfg.attention!r}: llama.cpp export supports moekit's gqa and mla attention only")
    if cfg.clip_qkv is not None:
        raise ValueError("clip_qkv is set: none of llama.cpp's qwen3moe, olmoe, llama or glm4moe clamps q/k/v")
    refuse_rope_scaling(cfg, ("linear",), "qwen3moe / olmoe / llama / glm4moe")
    unsupported = [f"experts with {m.experts.features()}" for m in model.moe_layers()[:1] if not m.experts.plain]
    unsupported += ["a router bias"] if moe is not None and moe.router_bias else []
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: the GGUF export writes qwen3moe / glm4moe / olmoe / llama, "
                         "which have none of these (gpt-oss needs attention sinks and swiglu_oai experts too)")
    dense = [i for i in range(cfg.n_layers) if cfg.is_dense_layer(i)]
    if moe is None:
        if cfg.qk_norm is not None or cfg.attention_bias:
            raise ValueError("a dense model exports as llama.cpp's llama architecture: no q/k norm, no q/k/v bias")
        return whole_head_rope(cfg, LLAMA)
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
    return QWEN3MOE if cfg.qk_norm == "head" else whole_head_rope(cfg, LLAMA)


def whole_head_rope(cfg, arch: GgufArch) -> GgufArch:
    if cfg.rope_dim != cfg.head_dim:
        raise ValueError(f"rotary_dim={cfg.rotary_dim}: llama.cpp's llama architecture rotates whole heads "
                         "(partial rotary exports with per-head q/k norm as qwen3moe, or as glm4moe)")
    return arch


def glm4moe_check(model, dense: List[int]) -> GgufArch:
    moe = model.cfg.moe
    if moe.num_groups != 1:
        raise ValueError(f"num_groups={moe.num_groups}: llama.cpp's glm4moe has no group-limited routing")
    if dense != list(range(len(dense))):
        raise ValueError(f"dense layers {dense}: llama.cpp's glm4moe has dense layers only first")
    if moe.num_shared_experts == 0 or moe.shared_gate or moe.shared_dim != moe.num_shared_experts * moe.d_expert:
        raise ValueError("llama.cpp's glm4moe needs ungated shared experts of num_shared_experts x d_expert")
    return GLM4MOE


def standard_tensors(model, arch: GgufArch) -> Iterator[Tensor]:
    cfg = model.cfg
    sd = float_state(model)
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


def add_hparams(writer, gguf, model, arch: GgufArch) -> None:
    cfg, moe = model.cfg, model.cfg.moe
    add_attention_hparams(writer, cfg, cfg.head_dim, cfg.head_dim, cfg.rope_dim)
    if moe is None:
        writer.add_feed_forward_length(cfg.d_ff)
        return
    add_expert_hparams(writer, moe, ffn_is_expert=arch.expert_sized_ffn)  # llama and olmoe: experts sized by it
    if not arch.expert_sized_ffn:
        writer.add_feed_forward_length(cfg.d_ff)
    if arch.router_bias_and_shared:
        writer.add_expert_shared_count(moe.num_shared_experts)
        writer.add_leading_dense_block_count(sum(cfg.is_dense_layer(i) for i in range(cfg.n_layers)))
        writer.add_expert_weights_scale(float(moe.routed_scaling_factor))
        writer.add_expert_weights_norm(bool(moe.norm_topk_prob))
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        writer.add_nextn_predict_layers(0)
