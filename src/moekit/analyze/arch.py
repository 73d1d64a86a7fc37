"""A model's shape, as the analyzer needs it: `Arch` (attention, per-layer FFN, embeddings).

Built from a moekit `ModelConfig` (presets, run directories, checkpoints), an HF
`config.json` dict (qwen3_moe, mixtral, qwen2_moe, olmoe, deepseek_v3 with MLA,
llama, gpt2 = the GPT-3-style dense layout), or a bare MoE layer `d,n,E,K`.

Notation (FACTS.md): d = d_model, n = d_expert, E experts, K active, L layers,
V vocab, h heads, h_kv KV heads, d_h head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ..config import ModelConfig


@dataclass(frozen=True)
class Attention:
    """kind "mha" covers MHA/GQA/MQA; kind "mla" is DeepSeek's multi-head latent attention."""

    kind: str = "mha"
    n_heads: int = 1
    n_kv_heads: int = 1
    head_dim: int = 1
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Optional[str] = None  # None | "head" (Qwen3) | "full" (OLMoE)
    # MLA only
    q_lora_rank: Optional[int] = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0


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


def from_model_config(cfg: ModelConfig) -> Arch:
    attn = Attention("mha", cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=cfg.attention_bias, qk_norm=cfg.qk_norm)
    ffns = []
    for i in range(cfg.n_layers):
        if cfg.is_dense_layer(i):
            ffns.append(FFN("dense", d_ff=cfg.d_ff))
        else:
            m = cfg.moe
            ffns.append(FFN("moe", num_experts=m.num_experts, top_k=m.top_k, d_expert=m.d_expert,
                            d_shared=m.shared_dim if m.num_shared_experts else 0, shared_gate=m.shared_gate))
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


# ------------------------------------------------------------------ HF config.json
HF_TYPES = ("qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "deepseek_v3", "llama", "gpt2")


def _need(hf: dict, *keys: str) -> list:
    missing = [k for k in keys if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json ({hf.get('model_type')}) is missing required fields: {', '.join(missing)}")
    return [hf[k] for k in keys]


def _dense_layers_qwen(hf: dict, L: int) -> set:
    step = hf.get("decoder_sparse_step", 1) or 1
    only = set(hf.get("mlp_only_layers") or [])
    return {i for i in range(L) if i in only or (i + 1) % step != 0}


REQUIRED = {
    "qwen3_moe": ("moe_intermediate_size", "num_experts", "num_experts_per_tok"),
    "qwen2_moe": ("moe_intermediate_size", "num_experts", "num_experts_per_tok"),
    "mixtral": ("intermediate_size", "num_local_experts", "num_experts_per_tok"),
    "olmoe": ("intermediate_size", "num_experts", "num_experts_per_tok"),
    "llama": ("intermediate_size",),
    "deepseek_v3": ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "moe_intermediate_size",
                    "n_routed_experts", "num_experts_per_tok", "intermediate_size"),
}
COMMON = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")


def from_hf_config(hf: dict, name: str = "") -> Arch:
    mt = hf.get("model_type")
    if mt not in HF_TYPES:
        raise ValueError(f"cannot analyze model_type {mt!r}; supported: {', '.join(HF_TYPES)}")
    if mt != "gpt2":
        _need(hf, *COMMON, *REQUIRED[mt])  # report every missing field at once
    name = name or hf.get("_name_or_path") or mt
    if mt == "gpt2":
        return _from_gpt2(hf, name)
    V, d, L, h = _need(hf, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    h_kv = hf.get("num_key_value_heads") or h
    d_h = hf.get("head_dim") or d // h
    tie = bool(hf.get("tie_word_embeddings", False))
    notes: list = []
    if mt == "deepseek_v3":
        return _from_deepseek_v3(hf, name, V, d, L, h, tie)
    qk_norm = {"qwen3_moe": "head", "olmoe": "full"}.get(mt)
    qkv_bias = mt == "qwen2_moe" or bool(hf.get("attention_bias", False) if mt in ("llama",) else False)
    attn = Attention("mha", h, h_kv, d_h, qkv_bias=qkv_bias, out_bias=bool(mt == "llama" and hf.get("attention_bias")),
                     qk_norm=qk_norm)
    if mt == "llama":
        (d_ff,) = _need(hf, "intermediate_size")
        if hf.get("mlp_bias"):
            notes.append("mlp_bias is counted as dense_ffn parameters")
        ffns = [FFN("dense", d_ff=d_ff, bias=bool(hf.get("mlp_bias")))] * L
    elif mt == "mixtral":
        n, E, K = _need(hf, "intermediate_size", "num_local_experts", "num_experts_per_tok")
        ffns = [FFN("moe", num_experts=E, top_k=K, d_expert=n)] * L
    elif mt == "olmoe":
        n, E, K = _need(hf, "intermediate_size", "num_experts", "num_experts_per_tok")
        ffns = [FFN("moe", num_experts=E, top_k=K, d_expert=n)] * L
    else:  # qwen3_moe, qwen2_moe
        n, E, K = _need(hf, "moe_intermediate_size", "num_experts", "num_experts_per_tok")
        d_ff = hf.get("intermediate_size") or 0
        shared = hf.get("shared_expert_intermediate_size", 0) if mt == "qwen2_moe" else 0
        dense = _dense_layers_qwen(hf, L)
        if dense and not d_ff:
            raise ValueError(f"config.json ({mt}) has dense layers {sorted(dense)} but no intermediate_size")
        moe = FFN("moe", num_experts=E, top_k=K, d_expert=n, d_shared=shared or 0, shared_gate=bool(shared))
        ffns = [FFN("dense", d_ff=d_ff) if i in dense else moe for i in range(L)]
    return Arch(name, d, V, attn, tuple(ffns), tie_embeddings=tie, max_seq_len=hf.get("max_position_embeddings", 4096),
                dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), notes=tuple(notes))


def _from_deepseek_v3(hf: dict, name, V, d, L, h, tie) -> Arch:
    kv_rank, rope, nope, v_dim = _need(hf, "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    n, E, K, d_ff = _need(hf, "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "intermediate_size")
    attn = Attention("mla", h, h, nope + rope, qkv_bias=bool(hf.get("attention_bias")), q_lora_rank=hf.get("q_lora_rank"),
                     kv_lora_rank=kv_rank, qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_dim)
    first_dense = hf.get("first_k_dense_replace", 0)
    n_shared = hf.get("n_shared_experts") or 0
    moe = FFN("moe", num_experts=E, top_k=K, d_expert=n, d_shared=n_shared * n)
    ffns = [FFN("dense", d_ff=d_ff) if i < first_dense else moe for i in range(L)]
    notes = ("MLA: KV cache holds the compressed latent (kv_lora_rank + qk_rope_head_dim per layer), as DeepSeek/vLLM cache it",
             "the multi-token-prediction (MTP) module is not counted (HF transformers does not build it)")
    return Arch(name, d, V, attn, tuple(ffns), tie_embeddings=tie, max_seq_len=hf.get("max_position_embeddings", 4096),
                dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"), notes=notes)


def _from_gpt2(hf: dict, name: str) -> Arch:
    V, d, L, h, n_pos = _need(hf, "vocab_size", "n_embd", "n_layer", "n_head", "n_positions")
    d_ff = hf.get("n_inner") or 4 * d
    attn = Attention("mha", h, h, d // h, qkv_bias=True, out_bias=True)
    ffns = (FFN("dense", d_ff=d_ff, activation="gelu", bias=True),) * L
    return Arch(name, d, V, attn, ffns, tie_embeddings=hf.get("tie_word_embeddings", True), norm="layernorm",
                n_positions=n_pos, max_seq_len=n_pos, dtype=str(hf.get("torch_dtype") or "float16"))
