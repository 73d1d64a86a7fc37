"""MiniMax-M2 as llama.cpp's "minimax-m2": q/k RMSNorm over the whole projection (qk_norm="full":
attn_q_norm of n_heads * head_dim, attn_k_norm of n_kv_heads * head_dim), NEOX RoPE over
rope.dimension_count dims (partial rotary as it is), MoE in every layer with a sigmoid router, the
selection-only expert bias as exp_probs_b and renormalised top-k gates, no shared expert. llama.cpp
sizes the experts with feed_forward_length (written as d_expert) and always reads output.weight.
"""

from __future__ import annotations

from typing import Iterator

from .common import Tensor, add_attention_hparams, add_expert_hparams, float_state, refuse_rope_scaling, swiglu


class MiniMaxM2:
    name = "minimax-m2"

    def check(self, model) -> "MiniMaxM2":
        cfg, moe = model.cfg, model.cfg.moe
        problems = []
        if cfg.attention != "gqa" or any(t != "full" for t in cfg.layer_types) or cfg.attention_sinks:
            problems.append("sliding / linear layers or sinks")
        if cfg.attn_output_gate or cfg.zero_centred_norm or cfg.qk_norm != "full":
            problems.append("attn_output_gate, zero_centred_norm or a q/k norm other than 'full'")
        if cfg.attention_bias or cfg.attention_out_bias or cfg.clip_qkv is not None:
            problems.append("attention biases or clip_qkv")
        if moe is None or any(cfg.is_dense_layer(i) for i in range(cfg.n_layers)):
            problems.append("dense layers (llama.cpp's minimax-m2 has MoE in every layer)")
        else:
            if moe.router != "sigmoid_topk" or not moe.norm_topk_prob or moe.num_groups != 1:
                problems.append(f"router={moe.router!r} norm_topk_prob={moe.norm_topk_prob} num_groups="
                                f"{moe.num_groups} (llama.cpp renormalises sigmoid top-k gates, no groups)")
            if moe.num_shared_experts or moe.router_bias or moe.token_rounding is not None \
                    or not model.moe_layers()[0].experts.plain:
                problems.append("shared experts, a router bias, token_rounding or expert biases")
            if moe.routed_scaling_factor != 1.0:
                problems.append(f"routed_scaling_factor={moe.routed_scaling_factor:g} (llama.cpp's minimax-m2 "
                                "never scales the gates)")
        if problems:
            raise ValueError(f"{'; '.join(problems)}: llama.cpp's minimax-m2 cannot hold this model")
        refuse_rope_scaling(cfg, ("linear",), self.name)
        return self

    def tensors(self, model) -> Iterator[Tensor]:
        sd = float_state(model)
        yield "token_embd.weight", sd["embed.weight"], "embed"
        for i in range(model.cfg.n_layers):
            p, b = f"layers.{i}.", f"blk.{i}."
            yield b + "attn_norm.weight", sd[p + "attn_norm.weight"], "f32"
            for name, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
                yield b + f"attn_{name}.weight", sd[p + f"attn.{proj}.weight"], "matrix"
            yield b + "attn_q_norm.weight", sd[p + "attn.q_norm.weight"], "f32"
            yield b + "attn_k_norm.weight", sd[p + "attn.k_norm.weight"], "f32"
            yield b + "ffn_norm.weight", sd[p + "ffn_norm.weight"], "f32"
            f = p + "ffn."
            yield b + "ffn_gate_inp.weight", sd[f + "router.weight"], "f32"
            yield b + "exp_probs_b.bias", sd[f + "router.expert_bias"], "f32"
            yield from swiglu(b, "_exps", sd[f + "experts.w13"], sd[f + "experts.w2"])
        yield "output_norm.weight", sd["norm.weight"], "f32"
        yield "output.weight", sd.get("lm_head.weight", sd["embed.weight"]), "output"

    def hparams(self, writer, gguf, model) -> None:
        cfg, moe = model.cfg, model.cfg.moe
        add_attention_hparams(writer, cfg, cfg.head_dim, cfg.head_dim, cfg.rope_dim)
        add_expert_hparams(writer, moe)
        writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
