"""DeepSeek-V3's layout (attention="mla", Kimi K2) as llama.cpp's "deepseek2": q_proj (attn_q) or
q_a_proj -> q_a_layernorm -> q_b_proj (attn_q_a, attn_q_a_norm, attn_q_b), kv_a_proj_with_mqa
(attn_kv_a_mqa), kv_a_layernorm (attn_kv_a_norm), kv_b_proj split per head into attn_k_b (H, C, N:
the key half transposed, as llama.cpp's absorbed MLA multiplies with it) and attn_v_b (H, V, C);
a sigmoid (or softmax) router with the selection bias (exp_probs_b), expert groups, routed scaling,
shared experts and leading dense layers.

RoPE: llama.cpp's deepseek2 rotates interleaved pairs (DeepSeek's own layout, rope_interleave=True),
so the rotary rows are written as they are; rotate-half models (rope_interleave=False) get those rows
permuted to pairs. The q_a / kv_a norms use llama.cpp's one RMS eps: the model's norm_eps must equal
moekit's fixed 1e-6 for them.

YaRN (DeepSeek-V3 / Kimi K2): rope.scaling.{type, factor, original_context_length} and
yarn_log_multiplier = 0.1 * mscale_all_dim, from which llama.cpp's deepseek2 forms the softmax scale
mscale(factor, mscale_all_dim)^2 / sqrt(N + R) (moekit's `softmax_scale`) and cos/sin of magnitude 1.
moekit's cos/sin factor (attention_factor, 1 when mscale == mscale_all_dim) scales only the rotary
q / k parts, so it is folded into their weight rows (RoPE is linear). Refused: YaRN without
mscale_all_dim, factor < 1, beta_fast / beta_slow other than llama.cpp's runtime 32 / 1, truncate=False.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..attention.mla import LORA_NORM_EPS
from .common import (Tensor, add_attention_hparams, add_expert_hparams, float_state, permute_rotary,
                     refuse_rope_scaling, swiglu)


class DeepSeek2:
    name = "deepseek2"

    def check(self, model) -> "DeepSeek2":
        cfg, moe = model.cfg, model.cfg.moe
        problems = []
        if any(t != "full" for t in cfg.layer_types) or cfg.attention_sinks or cfg.attn_output_gate:
            problems.append("sliding/linear layers, sinks or attn_output_gate")
        if cfg.zero_centred_norm or cfg.qk_norm is not None:
            problems.append("zero_centred_norm or q/k norm")
        if cfg.norm_eps != LORA_NORM_EPS:
            problems.append(f"norm_eps={cfg.norm_eps:g} (llama.cpp normalises the q/kv latents with it; moekit "
                            f"with {LORA_NORM_EPS:g})")
        dense = [i for i in range(cfg.n_layers) if cfg.is_dense_layer(i)]
        if moe is not None:
            if dense != list(range(len(dense))):
                problems.append(f"dense layers {dense} (llama.cpp's deepseek2 has dense layers only first)")
            if moe.router not in ("sigmoid_topk", "softmax_topk"):
                problems.append(f"router={moe.router!r} (llama.cpp gates with a sigmoid or a softmax, then top-k)")
            biased = any(bool(layer.ffn.router.expert_bias.any()) for layer in model.layers if layer.is_moe)
            if moe.router != "sigmoid_topk" and biased:
                problems.append("a softmax router with a selection bias")
            if moe.shared_gate or moe.shared_dim % moe.d_expert:
                problems.append("gated shared experts, or a shared size not a multiple of d_expert")
            if moe.router_bias or not model.moe_layers()[0].experts.plain or moe.token_rounding is not None:
                problems.append("a router bias, expert biases / swiglu_oai, or token_rounding")
        if cfg.attention_bias:
            problems.append("attention_bias (q_a / kv_a / o biases)")
        if problems:
            raise ValueError(f"{'; '.join(problems)}: llama.cpp's deepseek2 cannot hold this model")
        refuse_rope_scaling(cfg, ("yarn",), "deepseek2")
        if cfg.rope_scaling is not None:
            self.check_yarn(cfg.rope_scaling)
        return self

    @staticmethod
    def check_yarn(scaling: dict) -> None:
        """The YaRN settings llama.cpp's deepseek2 computes as moekit does; ValueError naming the rest."""
        if not scaling.get("mscale_all_dim"):
            raise ValueError("rope_scaling yarn without mscale_all_dim: llama.cpp's deepseek2 would scale the "
                             "softmax and cos/sin by YaRN's mscale, which moekit then does not")
        if float(scaling["factor"]) < 1:
            raise ValueError(f"rope_scaling factor={scaling['factor']:g} < 1: llama.cpp's deepseek2 YaRN needs >= 1")
        for key, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
            if float(scaling.get(key, default)) != default:
                raise ValueError(f"rope_scaling {key}={scaling[key]:g}: the deepseek2 export needs {default:g} "
                                 f"(llama.cpp runners such as llama-cpp-python pass {default:g} themselves)")
        if scaling.get("truncate", True) is False:
            raise ValueError("rope_scaling truncate=False: llama.cpp's YaRN rounds the correction dims")

    def tensors(self, model) -> Iterator[Tensor]:
        cfg = model.cfg
        H, N, V, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        sd = float_state(model)
        rope_factor = float((cfg.rope_scaling or {}).get("attention_factor", 1.0))  # moekit's cos/sin scale
        yield "token_embd.weight", sd["embed.weight"], "embed"
        for i, layer in enumerate(model.layers):
            p, b = f"layers.{i}.attn.", f"blk.{i}."
            yield b + "attn_norm.weight", sd[f"layers.{i}.attn_norm.weight"], "f32"
            if cfg.q_lora_rank is None:
                yield b + "attn_q.weight", self.pairs_q(sd[p + "q_proj.weight"], cfg, rope_factor), "matrix"
            else:
                yield b + "attn_q_a.weight", sd[p + "q_a_proj.weight"], "matrix"
                yield b + "attn_q_a_norm.weight", sd[p + "q_a_layernorm.weight"], "f32"
                yield b + "attn_q_b.weight", self.pairs_q(sd[p + "q_b_proj.weight"], cfg, rope_factor), "matrix"
            kv_a = sd[p + "kv_a_proj_with_mqa.weight"]
            k_rope = kv_a[C:] if cfg.rope_interleave else permute_rotary(kv_a[C:], 1)
            kv_a = torch.cat([kv_a[:C], k_rope * rope_factor])
            yield b + "attn_kv_a_mqa.weight", kv_a, "matrix"
            yield b + "attn_kv_a_norm.weight", sd[p + "kv_a_layernorm.weight"], "f32"
            kv_b = sd[p + "kv_b_proj.weight"].view(H, N + V, C)
            yield b + "attn_k_b.weight", kv_b[:, :N].transpose(1, 2).contiguous(), "matrix"
            yield b + "attn_v_b.weight", kv_b[:, N:].contiguous(), "matrix"
            yield b + "attn_output.weight", sd[p + "o_proj.weight"], "matrix"
            yield b + "ffn_norm.weight", sd[f"layers.{i}.ffn_norm.weight"], "f32"
            f = f"layers.{i}.ffn."
            if not layer.is_moe:
                yield from swiglu(b, "", sd[f + "w13"], sd[f + "w2"])
                continue
            yield b + "ffn_gate_inp.weight", sd[f + "router.weight"], "f32"
            if cfg.moe.router == "sigmoid_topk":
                yield b + "exp_probs_b.bias", sd[f + "router.expert_bias"], "f32"
            if cfg.moe.num_shared_experts:
                yield from swiglu(b, "_shexp", sd[f + "shared.w13"], sd[f + "shared.w2"])
            yield from swiglu(b, "_exps", sd[f + "experts.w13"], sd[f + "experts.w2"])
        yield "output_norm.weight", sd["norm.weight"], "f32"
        yield "output.weight", sd.get("lm_head.weight", sd["embed.weight"]), "output"

    @staticmethod
    def pairs_q(w: torch.Tensor, cfg, rope_factor: float = 1.0) -> torch.Tensor:
        """q rows per head [nope | rope], the rope rows permuted to pairs unless already interleaved and
        times `rope_factor` (YaRN's cos/sin scale, folded)."""
        if cfg.rope_interleave and rope_factor == 1.0:
            return w
        H, N, R = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        w_HKQ = w.view(H, N + R, -1)
        rope_HRQ = w_HKQ[:, N:]
        if not cfg.rope_interleave:
            rope_HRQ = permute_rotary(rope_HRQ.reshape(H * R, -1), H).view(H, R, -1)
        return torch.cat([w_HKQ[:, :N], rope_HRQ * rope_factor], dim=1).reshape(w.shape)

    def hparams(self, writer, gguf, model) -> None:
        cfg, moe = model.cfg, model.cfg.moe
        N, R, V, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        # the absorbed form llama.cpp runs: one shared key of latent + rope, a value of the latent (MQA)
        add_attention_hparams(writer, cfg, C + R, C, R, kv_heads=1)
        writer.add_key_length_mla(N + R)
        writer.add_value_length_mla(V)
        writer.add_kv_lora_rank(C)
        writer.add_q_lora_rank(cfg.q_lora_rank or 0)  # required; 0 with attn_q
        writer.add_feed_forward_length(cfg.d_ff)
        writer.add_leading_dense_block_count(sum(cfg.is_dense_layer(i) for i in range(cfg.n_layers)))
        if cfg.rope_scaling is not None:  # yarn (check); type, factor, original context: add_attention_hparams
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(cfg.rope_scaling["mscale_all_dim"]))
        if moe is None:
            return
        add_expert_hparams(writer, moe, ffn_is_expert=False)
        writer.add_expert_shared_count(moe.shared_dim // moe.d_expert if moe.num_shared_experts else 0)
        writer.add_expert_weights_scale(float(moe.routed_scaling_factor))
        writer.add_expert_weights_norm(bool(moe.norm_topk_prob))
        sigmoid = moe.router == "sigmoid_topk"
        gating = gguf.ExpertGatingFuncType
        writer.add_expert_gating_func(gating.SIGMOID if sigmoid else gating.SOFTMAX)
        writer.add_expert_group_count(moe.num_groups)
        writer.add_expert_group_used_count(moe.topk_groups)
