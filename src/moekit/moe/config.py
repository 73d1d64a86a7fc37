"""`MoEConfig`: one MoE layer. Validated in `__post_init__` (ValueError naming the values);
router-specific checks live with each router class (`Router.check`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional

from .activation import ACTIVATIONS
from .experts import EXPERT_IMPLS
from .gmm import LAYOUTS as GROUPED_LAYOUTS
from .router import router_class

# runtime settings: accepted by the constructor, never saved (a checkpoint names no backend)
RUNTIME_FIELDS = ("experts_impl", "grouped_layout")
ROUNDING_MODES = ("nearest", "up", "down")

# Named MoE-layer presets: (d_model, d_expert, num_experts, top_k).
_MOE_PRESETS = {
    "tiny": dict(d_model=64, d_expert=32, num_experts=8, top_k=2),
    "small": dict(d_model=256, d_expert=128, num_experts=16, top_k=4),
}


@dataclass
class MoEConfig:
    """Shapes: d_model (D), d_expert (F, per-expert intermediate size), num_experts (E), top_k (K)."""

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
    bias_update_speed: float = 0.0  # aux-loss-free balancing gamma (0: off; opt-in, e.g. the small preset)
    router_bias: bool = False  # a learned bias (E,) on the router's linear, in the logits (gpt-oss)
    # --- routed experts' FFN (moe/activation.py) ---
    activation: str = "swiglu"  # "swiglu" | "swiglu_oai" (gpt-oss: clamped, (up + 1) * gate * sigmoid(alpha gate))
    swiglu_limit: float = 7.0  # swiglu_oai: gate <= limit, |up| <= limit
    swiglu_alpha: float = 1.702  # swiglu_oai: sigmoid(alpha * gate)
    expert_bias: bool = False  # biases Experts.b13 (E, 2F) and b2 (E, D) (gpt-oss); not router.expert_bias
    # --- shared experts ---
    num_shared_experts: int = 0
    d_shared: Optional[int] = None  # default num_shared_experts * d_expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x @ g) * shared(x)
    # --- token rounding (SonicMoE) ---
    token_rounding: Optional[str] = None  # None | "nearest" | "up" | "down"
    rounding_tile: int = 128
    # --- backend ---
    experts_impl: str = "grouped"
    grouped_layout: str = "auto"  # grouped backend row layout: "auto", "compact" or "padded" (moe/gmm.py)

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
        """The layer's definition without `RUNTIME_FIELDS`: a checkpoint never pins a backend."""
        return {k: v for k, v in asdict(self).items() if k not in RUNTIME_FIELDS}

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
        router_cls = router_class(self.router)
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
        if self.token_rounding is not None and self.token_rounding not in ROUNDING_MODES:
            raise ValueError(f"unknown token_rounding {self.token_rounding!r}; choose None or one of {ROUNDING_MODES}")
        router_cls.check(self)
        ACTIVATIONS.get(self.activation)
        for name in ("swiglu_limit", "swiglu_alpha"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"MoEConfig.{name} must be positive, got {value}")
            if self.activation != "swiglu_oai" and value != getattr(MoEConfig, name):
                raise ValueError(f"MoEConfig.{name}={value} applies to activation='swiglu_oai' only, "
                                 f"not activation={self.activation!r}")
        if self.routed_scaling_factor <= 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be positive, got {self.routed_scaling_factor}")
        if self.capacity_factor <= 0:
            raise ValueError(f"MoEConfig.capacity_factor must be positive, got {self.capacity_factor}")
        for name in ("aux_loss_coef", "seq_aux_loss_coef", "z_loss_coef", "bias_update_speed"):
            if getattr(self, name) < 0:
                raise ValueError(f"MoEConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.causal and not router_cls.causal:
            raise ValueError(
                f"router={self.router!r} is not causal (each expert picks tokens across the whole batch); "
                "it cannot be used where causality is required (causal=True, e.g. a decoder LM)"
            )
