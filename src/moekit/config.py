"""`ModelConfig`: a decoder-only MoE language model (the MoE layer's `MoEConfig` lives in
`moe/config.py` and is re-exported here). User errors raise `ValueError` naming the
offending values; validation runs in `__post_init__`. Named presets: `presets.py`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Optional, Tuple

from .attention import attention_class
from .moe.config import MoEConfig
from .moe.router import router_class
from .presets import MODEL_PRESETS

ROPE_SCALINGS = (None, "linear", "llama3", "yarn")
# per-layer types (HF's `layer_types`): "full" attention of the model's kind, "sliding" the same kind over
# the last `sliding_window` keys (gpt-oss), "linear" the registered LINEAR_KIND (Qwen3-Next's Gated DeltaNet)
LAYER_TYPES = ("full", "sliding", "linear")
LINEAR_KIND = "gated_deltanet"
QK_NORMS = (None, "head", "full")
LINEAR_FIELDS = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim")


@dataclass
class ModelConfig:
    """A decoder-only MoE language model (LLaMA/Qwen3/Mixtral/OLMoE/DeepSeek-style).

    Layer i uses a dense SwiGLU FFN when `is_dense_layer(i)`, else the MoE layer `moe`.
    """

    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    attention: str = "gqa"  # the attention kind of the "full"/"sliding" layers (attention/: a registered class)
    layer_types: Tuple[str, ...] = ()  # one of LAYER_TYPES per layer; () = every layer "full"
    sliding_window: Optional[int] = None  # keys a "sliding" layer sees (itself included)
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); 1: MQA; else GQA
    head_dim: Optional[int] = None  # None: d_model // n_heads
    rotary_dim: Optional[int] = None  # RoPE on the first rotary_dim dims of each head (GLM-4.5, MiniMax-M2); None: all
    qk_norm: Optional[str] = None  # None | "head" (Qwen3: RMSNorm per head) | "full" (OLMoE: over the projection)
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2-MoE)
    clip_qkv: Optional[float] = None  # OLMoE
    attn_output_gate: bool = False  # attention output times sigmoid(a gate from q_proj) (Qwen3-Next)
    # "linear" layers only (Gated DeltaNet, attention/gated_deltanet.py; 0 = unset)
    linear_num_key_heads: int = 0  # q/k heads of the delta rule
    linear_num_value_heads: int = 0  # value heads (a multiple of the key heads; each group shares a key head)
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 4  # the causal depthwise conv over q, k, v
    linear_fused_proj: bool = False  # Qwen3-Next's fused in_proj_qkvz / in_proj_ba (else Qwen3.5's split ones)
    attention_sinks: bool = False  # a learned logit per head as an extra softmax column, dropped (gpt-oss)
    attention_out_bias: bool = False  # a bias on o_proj (gpt-oss; attention_bias is q/k/v only)
    # attention="mla" only (DeepSeek-V3 multi-head latent attention; head_dim is then the rotary dim)
    q_lora_rank: Optional[int] = None  # None: q_proj; else q_a_proj -> RMSNorm -> q_b_proj
    kv_lora_rank: int = 0  # the cached latent's width
    qk_nope_head_dim: int = 0  # per-head query/key dims without RoPE
    qk_rope_head_dim: int = 0  # the rotary query dims per head and the shared rotary key (cached)
    v_head_dim: int = 0
    rope_interleave: bool = False  # RoPE on interleaved pairs (DeepSeek's layout) instead of rotate-half
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"type": "linear"|"llama3"|"yarn", "factor": ..., ...}
    norm_eps: float = 1e-6
    zero_centred_norm: bool = False  # RMSNorm computes x * (1 + weight) (Qwen3-Next); norm.py
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
        self.layer_types = tuple(self.layer_types)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = attention_class(self.attention).default_head_dim(self)
        self.validate()

    def validate(self) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "max_seq_len", "sparse_step"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive integer, got {value!r}")
        attention_class(self.attention).check(self)
        self.check_layer_types()
        for flag, feature in (("attention_sinks", "supports_sinks"), ("attention_out_bias", "supports_out_bias")):
            if getattr(self, flag) and not getattr(attention_class(self.attention), feature, False):
                raise ValueError(f"attention={self.attention!r} has no form with {flag}=True")
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
            if not router_class(self.moe.router).causal:
                raise ValueError(f"router={self.moe.router!r} is not causal and cannot be used in a decoder language model")

    def check_layer_types(self) -> None:
        types = self.layer_types
        if types and len(types) != self.n_layers:
            raise ValueError(f"ModelConfig.layer_types has {len(types)} entries for n_layers={self.n_layers}")
        bad = sorted({t for t in types if t not in LAYER_TYPES})
        if bad:
            raise ValueError(f"unknown layer_types {bad}; choose from {LAYER_TYPES}")
        w = self.sliding_window
        if "sliding" in types and (not isinstance(w, int) or isinstance(w, bool) or w <= 0):
            raise ValueError(f"layer_types has 'sliding' layers: ModelConfig.sliding_window must be a positive "
                             f"integer, got {w!r}")
        if "sliding" in types and not getattr(attention_class(self.attention), "supports_window", False):
            raise ValueError(f"attention={self.attention!r} has no sliding-window form (layer_types 'sliding')")
        if w is not None and "sliding" not in types:
            raise ValueError(f"ModelConfig.sliding_window={w} is set but no layer_types entry is 'sliding'")
        if "linear" in types:
            attention_class(LINEAR_KIND).check(self)
        else:
            unused = [f"{n}={getattr(self, n)!r}" for n in LINEAR_FIELDS if getattr(self, n)]
            unused += [f"linear_conv_kernel={self.linear_conv_kernel!r}"] if self.linear_conv_kernel != 4 else []
            unused += ["linear_fused_proj=True"] if self.linear_fused_proj else []
            if unused:
                raise ValueError(f"ModelConfig {', '.join(unused)} only apply to 'linear' layer_types, and no layer is")

    def layer_type(self, i: int) -> str:
        return self.layer_types[i] if self.layer_types else "full"

    def attention_kind(self, i: int) -> str:
        """The registered attention kind of layer i."""
        return LINEAR_KIND if self.layer_type(i) == "linear" else self.attention

    def window(self, i: int) -> Optional[int]:
        """Keys layer i attends over at most (its own included), None for all."""
        return self.sliding_window if self.layer_type(i) == "sliding" else None

    def is_dense_layer(self, i: int) -> bool:
        return (
            self.moe is None
            or i < self.first_k_dense
            or i in self.dense_layers
            or (i + 1) % self.sparse_step != 0
        )

    @property
    def rope_dim(self) -> int:
        """The rotated dims of each head (the width of RoPE's cos/sin): rotary_dim, else head_dim."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["moe"] = None if self.moe is None else self.moe.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        return cls(**data)

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in MODEL_PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
        return cls(**{**MODEL_PRESETS[name], **overrides})
