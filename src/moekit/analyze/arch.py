"""The analyzer's `Arch` (`moekit.shape`) from a moekit `ModelConfig`, an HF config.json dict (any
model_type registered in `moekit.hf`) or a bare MoE layer `d,n,E,K`. Notation: docs/notation.md.
moekit.config and moekit.hf are imported where needed, not here: importing the analyzer imports no torch.
"""

from __future__ import annotations

from dataclasses import replace

from ..shape import FFN, Arch, Attention

__all__ = ["Arch", "Attention", "FFN", "from_hf_config", "from_layer", "from_model_config"]


def from_model_config(cfg) -> Arch:
    """The `Arch` of a moekit `ModelConfig`."""
    if cfg.attention == "mla":
        attn = Attention("mla", cfg.n_heads, cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
                         qkv_bias=cfg.attention_bias, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
                         qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
                         v_head_dim=cfg.v_head_dim)
    else:
        sliding = sum(cfg.layer_type(i) == "sliding" for i in range(cfg.n_layers))
        attn = Attention("mha", cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=cfg.attention_bias,
                         qk_norm=cfg.qk_norm, out_bias=cfg.attention_out_bias, sinks=cfg.attention_sinks,
                         sliding_window=cfg.sliding_window or 0, sliding_layers=sliding,
                         output_gate=cfg.attn_output_gate)
    linear = sum(cfg.layer_type(i) == "linear" for i in range(cfg.n_layers))
    if linear:
        attn = replace(attn, linear_layers=linear, linear_key_heads=cfg.linear_num_key_heads,
                       linear_value_heads=cfg.linear_num_value_heads, linear_key_dim=cfg.linear_key_head_dim,
                       linear_value_dim=cfg.linear_value_head_dim, linear_conv_kernel=cfg.linear_conv_kernel,
                       linear_fused_proj=cfg.linear_fused_proj)
    ffns = []
    for i in range(cfg.n_layers):
        if cfg.is_dense_layer(i):
            ffns.append(FFN("dense", d_ff=cfg.d_ff))
        else:
            m = cfg.moe
            ffns.append(FFN("moe", num_experts=m.num_experts, top_k=m.top_k, d_expert=m.d_expert,
                            d_shared=m.shared_dim if m.num_shared_experts else 0, shared_gate=m.shared_gate,
                            router_bias=m.router_bias, expert_bias=m.expert_bias))
    notes = (cfg.notes,) if cfg.notes else ()
    return Arch(cfg.name, cfg.d_model, cfg.vocab_size, attn, tuple(ffns), tie_embeddings=cfg.tie_embeddings,
                max_seq_len=cfg.max_seq_len, dtype=cfg.dtype, notes=notes)


def from_layer(d: int, n: int, E: int, K: int, name: str = "") -> Arch:
    """A bare MoE layer (router + E SwiGLU experts): no attention, embeddings or head."""
    for label, value in (("d", d), ("n", n), ("E", E), ("K", K)):
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"--layer {label} must be a positive integer, got {value!r}")
    if K > E:
        raise ValueError(f"--layer K={K} exceeds E={E}: a token cannot use more experts than exist")
    ffn = FFN("moe", num_experts=E, top_k=K, d_expert=n)
    return Arch(name or f"layer d={d} n={n} E={E} K={K}", d, 0, None, (ffn,))


def from_hf_config(hf: dict, name: str = "") -> Arch:
    """The `Arch` of an HF config.json dict: the spec's lenient `parse_config` for loadable types
    (values that do not change the shapes are ignored), its `to_arch` for analysis-only ones."""
    from ..hf.spec import get_spec

    spec = get_spec(hf.get("model_type"), loadable=False)
    name = name or hf.get("_name_or_path") or spec.model_type
    if not spec.loadable:
        return spec.to_arch(hf, name)
    parsed = spec.parse_config(hf, strict=False)
    return replace(from_model_config(parsed.cfg), name=name, max_seq_len=parsed.max_positions,
                   dtype=parsed.hf_dtype or "bfloat16", notes=())
