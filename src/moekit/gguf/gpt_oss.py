"""gpt-oss as llama.cpp's "gpt-oss" architecture: attention sinks (attn_sinks), q/k/v/o biases, even
layers sliding-window and odd layers full (llama.cpp's fixed pattern), a router bias
(ffn_gate_inp.bias) with a softmax over the top-k logits, experts with biases and the clamped SwiGLU
(llama.cpp's fixed alpha 1.702, limit 7.0), RoPE over whole heads (plain, or YaRN).

Experts held as mxfp4 (a gpt-oss checkpoint loaded packed) are written as GGML MXFP4 blocks with
the same codes and exponents (`mxfp4_ggml_blocks`), whatever --type the other matrices get.

YaRN: moekit folds transformers' cos/sin attention factor into q and k on load, so the export sets
rope.scaling.attn_factor to cancel llama.cpp's own YaRN factor (0.1 ln s + 1). llama.cpp rounds the YaRN
ramp's ends to whole dims (transformers' truncate=True); gpt-oss's truncate=False keeps them
fractional, so llama.cpp's frequencies in the ramp differ from moekit's there (as for every gpt-oss
GGUF, llama.cpp's converter included).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from .common import (Tensor, add_attention_hparams, add_expert_hparams, float_state, mxfp4_ggml_blocks,
                     refuse_rope_scaling, swiglu)

ALPHA, LIMIT = 1.702, 7.0  # llama.cpp's LLM_FFN_SWIGLU_OAI_MOE constants


class GptOss:
    name = "gpt-oss"

    def check(self, model) -> "GptOss":
        cfg, moe = model.cfg, model.cfg.moe
        problems = []
        if cfg.attention != "gqa":
            problems.append(f"attention={cfg.attention!r}")
        if moe is None or any(cfg.is_dense_layer(i) for i in range(cfg.n_layers)):
            problems.append("dense layers (llama.cpp's gpt-oss has MoE in every layer)")
        if not cfg.attention_sinks:
            problems.append("no attention sinks")
        pattern = tuple("sliding" if i % 2 == 0 else "full" for i in range(cfg.n_layers))
        if cfg.layer_types != pattern:
            problems.append(f"layer_types {list(cfg.layer_types) or 'all full'} (llama.cpp's gpt-oss slides on even "
                            "layers and attends fully on odd ones)")
        if cfg.qk_norm is not None or cfg.clip_qkv is not None or cfg.attn_output_gate or cfg.zero_centred_norm:
            problems.append("q/k norm, clip_qkv, attn_output_gate or zero_centred_norm")
        if cfg.rope_dim != cfg.head_dim:
            problems.append(f"rotary_dim={cfg.rotary_dim} (RoPE over whole heads only)")
        if moe is not None:
            if moe.activation != "swiglu_oai" or (moe.swiglu_alpha, moe.swiglu_limit) != (ALPHA, LIMIT):
                problems.append(f"activation={moe.activation!r} alpha={moe.swiglu_alpha} limit={moe.swiglu_limit} "
                                f"(llama.cpp computes swiglu_oai with alpha {ALPHA}, limit {LIMIT})")
            if not (moe.router == "topk_softmax" or (moe.router == "softmax_topk" and moe.norm_topk_prob)):
                problems.append(f"router={moe.router!r} (llama.cpp's gpt-oss takes a softmax over the top-k logits)")
            if moe.num_shared_experts or moe.routed_scaling_factor != 1.0 or moe.token_rounding is not None:
                problems.append("shared experts, routed_scaling_factor != 1 or token_rounding")
            if any(bool(layer.ffn.router.expert_bias.any()) for layer in model.layers if layer.is_moe):
                problems.append("a nonzero expert selection bias")
        if problems:
            raise ValueError(f"{'; '.join(problems)}: llama.cpp's gpt-oss cannot hold this model")
        refuse_rope_scaling(cfg, ("yarn",), "gpt-oss")
        return self

    def tensors(self, model) -> Iterator[Tensor]:
        sd = float_state(model)
        yield "token_embd.weight", sd["embed.weight"], "embed"
        for i, layer in enumerate(model.layers):
            p, b = f"layers.{i}.", f"blk.{i}."
            yield b + "attn_norm.weight", sd[p + "attn_norm.weight"], "f32"
            for name, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
                w = sd[p + f"attn.{proj}.weight"]
                yield b + f"attn_{name}.weight", w, "matrix"
                yield b + f"attn_{name}.bias", sd.get(p + f"attn.{proj}.bias", torch.zeros(w.shape[0])), "f32"
            yield b + "attn_sinks.weight", sd[p + "attn.sinks"], "f32"
            yield b + "post_attention_norm.weight", sd[p + "ffn_norm.weight"], "f32"
            f = p + "ffn."
            router = sd[f + "router.weight"]
            yield b + "ffn_gate_inp.weight", router, "f32"
            yield b + "ffn_gate_inp.bias", sd.get(f + "router.bias", torch.zeros(router.shape[0])), "f32"
            yield from self.experts(b, layer.ffn.experts, sd, f + "experts.")
        yield "output_norm.weight", sd["norm.weight"], "f32"
        yield "output.weight", sd.get("lm_head.weight", sd["embed.weight"]), "output"

    @staticmethod
    def experts(b: str, experts, sd, e: str) -> Iterator[Tensor]:
        w13, w2 = experts.w13, experts.w2
        if getattr(w13, "method", None) == "mxfp4":
            yield from swiglu(b, "_exps", mxfp4_ggml_blocks(w13.qweight, w13.scale),
                              mxfp4_ggml_blocks(w2.qweight, w2.scale), "mxfp4")
        else:
            yield from swiglu(b, "_exps", sd[e + "w13"], sd[e + "w2"])
        E, F2 = w13.shape[0], w13.shape[-2]
        b13 = sd.get(e + "b13", torch.zeros(E, F2))
        yield b + "ffn_gate_exps.bias", b13[:, : F2 // 2], "f32"
        yield b + "ffn_up_exps.bias", b13[:, F2 // 2:], "f32"
        yield b + "ffn_down_exps.bias", sd.get(e + "b2", torch.zeros(E, w2.shape[-2])), "f32"

    def hparams(self, writer, gguf, model) -> None:
        cfg, moe = model.cfg, model.cfg.moe
        add_attention_hparams(writer, cfg, cfg.head_dim, cfg.head_dim, cfg.head_dim)
        add_expert_hparams(writer, moe)
        writer.add_sliding_window(cfg.sliding_window)
        scaling = cfg.rope_scaling
        if scaling is not None:
            writer.add_rope_scaling_yarn_beta_fast(float(scaling.get("beta_fast", 32.0)))
            writer.add_rope_scaling_yarn_beta_slow(float(scaling.get("beta_slow", 1.0)))
            factor = float(scaling["factor"])
            writer.add_rope_scaling_attn_factors(1.0 / (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0)
