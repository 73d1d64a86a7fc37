"""The named formulas of docs/formulas.md, one function each; the report cites these names.
Notation: docs/notation.md (T tokens, d = d_model, n = d_expert, E experts, K active, ctx context).
"""

from __future__ import annotations

FORMULAS = {
    "granularity": "G = d / n",
    "sparsity": "rho = K / E (shared experts not counted)",
    "moe_forward_flops": "6·d·n·T·K (three matmuls of 2·d·n per routed token)",
    "moe_arithmetic_intensity": "AI = 6·M·d·n / (b_a·(2·M·n + 2·M·d) + b_w·3·n·d), M = T·rho; "
                                "at 2 bytes: 3 / (3/(T·rho) + (2 + 2G)/d)",
    "dense_params": "L·12·d² + V·d",
    "dense_layer_flops": "24·d² per layer per token (QKV 6d², output 2d², FFN 16d²)",
    "forward_flops": "2·N_matmul (active weights a token multiplies, head incl.) + attention 4·L·h·d_h·ctx",
    "training_flops": "6·N_matmul + 12·L·h·d_h·ctx",
    "kv_bytes": "2·L·h_kv·d_h·bytes over the attention layers (MLA: L·(kv_lora_rank + qk_rope_head_dim)·bytes; "
                "sliding layers: x min(C, W)/C; Gated DeltaNet layers: none)",
    "recurrent_state_bytes": "per sequence, per Gated DeltaNet layer: C·(K−1)·bytes (conv inputs) + "
                             "Hv·Dk·Dv·4 (fp32 delta-rule state), C = 2·Hk·Dk + Hv·Dv",
    "delta_rule_flops": "per token per value head: decode step 7·Dk·Dv; chunked (c = min(64, T)) "
                        "c·(5·Dk + 3·Dv) + 6·Dk·Dv; plus the conv 2·C·K per layer",
    "experts_touched": "E·(1 − (1 − K/E)^B) per MoE layer at batch B",
    "decode_time": "max(FLOPs / FLOPS, bytes_read / BW), bytes_read = weight bytes touched + KV bytes "
                   "+ recurrent state read and written",
    "critical_batch": "B* = FLOPS·bytes_per_weight / (2·BW)",
    "decode_bound_batch1": "tok/s = BW / bytes per token",
    "zero_across_batch": "P(zero across batch N) = X^N",
}


def granularity(d: int, n: int) -> float:
    return d / n


def sparsity(K: int, E: int) -> float:
    return K / E


def moe_forward_flops(d: int, n: int, T: int, K: int) -> float:
    return 6 * d * n * T * K


def moe_arithmetic_intensity(T: float, d: int, n: int, K: int, E: int, act_bytes: float = 2, weight_bytes: float = 2) -> float:
    """FLOPs per byte of the MoE forward with M = T·K/E tokens per expert (up-proj + SwiGLU fused)."""
    M = T * K / E
    return 6 * M * d * n / (act_bytes * (2 * M * n + 2 * M * d) + weight_bytes * 3 * n * d)


def moe_arithmetic_intensity_closed(T: float, d: int, n: int, K: int, E: int) -> float:
    """The bf16 closed form 3 / (3/(T·rho) + (2 + 2G)/d)."""
    rho, G = K / E, d / n
    return 3 / (3 / (T * rho) + (2 + 2 * G) / d)


def dense_params(L: int, d: int, V: int) -> int:
    return L * 12 * d * d + V * d


def dense_layer_flops(d: int) -> int:
    return 24 * d * d


def training_flops(n_matmul: float, L: int, h: int, d_h: int, ctx: int) -> float:
    return 6 * n_matmul + 12 * L * h * d_h * ctx


def kv_values_per_token(L: int, h_kv: int, d_h: int) -> int:
    return 2 * L * h_kv * d_h


def kv_bytes_per_token(L: int, h_kv: int, d_h: int, nbytes: float) -> float:
    return kv_values_per_token(L, h_kv, d_h) * nbytes


DELTA_RULE_CHUNK = 64  # tokens per chunk of the chunked delta rule (attention/delta_rule.CHUNK)


def delta_rule_step_flops(Hv: int, Dk: int, Dv: int) -> float:
    """One token of the recurrent form: decay the (Dk, Dv) state, kᵀS, the rank-1 update, qᵀS."""
    return 7 * Hv * Dk * Dv


def delta_rule_chunked_flops(Hv: int, Dk: int, Dv: int, chunk: float) -> float:
    """Per token of the chunked form with chunks of `chunk` tokens: KKᵀ and QKᵀ (2·c·Dk each), the unit
    triangular solve for [U0 W] (c·(Dv + Dk)), (QKᵀ ⊙ Γ)·U (2·c·Dv), and W·S, Q·S, Kᵀ·U against the
    state (2·Dk·Dv each)."""
    return Hv * (chunk * (5 * Dk + 3 * Dv) + 6 * Dk * Dv)


def recurrent_state_bytes(Hv: int, Dk: int, Dv: int, conv_dim: int, kernel: int, nbytes: float) -> float:
    """One sequence's state in one Gated DeltaNet layer (cache.RecurrentLayerCache)."""
    return conv_dim * (kernel - 1) * nbytes + Hv * Dk * Dv * 4


def experts_touched(E: int, K: int, B: float) -> float:
    return E * (1 - (1 - K / E) ** B)


def critical_batch(flops: float, bytes_per_weight: float, bw: float) -> float:
    return flops * bytes_per_weight / (2 * bw)


def decode_time(n_active: float, B: int, flops: float, bytes_read: float, bw: float) -> float:
    return max(2 * n_active * B / flops, bytes_read / bw)


def decode_bound_batch1(bw: float, bytes_per_token: float) -> float:
    return bw / bytes_per_token


def zero_across_batch(p_zero: float, N: int) -> float:
    return p_zero**N
