"""Qwen3-Next / Qwen3.5-MoE hybrids as llama.cpp's "qwen3next" (fused `in_proj_qkvz` / `in_proj_ba`,
`ModelConfig.linear_fused_proj=True`) or "qwen35moe" (split `in_proj_qkv` / `_z` / `_b` / `_a`).

Full-attention layers: q_proj with the output gate per head ([query, gate], as llama.cpp splits it) as
attn_q, per-head q/k RMSNorm, NEOX RoPE over rope.dimension_count dims (partial rotary as it is).
Gated DeltaNet ("linear") layers:
  qwen3next  ssm_in = in_proj_qkvz (per key head [q, k, v, z]), ssm_ba = in_proj_ba (per key head [b, a])
  qwen35moe  attn_qkv = in_proj_qkv, attn_gate = in_proj_z, ssm_beta = in_proj_b, ssm_alpha = in_proj_a
  both       ssm_conv1d (C, K), ssm_dt.bias = dt_bias, ssm_a = -exp(A_log), ssm_norm, ssm_out
qwen35moe's delta rule pairs value head h with key head h % Hk (a tiled repeat) where transformers and
moekit pair it with h // R (repeat_interleave), so its value heads are written reordered (h = r Hk + j
holds moekit's head j R + r): the v rows of attn_qkv and ssm_conv1d, attn_gate, ssm_beta / ssm_alpha,
ssm_dt / ssm_a and the columns of ssm_out (as llama.cpp's converter does).
qwen35moe rotates with M-RoPE sections; text positions are equal in the three used sections (the
fourth, 0 wide, gets position 0), so this is the same NEOX rotation.

Zero-centred norms (x * (1 + w), `zero_centred_norm`) are written as 1 + w, llama.cpp's plain RMSNorm
weight; the gated DeltaNet output norm (ssm_norm) is a plain weight already. The layer pattern goes in
as full_attention_interval: full attention every n-th layer, Gated DeltaNet between. MoE in every
layer: a softmax router with renormalised top-k gates, one sigmoid-gated shared expert
(ffn_gate_inp_shexp). llama.cpp's l2-norm of q / k clamps the norm at rms_norm_eps where moekit adds
1e-6 under the root: equal to float rounding at unit-scale activations.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..hf.spec import gates_renormalised
from .common import Tensor, add_attention_hparams, add_expert_hparams, float_state, refuse_rope_scaling, swiglu


class Qwen3Next:
    """Either architecture: `fused` (ModelConfig.linear_fused_proj) picks the projection layout and the name."""

    def __init__(self, fused: bool):
        self.fused = fused
        self.name = "qwen3next" if fused else "qwen35moe"

    @staticmethod
    def interval(cfg):
        """n with layer i full attention exactly when (i + 1) % n == 0, or None."""
        types = tuple(cfg.layer_types) or ("full",) * cfg.n_layers
        n = types.index("full") + 1 if "full" in types else 0
        want = tuple("full" if n and (i + 1) % n == 0 else "linear" for i in range(cfg.n_layers))
        return n if n and types == want else None

    def check(self, model) -> "Qwen3Next":
        cfg, moe = model.cfg, model.cfg.moe
        problems = []
        if self.interval(cfg) is None:
            problems.append(f"layer_types {list(cfg.layer_types)} (llama.cpp has full attention every n-th layer "
                            "and Gated DeltaNet layers between)")
        if cfg.attention != "gqa" or not cfg.attn_output_gate or cfg.qk_norm != "head":
            problems.append("attention without attn_output_gate or per-head q/k norm (llama.cpp's gated attention "
                            "needs both)")
        if cfg.attention_bias or cfg.attention_out_bias or cfg.clip_qkv is not None or cfg.attention_sinks:
            problems.append("attention biases, clip_qkv or sinks")
        if "linear" in cfg.layer_types and cfg.linear_key_head_dim != cfg.linear_value_head_dim:
            problems.append(f"linear_key_head_dim={cfg.linear_key_head_dim} != linear_value_head_dim="
                            f"{cfg.linear_value_head_dim} (llama.cpp sizes both with ssm.state_size)")
        if moe is None or any(cfg.is_dense_layer(i) for i in range(cfg.n_layers)):
            problems.append("dense layers (llama.cpp's qwen3next / qwen35moe have MoE in every layer)")
        else:
            if moe.router not in ("softmax_topk", "topk_softmax") or not gates_renormalised(moe):
                problems.append(f"router={moe.router!r} norm_topk_prob={moe.norm_topk_prob} (llama.cpp renormalises "
                                "softmax top-k gates)")
            if moe.num_shared_experts != 1 or not moe.shared_gate:
                problems.append("no sigmoid-gated shared expert (llama.cpp requires exactly one)")
            if moe.router_bias or moe.routed_scaling_factor != 1.0 or moe.token_rounding is not None \
                    or not model.moe_layers()[0].experts.plain:
                problems.append("a router bias, routed_scaling_factor != 1, token_rounding or expert biases")
            elif any(bool(layer.ffn.router.expert_bias.any()) for layer in model.layers if layer.is_moe):
                problems.append("a nonzero expert selection bias")
        if problems:
            raise ValueError(f"{'; '.join(problems)}: llama.cpp's {self.name} (the architecture for attn_output_gate "
                             "and Gated DeltaNet models) cannot hold this one")
        refuse_rope_scaling(cfg, ("linear",), self.name)
        return self

    def value_order(self, cfg) -> torch.Tensor:
        """moekit's value head written at each GGUF value head (identity for qwen3next)."""
        Hk, Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        h = torch.arange(Hv)
        return h if self.fused else (h % Hk) * (Hv // Hk) + h // Hk

    def tensors(self, model) -> Iterator[Tensor]:
        cfg = model.cfg
        sd = float_state(model)
        one = 1.0 if cfg.zero_centred_norm else 0.0

        def norm(key):
            return sd[key] + one

        yield "token_embd.weight", sd["embed.weight"], "embed"
        for i in range(cfg.n_layers):
            p, b = f"layers.{i}.", f"blk.{i}."
            yield b + "attn_norm.weight", norm(p + "attn_norm.weight"), "f32"
            if cfg.layer_type(i) == "linear":
                yield from self.linear(b, p + "attn.", sd, cfg)
            else:
                a = p + "attn."
                for name, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
                    yield b + f"attn_{name}.weight", sd[a + f"{proj}.weight"], "matrix"
                yield b + "attn_q_norm.weight", norm(a + "q_norm.weight"), "f32"
                yield b + "attn_k_norm.weight", norm(a + "k_norm.weight"), "f32"
            yield b + "post_attention_norm.weight", norm(p + "ffn_norm.weight"), "f32"
            f = p + "ffn."
            yield b + "ffn_gate_inp.weight", sd[f + "router.weight"], "f32"
            yield from swiglu(b, "_exps", sd[f + "experts.w13"], sd[f + "experts.w2"])
            yield b + "ffn_gate_inp_shexp.weight", sd[f + "shared_gate.weight"].reshape(-1), "f32"
            yield from swiglu(b, "_shexp", sd[f + "shared.w13"], sd[f + "shared.w2"])
        yield "output_norm.weight", norm("norm.weight"), "f32"
        if not cfg.tie_embeddings:
            yield "output.weight", sd["lm_head.weight"], "output"

    def linear(self, b: str, a: str, sd, cfg) -> Iterator[Tensor]:
        Hk, Dk = cfg.linear_num_key_heads, cfg.linear_key_head_dim
        order = self.value_order(cfg)

        def heads(w, dim):  # rows (or columns) grouped per value head, reordered
            shape = w.shape
            w = w.unflatten(dim, (len(order), -1)).index_select(dim, order)
            return w.reshape(shape)

        conv = sd[a + "conv1d.weight"][:, 0]  # (C, K)
        if self.fused:
            yield b + "ssm_in.weight", sd[a + "in_proj_qkvz.weight"], "matrix"
            yield b + "ssm_ba.weight", sd[a + "in_proj_ba.weight"], "matrix"
        else:
            qk = 2 * Hk * Dk
            qkv = sd[a + "in_proj_qkv.weight"]
            yield b + "attn_qkv.weight", torch.cat([qkv[:qk], heads(qkv[qk:], 0)]), "matrix"
            yield b + "attn_gate.weight", heads(sd[a + "in_proj_z.weight"], 0), "matrix"
            yield b + "ssm_beta.weight", heads(sd[a + "in_proj_b.weight"], 0), "matrix"
            yield b + "ssm_alpha.weight", heads(sd[a + "in_proj_a.weight"], 0), "matrix"
            conv = torch.cat([conv[:qk], heads(conv[qk:], 0)])
        yield b + "ssm_conv1d.weight", conv, "f32"
        yield b + "ssm_dt.bias", heads(sd[a + "dt_bias"], 0), "f32"
        yield b + "ssm_a", heads(-sd[a + "A_log"].exp(), 0), "f32"
        yield b + "ssm_norm.weight", sd[a + "norm.weight"], "f32"
        yield b + "ssm_out.weight", heads(sd[a + "out_proj.weight"], 1), "matrix"

    def hparams(self, writer, gguf, model) -> None:
        cfg, moe = model.cfg, model.cfg.moe
        add_attention_hparams(writer, cfg, cfg.head_dim, cfg.head_dim, cfg.rope_dim)
        add_expert_hparams(writer, moe)
        writer.add_expert_shared_feed_forward_length(moe.shared_dim)
        writer.add_expert_weights_scale(1.0)
        Hk, Hv = cfg.linear_num_key_heads or 0, cfg.linear_num_value_heads or 0  # 0: no linear layers
        writer.add_ssm_conv_kernel(cfg.linear_conv_kernel or 0)
        writer.add_ssm_state_size(cfg.linear_key_head_dim or 0)
        writer.add_ssm_group_count(Hk)
        writer.add_ssm_time_step_rank(Hv)
        writer.add_ssm_inner_size(Hv * (cfg.linear_value_head_dim or 0))
        writer.add_full_attention_interval(self.interval(cfg))
        if not self.fused:  # M-RoPE sections over rope_dim / 2 frequencies; the fourth (time) unused
            half = cfg.rope_dim // 2
            writer.add_rope_dimension_sections([half - 2 * (half // 3), half // 3, half // 3, 0])
