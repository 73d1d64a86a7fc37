"""A model's shape as the analyzer reads it: `Arch` (attention, one FFN per layer, embeddings).

Plain data importing nothing from moekit, so the HF specs (also of architectures moekit
cannot run) and the analyzer share it without importing each other. Notation: docs/notation.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple


@dataclass(frozen=True)
class Attention:
    """kind "mha" covers MHA/GQA/MQA; kind "mla" is DeepSeek's multi-head latent attention. Hybrids
    (Qwen3-Next, Qwen3.5-MoE) run Gated DeltaNet in `linear_layers` of the layers instead: no KV cache,
    a fixed state per sequence (conv inputs C·(K−1), delta-rule state Hv·Dk·Dv, C = 2·Hk·Dk + Hv·Dv)."""

    kind: str = "mha"
    n_heads: int = 1
    n_kv_heads: int = 1
    head_dim: int = 1
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Optional[str] = None  # None | "head" (Qwen3) | "full" (OLMoE)
    sinks: bool = False  # a learned logit per head (gpt-oss)
    sliding_window: int = 0  # keys the sliding layers hold (gpt-oss); 0: none
    sliding_layers: int = 0  # how many layers slide (their KV cache holds only the window)
    output_gate: bool = False  # q_proj also emits a gate per head: output times sigmoid(gate) (Qwen3-Next)
    # Gated DeltaNet ("linear" layers; attention/gated_deltanet.py)
    linear_layers: int = 0  # how many layers are Gated DeltaNet rather than this attention
    linear_key_heads: int = 0  # Hk
    linear_value_heads: int = 0  # Hv (value head j reads key head j // (Hv / Hk))
    linear_key_dim: int = 0  # Dk
    linear_value_dim: int = 0  # Dv
    linear_conv_kernel: int = 0  # K of the causal depthwise conv over q, k, v
    linear_fused_proj: bool = False  # Qwen3-Next's in_proj_qkvz / in_proj_ba (else in_proj_qkv, _z, _b, _a)
    # MLA only
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @property
    def linear_conv_dim(self) -> int:
        """C: the channels of the conv (q, k and v of every head)."""
        return 2 * self.linear_key_heads * self.linear_key_dim + self.linear_value_heads * self.linear_value_dim


@dataclass(frozen=True)
class FFN:
    """kind "dense" (d_ff) or "moe" (E experts of size n, K active, shared experts of total size d_shared)."""

    kind: str = "dense"
    d_ff: int = 0
    activation: str = "swiglu"  # "swiglu" (3 matrices) | "gelu" (2 matrices, GPT)
    bias: bool = False  # GPT-style biases on the MLP matrices
    num_experts: int = 0
    top_k: int = 0
    d_expert: int = 0
    d_shared: int = 0
    shared_gate: bool = False
    router_bias: bool = False  # a bias (E,) in the router logits (gpt-oss)
    expert_bias: bool = False  # biases on each expert's up (2n) and down (d) projections (gpt-oss)


@dataclass(frozen=True)
class Arch:
    name: str
    d_model: int
    vocab_size: int
    attention: Optional[Attention]  # None: a bare MoE layer
    ffns: Tuple[FFN, ...]  # one per layer
    tie_embeddings: bool = False
    norm: str = "rms"  # "rms" (weight) | "layernorm" (weight + bias)
    n_positions: int = 0  # learned position embeddings (GPT); 0 with RoPE
    max_seq_len: int = 4096
    dtype: str = "bfloat16"
    notes: Tuple[str, ...] = field(default_factory=tuple)

    @property
    def n_layers(self) -> int:
        return len(self.ffns)

    @property
    def moe_ffns(self) -> List[FFN]:
        return [f for f in self.ffns if f.kind == "moe"]

    @property
    def moe(self) -> Optional[FFN]:
        """The MoE layer shape (all MoE layers of a model share it), or None for a dense model."""
        moes = self.moe_ffns
        return moes[0] if moes else None
