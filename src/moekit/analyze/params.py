"""Parameter counts by component from a list of weight tensors (`Tensor` rows) per layer: exactly
`sum(p.numel())` of the transformers model (buffers such as expert_bias are not counted). Components:
`COMPONENTS`; shared_experts include Qwen2-MoE's shared gate, norms the q/k norms.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Dict, List

from .arch import Arch, Attention, FFN

COMPONENTS = ("embedding", "attention", "dense_ffn", "experts", "shared_experts", "router", "norms", "head")


@dataclass(frozen=True)
class Tensor:
    """`count` copies of a (rows, cols) weight (cols = input features; 1 for vectors)."""

    component: str
    name: str
    rows: int
    cols: int
    count: int = 1  # e.g. E experts or L layers
    matrix: bool = True  # False for biases and norm weights (never quantized)
    per_expert: bool = False  # routed-expert weight: only K of E are active per token

    @property
    def numel(self) -> int:
        return self.rows * self.cols * self.count


def _norm(arch: Arch, name: str, dim: int) -> List[Tensor]:
    out = [Tensor("norms", name, dim, 1, matrix=False)]
    if arch.norm == "layernorm":
        out.append(Tensor("norms", name + ".bias", dim, 1, matrix=False))
    return out


def attention_tensors(arch: Arch, a: Attention) -> List[Tensor]:
    d = arch.d_model
    t: List[Tensor] = []
    if a.kind == "mla":
        q_dim = a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim)
        if a.q_lora_rank:
            t += [Tensor("attention", "q_a_proj", a.q_lora_rank, d), Tensor("attention", "q_b_proj", q_dim, a.q_lora_rank)]
            t += [Tensor("norms", "q_a_layernorm", a.q_lora_rank, 1, matrix=False)]
        else:
            t += [Tensor("attention", "q_proj", q_dim, d)]
        t += [Tensor("attention", "kv_a_proj_with_mqa", a.kv_lora_rank + a.qk_rope_head_dim, d),
              Tensor("norms", "kv_a_layernorm", a.kv_lora_rank, 1, matrix=False),
              Tensor("attention", "kv_b_proj", a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
              Tensor("attention", "o_proj", d, a.n_heads * a.v_head_dim)]
        if a.qkv_bias:
            t += [Tensor("attention", "q_a_proj.bias" if a.q_lora_rank else "q_proj.bias",
                         a.q_lora_rank or q_dim, 1, matrix=False),
                  Tensor("attention", "kv_a_proj_with_mqa.bias", a.kv_lora_rank + a.qk_rope_head_dim, 1, matrix=False),
                  Tensor("attention", "o_proj.bias", d, 1, matrix=False)]
        return t
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    t += [Tensor("attention", "q_proj", q * (2 if a.output_gate else 1), d), Tensor("attention", "k_proj", kv, d),
          Tensor("attention", "v_proj", kv, d), Tensor("attention", "o_proj", d, q)]
    if a.qkv_bias:
        t += [Tensor("attention", "qkv.bias", q + 2 * kv, 1, matrix=False)]
    if a.out_bias:
        t += [Tensor("attention", "o_proj.bias", d, 1, matrix=False)]
    if a.sinks:
        t += [Tensor("attention", "sinks", a.n_heads, 1, matrix=False)]
    if a.qk_norm == "head":
        t += [Tensor("norms", "q_norm", a.head_dim, 1, matrix=False), Tensor("norms", "k_norm", a.head_dim, 1, matrix=False)]
    elif a.qk_norm == "full":
        t += [Tensor("norms", "q_norm", q, 1, matrix=False), Tensor("norms", "k_norm", kv, 1, matrix=False)]
    return t


def linear_attention_tensors(arch: Arch, a: Attention) -> List[Tensor]:
    """One Gated DeltaNet layer: the projections (fused or split: the same sizes), the depthwise conv
    (C, 1, K), dt_bias and A_log (Hv), the gated RMSNorm (Dv) and out_proj."""
    d, Hv, C = arch.d_model, a.linear_value_heads, a.linear_conv_dim
    z = Hv * a.linear_value_dim
    if a.linear_fused_proj:
        t = [Tensor("attention", "in_proj_qkvz", C + z, d), Tensor("attention", "in_proj_ba", 2 * Hv, d)]
    else:
        t = [Tensor("attention", "in_proj_qkv", C, d), Tensor("attention", "in_proj_z", z, d),
             Tensor("attention", "in_proj_b", Hv, d), Tensor("attention", "in_proj_a", Hv, d)]
    return t + [Tensor("attention", "conv1d", C, a.linear_conv_kernel, matrix=False),
                Tensor("attention", "dt_bias", Hv, 1, matrix=False), Tensor("attention", "A_log", Hv, 1, matrix=False),
                Tensor("norms", "linear_norm", a.linear_value_dim, 1, matrix=False),
                Tensor("attention", "out_proj", d, z)]


def ffn_tensors(arch: Arch, f: FFN) -> List[Tensor]:
    d = arch.d_model
    if f.kind == "dense":
        if f.activation == "gelu":
            t = [Tensor("dense_ffn", "fc", f.d_ff, d), Tensor("dense_ffn", "proj", d, f.d_ff)]
        else:
            t = [Tensor("dense_ffn", "w13", 2 * f.d_ff, d), Tensor("dense_ffn", "w2", d, f.d_ff)]
        if f.bias:
            n_in = f.d_ff * (1 if f.activation == "gelu" else 2)
            t += [Tensor("dense_ffn", "bias", n_in + d, 1, matrix=False)]
        return t
    E, n = f.num_experts, f.d_expert
    t = [Tensor("router", "router", E, d),
         Tensor("experts", "w13", 2 * n, d, count=E, per_expert=True),
         Tensor("experts", "w2", d, n, count=E, per_expert=True)]
    if f.router_bias:
        t += [Tensor("router", "router.bias", E, 1, matrix=False)]
    if f.expert_bias:
        t += [Tensor("experts", "b13", 2 * n, 1, count=E, matrix=False, per_expert=True),
              Tensor("experts", "b2", d, 1, count=E, matrix=False, per_expert=True)]
    if f.d_shared:
        t += [Tensor("shared_experts", "shared.w13", 2 * f.d_shared, d), Tensor("shared_experts", "shared.w2", d, f.d_shared)]
        if f.shared_gate:
            t += [Tensor("shared_experts", "shared_gate", 1, d)]
    return t


def layer_tensors(arch: Arch, f: FFN) -> List[Tensor]:
    """One decoder block but its attention (counted apart, as layers differ in it): norms and FFN."""
    t: List[Tensor] = []
    if arch.attention is not None:
        t += _norm(arch, "attn_norm", arch.d_model) + _norm(arch, "ffn_norm", arch.d_model)
    return t + ffn_tensors(arch, f)


def times(tensors: List[Tensor], n_layers: int) -> List[Tensor]:
    return [Tensor(x.component, x.name, x.rows, x.cols, x.count * n_layers, x.matrix, x.per_expert) for x in tensors]


def model_tensors(arch: Arch) -> List[Tensor]:
    """All weights, with layers of the same FFN kind (or attention kind) folded into `count`
    (count = layers x experts)."""
    t: List[Tensor] = []
    if arch.vocab_size:
        t.append(Tensor("embedding", "embed", arch.vocab_size, arch.d_model))
        if arch.n_positions:
            t.append(Tensor("embedding", "pos_embed", arch.n_positions, arch.d_model))
    for f, n_layers in Counter(arch.ffns).items():
        t += times(layer_tensors(arch, f), n_layers)
    a = arch.attention
    if a is not None:
        t += times(attention_tensors(arch, a), arch.n_layers - a.linear_layers)
        if a.linear_layers:
            t += times(linear_attention_tensors(arch, a), a.linear_layers)
    if arch.vocab_size:
        t += _norm(arch, "final_norm", arch.d_model)
        if not arch.tie_embeddings:
            t.append(Tensor("head", "lm_head", arch.vocab_size, arch.d_model))
    return t


def active_numel(arch: Arch, x: Tensor) -> int:
    """Parameters of x a token uses: K of E for routed experts."""
    return x.numel * arch.moe.top_k // arch.moe.num_experts if x.per_expert else x.numel


def params_by_component(arch: Arch, active: bool = False) -> Dict[str, int]:
    out = {c: 0 for c in COMPONENTS}
    for x in model_tensors(arch):
        out[x.component] += active_numel(arch, x) if active else x.numel
    return out
