"""Memory a model needs against a device's (docs/formulas.md#memory). Inference holds the weights (at the
weight precision), the KV cache (at the KV dtype) of B sequences of C tokens and, in hybrids, each
sequence's fixed recurrent state (Gated DeltaNet layers). Training holds weights,
gradients, an fp32 master copy where the weights are 16-bit, AdamW's fp32 m and v, and the activations
kept for backward. Reports whether that fits in USABLE of one device's memory, the largest batch that
does, and how many devices the total needs.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

from .arch import Arch
from .formulas import DELTA_RULE_CHUNK

USABLE = 0.9  # of device memory; the rest for the runtime context, allocator fragmentation and workspaces


def training_bytes_per_param(dtype: str) -> Dict[str, int]:
    """Bytes per parameter: weights and grads at `dtype` (fp32 or bf16), the fp32 master copy (bf16 only),
    AdamW's fp32 m and v. 16 either way."""
    w = 4 if dtype == "fp32" else 2
    return {"weights": w, "grads": w, "master": 0 if dtype == "fp32" else 4, "adam_m": 4, "adam_v": 4}


def activation_bytes_per_token(arch: Arch, act_bytes: float) -> Dict[str, float]:
    """Bytes one token's activations keep for backward (no recomputation, flash attention: no score
    matrix), summed over layers, by part. Per layer, in elements of act_bytes:
      attention, MHA/GQA: 2·d + 2·h·d_h + 2·h_kv·d_h   (norm input, normed x, Q, attention output, K, V)
      attention, MLA:     2·d + q_lora + kv_lora + d_rope + 2·h·(d_nope + d_rope) + 2·h·d_v
      output gate:        + h·d_h (the gate)
      Gated DeltaNet:     2·d + 2·C + 2·Hv·Dv + Hv (norm input, normed x, conv window and output, z,
                          out_proj input, b), then fp32 (4 bytes each) 2·Hk·Dk + 2·Hv + 4·Hv·Dv (q and k
                          L2-normed, the decay's inputs, o through the gated norm) and the chunked delta
                          rule's per value head, chunks of c = 64: 6·Dk + 3·Dv + Dk·Dv/c (expanded q and k,
                          [U0 W], U per chunk, the state entering each chunk) + 6·c (six (c, c) matrices:
                          Γ, KKᵀ, the solve's system, QKᵀ⊙Γ, ...), and 8·c bytes of fp64 log-decay differences
      FFN:                2·d (norm input, normed x; a bare layer keeps only x: d)
                          + dense SwiGLU 3·d_ff (H, A) | GELU 2·d_ff
                          + MoE E + 2·K·n + 3·d_shared (router logits, H per routed copy as moekit's grouped
                            backend keeps it, shared expert H and A)
      head:               d (normed final hidden) elements + V fp32 logits (4·V bytes) for the loss."""
    a = arch.attention
    attn = 0.0
    if a is not None and a.kind == "mla":
        attn = (2 * arch.d_model + (a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim
                + 2 * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim) + 2 * a.n_heads * a.v_head_dim)
    elif a is not None:
        attn = (2 * arch.d_model + (3 if a.output_gate else 2) * a.n_heads * a.head_dim
                + 2 * a.n_kv_heads * a.head_dim)
    linear = 0.0
    if a is not None and a.linear_layers:
        Hv, Dk, Dv, c = a.linear_value_heads, a.linear_key_dim, a.linear_value_dim, DELTA_RULE_CHUNK
        linear = (2 * arch.d_model + 2 * a.linear_conv_dim + 2 * Hv * Dv + Hv) * act_bytes
        linear += 4 * (2 * a.linear_key_heads * Dk + 2 * Hv + 4 * Hv * Dv)
        linear += Hv * (4 * (6 * Dk + 3 * Dv + Dk * Dv / c + 6 * c) + 8 * c)
    ffn = 0.0
    for f in arch.ffns:
        ffn += arch.d_model * (2 if a is not None else 1)
        if f.kind == "moe":
            ffn += f.num_experts + 2 * f.top_k * f.d_expert + 3 * f.d_shared
        else:
            ffn += (2 if f.activation == "gelu" else 3) * f.d_ff
    head = arch.d_model * act_bytes + 4 * arch.vocab_size if arch.vocab_size else 0.0
    n_linear = a.linear_layers if a is not None else 0
    return {"attention": (arch.n_layers - n_linear) * attn * act_bytes + n_linear * linear,
            "ffn": ffn * act_bytes, "head": head}


def max_batch(usable: float, fixed: float, per_sequence: float) -> Optional[int]:
    """Largest B with fixed + B·per_sequence <= usable: 0 if fixed alone is too much, None if unbounded."""
    if fixed > usable:
        return 0
    if per_sequence <= 0:
        return None
    return int((usable - fixed) // per_sequence)


def devices_needed(total: float, usable: float) -> int:
    return max(1, math.ceil(total / usable))


def memory(arch: Arch, n_params: int, weight_bytes: float, kv_bytes_per_token: float, batch: int, context: int,
           tokens: int, device_bytes: float, train_dtype: str, state_bytes_per_sequence: float = 0.0) -> Dict:
    """The `memory` section of the report (bytes). A bare MoE layer (no context) trains on `tokens` tokens
    and its training max_batch counts tokens; everywhere else a batch is B sequences of `context` tokens,
    each holding its KV cache and its recurrent state (hybrids)."""
    usable = USABLE * device_bytes
    kv, state = batch * context * kv_bytes_per_token, batch * state_bytes_per_sequence
    total = weight_bytes + kv + state
    inference = {"weights": weight_bytes, "kv_cache": kv, "recurrent_state": state, "total": total,
                 "fits": total <= usable,
                 "max_batch": max_batch(usable, weight_bytes, context * kv_bytes_per_token + state_bytes_per_sequence),
                 "devices": devices_needed(total, usable)}
    per_param = training_bytes_per_param(train_dtype)
    states = n_params * sum(per_param.values())
    acts = activation_bytes_per_token(arch, 4 if train_dtype == "fp32" else 2)
    per_token = sum(acts.values())
    seq = context or 1
    train_tokens = batch * context if context else tokens
    training = {"dtype": train_dtype, "bytes_per_param": per_param, "states": states,
                "activation_bytes_per_token": per_token, "activation_bytes_per_token_by_part": acts,
                "tokens": train_tokens, "activations": train_tokens * per_token,
                "total": states + train_tokens * per_token, "fits": states + train_tokens * per_token <= usable,
                "max_batch": max_batch(usable, states, seq * per_token),
                "devices": devices_needed(states + train_tokens * per_token, usable)}
    return {"device": device_bytes, "usable_fraction": USABLE, "usable": usable,
            "inference": inference, "training": training}
