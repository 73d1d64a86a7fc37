"""Typed configuration dataclasses.

`MoEConfig` describes one Mixture-of-Experts layer (router, balancing, shared
experts, token rounding, expert backend). User errors raise `ValueError`
naming the offending values; validation runs in `__post_init__`, so a bad
config never reaches the layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

ROUTERS = ("softmax_topk", "topk_softmax", "sigmoid_topk", "expert_choice", "hash")
EXPERT_IMPLS = ("reference", "grouped", "triton")
GROUPED_LAYOUTS = ("auto", "compact", "padded")
ROUNDING_MODES = ("nearest", "up", "down")

# Named MoE-layer presets: (d_model, d_expert, num_experts, top_k).
_MOE_PRESETS = {
    "tiny": dict(d_model=64, d_expert=32, num_experts=8, top_k=2),
    "small": dict(d_model=256, d_expert=128, num_experts=16, top_k=4),
}


@dataclass
class MoEConfig:
    """One MoE feed-forward layer.

    Shapes: d_model (D), d_expert (F = per-expert intermediate size),
    num_experts (E), top_k (K).
    """

    d_model: int = 64
    d_expert: int = 32
    num_experts: int = 8
    top_k: int = 2
    # --- routing ---
    router: str = "softmax_topk"
    norm_topk_prob: bool = True  # renormalise the K gates to sum to 1
    num_groups: int = 1  # sigmoid_topk: group-limited routing (DeepSeek-V3 n_group)
    topk_groups: int = 1  # sigmoid_topk: groups kept per token (topk_group)
    routed_scaling_factor: float = 1.0  # gates are multiplied by this (DeepSeek-V3: 2.5)
    capacity_factor: float = 1.0  # expert_choice: each expert takes cf*T*K/E tokens
    hash_vocab_size: int = 0  # hash: size of the token-id -> experts table
    router_noise: bool = False  # noisy top-k: learned softplus noise on logits (training only)
    causal: bool = False  # True when the layer sits in an autoregressive decoder
    # --- balancing ---
    aux_loss_coef: float = 0.0  # Switch loss alpha * E * sum_i f_i P_i
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    z_loss_coef: float = 0.0  # router z-loss: mean(logsumexp(logits)^2)
    bias_update_speed: float = 0.001  # aux-loss-free balancing gamma
    # --- shared experts ---
    num_shared_experts: int = 0
    d_shared: Optional[int] = None  # default num_shared_experts * d_expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x @ g) * shared(x)
    # --- token rounding (SonicMoE) ---
    token_rounding: Optional[str] = None  # None | "nearest" | "up" | "down"
    rounding_tile: int = 128
    # --- backend ---
    experts_impl: str = "grouped"
    # grouped backend row layout: "compact" (per-expert GEMM loop), "padded" (one bmm over
    # E blocks of the largest count) or "auto" (a cost model picks a grid block for small
    # experts on CPU, with overflowing rows in a compact tail; see moe/gmm.py)
    grouped_layout: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def preset(cls, name: str, **overrides) -> "MoEConfig":
        if name not in _MOE_PRESETS:
            raise ValueError(f"unknown MoE preset {name!r}; choose one of {sorted(_MOE_PRESETS)}")
        return cls(**{**_MOE_PRESETS[name], **overrides})

    def replace(self, **changes) -> "MoEConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def shared_dim(self) -> int:
        """Intermediate size of the (fused) shared-expert FFN; 0 when there is none."""
        if self.num_shared_experts == 0:
            return 0
        return self.d_shared if self.d_shared is not None else self.num_shared_experts * self.d_expert

    def validate(self) -> None:
        for name in ("d_model", "d_expert", "num_experts", "top_k", "rounding_tile"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoEConfig.{name} must be a positive integer, got {value!r}")
        if self.num_shared_experts < 0:
            raise ValueError(f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.d_shared is not None and self.d_shared <= 0:
            raise ValueError(f"MoEConfig.d_shared must be positive, got {self.d_shared}")
        if self.shared_gate and self.num_shared_experts == 0:
            raise ValueError("MoEConfig.shared_gate=True needs num_shared_experts > 0")
        if self.top_k > self.num_experts:
            raise ValueError(f"MoEConfig.top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router {self.router!r}; choose one of {ROUTERS}")
        if self.experts_impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown experts_impl {self.experts_impl!r}; choose one of {EXPERT_IMPLS}")
        if self.grouped_layout not in GROUPED_LAYOUTS:
            raise ValueError(f"unknown grouped_layout {self.grouped_layout!r}; choose one of {GROUPED_LAYOUTS}")
        if self.num_groups <= 0 or self.num_experts % self.num_groups != 0:
            raise ValueError(
                f"MoEConfig.num_groups={self.num_groups} must be positive and divide num_experts={self.num_experts}"
            )
        if not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"MoEConfig.topk_groups={self.topk_groups} must be in [1, num_groups={self.num_groups}]")
        if self.num_groups > 1:
            if self.router != "sigmoid_topk":
                raise ValueError(f"group-limited routing (num_groups={self.num_groups}) needs router='sigmoid_topk'")
            per_group = self.num_experts // self.num_groups
            if per_group < 2:
                raise ValueError(f"group-limited routing needs >= 2 experts per group, got {per_group}")
            if self.top_k > self.topk_groups * per_group:
                raise ValueError(
                    f"top_k={self.top_k} exceeds the experts in the kept groups "
                    f"(topk_groups={self.topk_groups} x {per_group} experts per group)"
                )
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be positive, got {self.routed_scaling_factor}")
        if self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor must be positive, got {self.capacity_factor}")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_speed"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.router == "expert_choice" and self.causal:
            raise ValueError(
                "router='expert_choice' is not causal (each expert picks tokens across the whole batch); "
                "it cannot be used where causality is required (causal=True, e.g. a decoder LM)"
            )
        if self.router == "hash":
            if self.hash_vocab_size <= 0:
                raise ValueError("router='hash' needs hash_vocab_size > 0 (the token-id table size)")
            if self.router_noise:
                raise ValueError("router_noise has no meaning for router='hash' (it has no logits)")
        if self.token_rounding is not None:
            if self.token_rounding not in ROUNDING_MODES:
                raise ValueError(f"unknown token_rounding {self.token_rounding!r}; choose None or one of {ROUNDING_MODES}")
            if self.router in ("expert_choice", "hash"):
                raise ValueError(f"token_rounding applies to top-k routers, not router={self.router!r}")


ROPE_SCALINGS = (None, "linear", "llama3", "yarn")
QK_NORMS = (None, "head", "full")


@dataclass
class ModelConfig:
    """A decoder-only MoE language model (LLaMA/Qwen3/Mixtral/OLMoE/DeepSeek-style).

    Layer i uses a dense SwiGLU FFN when `is_dense_layer(i)`, else the MoE layer `moe`.
    """

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); 1: MQA; else GQA
    head_dim: Optional[int] = None  # None: d_model // n_heads
    qk_norm: Optional[str] = None  # None | "head" (Qwen3: RMSNorm per head) | "full" (OLMoE: over the projection)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2-MoE)
    clip_qkv: Optional[float] = None  # OLMoE
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"type": "linear"|"llama3"|"yarn", "factor": ..., ...}
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    d_ff: int = 128  # dense FFN size
    first_k_dense: int = 0  # DeepSeek: the first k layers are dense
    sparse_step: int = 1  # Qwen2-MoE decoder_sparse_step: layer i is MoE when (i + 1) % step == 0
    dense_layers: Tuple[int, ...] = ()  # explicit dense layers (Qwen mlp_only_layers)
    moe: Optional[MoEConfig] = None  # None: every layer dense
    max_seq_len: int = 2048
    dtype: str = "float32"  # checkpoint dtype (load_hf/save_hf, analysis); Transformer() builds float32: use .to()
    init_std: float = 0.02
    name: str = "custom"
    notes: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        self.dense_layers = tuple(self.dense_layers)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads if self.n_heads > 0 else 0
        self.validate()

    def validate(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len", "sparse_step"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"ModelConfig.n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"unknown qk_norm {self.qk_norm!r}; choose one of {QK_NORMS}")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ROPE_SCALINGS[1:]:
            raise ValueError(f"unknown rope_scaling type {self.rope_scaling.get('type')!r}; choose one of {ROPE_SCALINGS[1:]}")
        if self.first_k_dense < 0 or self.first_k_dense > self.n_layers:
            raise ValueError(f"ModelConfig.first_k_dense={self.first_k_dense} must be in [0, n_layers={self.n_layers}]")
        bad = [i for i in self.dense_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"ModelConfig.dense_layers has indices outside [0, {self.n_layers}): {bad}")
        if self.dtype not in ("float32", "bfloat16", "float16", "float64"):
            raise ValueError(f"unknown dtype {self.dtype!r}; choose float32, bfloat16, float16 or float64")
        if self.moe is not None:
            if self.moe.d_model != self.d_model:
                raise ValueError(f"MoE d_model={self.moe.d_model} differs from the model's d_model={self.d_model}")
            if self.moe.router == "expert_choice":
                raise ValueError("router='expert_choice' is not causal and cannot be used in a decoder language model")

    def is_dense_layer(self, i: int) -> bool:
        return (
            self.moe is None
            or i < self.first_k_dense
            or i in self.dense_layers
            or (i + 1) % self.sparse_step != 0
        )

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        from .presets import MODEL_PRESETS

        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return MODEL_PRESETS[name]().replace(**overrides) if overrides else MODEL_PRESETS[name]()
