"""`ArchSpec`: what moekit knows about one HF architecture (the Llama-style base layout, driven
by feature flags and hooks), and the registry of them. See docs/architecture.md#hf-specs and
docs/extending.md#an-hf-architecture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..config import ModelConfig, MoEConfig

LAYOUTS = ("per_expert", "fused")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")
# config.json keys of every Llama-style decoder that transformers would fill with a default
# moekit should not guess (a missing one is an error naming all of them)
COMMON_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
# transformers' defaults shared by the supported architectures; a spec's `defaults` override them
BASE_DEFAULTS: Dict[str, Any] = {
    "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "router_aux_loss_coef": 0.001, "initializer_range": 0.02,
}
ConfigKey = Union[str, Tuple[str, ...]]  # a config.json key, or alternatives (the first present wins)


@dataclass(frozen=True)
class Piece:
    """Where one HF tensor lives in moekit: state-dict entry `target`, optionally one expert (dim 0)
    and one half of a fused gate/up tensor. target None: a tensor that cannot change the output
    (qwen2_moe's zero-size shared expert), of `shape`; save_hf writes zeros.
    """

    target: Optional[str]
    expert: Optional[int] = None
    half: Optional[str] = None  # "gate": rows [:n], "up": rows [n:]
    shape: Optional[Tuple[int, ...]] = None
    optional: bool = False  # loading: may be absent (a tied lm_head.weight)
    float32: bool = False  # stored and loaded in float32 whatever the model's dtype (glm4_moe's router bias)
    # HF's arrangement of the tensor (gpt-oss experts): None as moekit's; "t" the last two dims swapped;
    # "interleave" gate/up halves of the last dim as alternating columns; "interleave_t" both (rows, then swap)
    layout: Optional[str] = None

    @property
    def whole(self) -> bool:
        return self.expert is None and self.half is None

    def view(self, full):
        """This piece of the moekit tensor `full` (a view: writing to it writes `full`)."""
        view = full if self.expert is None else full[self.expert]
        if self.half is not None:
            n = view.shape[0] // 2
            view = view[:n] if self.half == "gate" else view[n:]
        return view

    def shape_in(self, full_shape: Sequence[int]) -> Tuple[int, ...]:
        """The HF tensor's shape, given the shape of the moekit tensor it is part of."""
        if self.target is None:
            return self.shape
        shape = list(full_shape if self.expert is None else full_shape[1:])
        if self.half is not None:
            shape[0] //= 2
        if self.layout in ("t", "interleave_t"):
            shape[-2:] = shape[-1:-3:-1]
        return tuple(shape)

    def to_hf(self, t):
        """moekit's arrangement of this piece -> HF's (a new tensor when the layout differs)."""
        if self.layout in ("interleave", "interleave_t"):
            dim = -2 if self.layout == "interleave_t" else -1  # the gate/up dim: rows of w13, the bias's last
            gate, up = t.chunk(2, dim=dim)
            t = torch.stack([gate, up], dim=dim).flatten(dim - 1, dim)
        return t.transpose(-1, -2) if self.layout in ("t", "interleave_t") else t

    def from_hf(self, t):
        """HF's arrangement -> moekit's (the inverse of `to_hf`)."""
        if self.layout in ("t", "interleave_t"):
            t = t.transpose(-1, -2)
        if self.layout in ("interleave", "interleave_t"):
            dim = -2 if self.layout == "interleave_t" else -1
            t = torch.cat(t.unflatten(dim, (-1, 2)).unbind(dim), dim=dim)
        return t


def swiglu_pieces(hf_prefix: str, target: str, names=("gate_proj", "up_proj", "down_proj"),
                  expert: Optional[int] = None) -> Dict[str, Piece]:
    """A SwiGLU FFN's three HF matrices -> moekit's fused w13 (gate rows, then up rows) and w2."""
    gate, up, down = names
    return {
        f"{hf_prefix}{gate}.weight": Piece(f"{target}w13", expert=expert, half="gate"),
        f"{hf_prefix}{up}.weight": Piece(f"{target}w13", expert=expert, half="up"),
        f"{hf_prefix}{down}.weight": Piece(f"{target}w2", expert=expert),
    }


def absent_swiglu_pieces(hf_prefix: str, d_model: int) -> Dict[str, Piece]:
    """The zero-size gate/up/down tensors transformers keeps for a shared expert of size 0."""
    shapes = (("gate_proj", (0, d_model)), ("up_proj", (0, d_model)), ("down_proj", (d_model, 0)))
    return {f"{hf_prefix}{name}.weight": Piece(None, shape=shape) for name, shape in shapes}


@dataclass
class ParsedConfig:
    """What `ArchSpec.parse_config` reads from a config.json."""

    cfg: ModelConfig
    attention_factor: float  # transformers' YaRN cos/sin factor, folded into q and k on load
    max_positions: int  # max_position_embeddings (cfg.max_seq_len may be capped by a sliding window)
    hf_dtype: Optional[str]  # the dtype config.json names, if any (cfg.dtype falls back to float32)


def gates_renormalised(moe: MoEConfig) -> bool:
    return moe.router == "topk_softmax" or moe.norm_topk_prob


def dense_layer_indices(cfg: ModelConfig) -> List[int]:
    return [i for i in range(cfg.n_layers) if cfg.is_dense_layer(i)]


def first_present(hf: dict, key: ConfigKey):
    """config.json's value for `key` (or the first present of alternatives), else None."""
    for name in (key,) if isinstance(key, str) else key:
        if hf.get(name) is not None:
            return hf[name]
    return None


def yarn_attention_factor(params: dict, factor: float) -> float:
    """transformers' default YaRN cos/sin scale (0.1 ln(s) + 1, or the mscale ratio)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def rope_params(hf: dict) -> dict:
    """The RoPE entries of either config style: transformers 5 `rope_parameters` or the older `rope_scaling`."""
    return dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


def rope_scaling_from_hf(hf: dict, max_pos: int) -> Tuple[Optional[dict], float]:
    """(moekit rope_scaling or None, YaRN attention factor); ValueError for what moekit cannot run."""
    params = rope_params(hf)
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    kind = params.get("rope_type") or params.get("type") or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0 or hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    original = int(hf.get("original_max_position_embeddings") or params.get("original_max_position_embeddings") or max_pos)
    if kind == "default":
        return None, 1.0
    if kind == "linear":
        return {"type": "linear", "factor": float(params["factor"])}, 1.0
    if kind == "llama3":
        return {"type": "llama3", "factor": float(params["factor"]),
                "low_freq_factor": float(params["low_freq_factor"]),
                "high_freq_factor": float(params["high_freq_factor"]),
                "original_max_position_embeddings": original}, 1.0
    if kind == "yarn":
        factor = float(params.get("factor") or max_pos / original)
        scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                   "beta_fast": float(params.get("beta_fast") or 32.0), "beta_slow": float(params.get("beta_slow") or 1.0)}
        if params.get("truncate", True) is False:
            scaling["truncate"] = False
        return scaling, yarn_attention_factor(params, factor)
    raise ValueError(f"unsupported rope type {kind!r}; moekit supports default, linear, llama3 and yarn")


def rope_scaling_to_hf(cfg: ModelConfig) -> Optional[dict]:
    scaling = cfg.rope_scaling
    if not scaling:
        return None
    kind = scaling["type"]
    out = {"rope_type": kind, "factor": float(scaling["factor"])}
    if kind == "llama3":
        out.update(low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
                   original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)))
    elif kind == "yarn":
        out.update(original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 4096)),
                   beta_fast=float(scaling.get("beta_fast", 32.0)), beta_slow=float(scaling.get("beta_slow", 1.0)),
                   attention_factor=1.0)  # moekit's RoPE has no cos/sin scale
        if scaling.get("truncate", True) is False:
            out["truncate"] = False
    return out


def refuse(message: str, strict: bool) -> None:
    """A config value moekit cannot run exactly: an error when strict (loading), else ignored (analyzer)."""
    if strict:
        raise ValueError(message)


class ArchSpec:
    """One HF architecture. Subclass per architecture (one file each) and `register` an instance."""

    model_type: str = ""
    architecture: str = ""  # the HF class written to config.json "architectures"
    loadable: bool = True  # False: analysis only (`to_arch`); load_hf/save_hf refuse it
    infer_rank: Optional[int] = None  # save_hf tries `claims` in this order (lower first); None: never inferred
    required: Tuple[ConfigKey, ...] = COMMON_KEYS  # config.json keys with no default (all reported at once)
    defaults: Dict[str, Any] = {}  # transformers' values for keys config.json may leave out (over BASE_DEFAULTS)

    # features (what the architecture can hold; `problems` lists what a ModelConfig needs beyond them)
    qk_norm: Optional[str] = None  # the q/k RMSNorm kind: None, "head" or "full"
    qkv_bias: bool = False  # a bias on q/k/v only (no o_proj bias)
    clip_qkv: bool = False  # config.json clip_qkv clamps q/k/v
    optional_qk_norm: bool = False  # qk_norm may also be None (a config.json flag turns it on)
    dense_layers: bool = False  # dense FFN layers between the MoE ones
    shared_expert: Optional[str] = None  # the shared expert: None, "gated" (behind a sigmoid gate) or "plain"
    always_renormalise: bool = False  # the top-k gates always sum to 1 (no norm_topk_prob key)
    routers: Tuple[str, ...] = ("softmax_topk", "topk_softmax")  # moekit routers it computes exactly
    routing: str = "a softmax over the router logits"  # how it routes, for messages
    scaled_gates: bool = False  # config.json holds routed_scaling_factor
    expert_bias: bool = False  # stores router.expert_bias (the aux-loss-free selection bias)
    writes_head_dim: bool = True  # config.json holds head_dim (False: transformers derives it)
    partial_rotary: bool = False  # RoPE may cover only the first rotary_dim dims of each head
    mxfp4_matrices: Tuple[str, ...] = ()  # HF names (key endings) an MXFP4 checkpoint packs (hf/packed.py)

    # config.json names of the MoE layer's shape
    num_experts_key: ConfigKey = "num_experts"
    expert_size_key: ConfigKey = "moe_intermediate_size"

    # tensor names
    expert_names: Tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # per-expert gate, up, down

    # ----------------------------------------------------------- config.json -> ModelConfig
    def default(self, key: str):
        return self.defaults.get(key, BASE_DEFAULTS.get(key))

    def value(self, hf: dict, key: ConfigKey):
        """config.json's value for `key`, else transformers' default; ValueError when there is neither."""
        value = first_present(hf, key)
        name = key if isinstance(key, str) else key[0]
        if value is None:
            value = self.default(name)
        if value is None:
            raise ValueError(f"config.json ({self.model_type}) has no {name!r} and moekit knows no default for it")
        return value

    def check_required(self, hf: dict) -> None:
        missing = [k if isinstance(k, str) else k[0] for k in self.required if first_present(hf, k) is None]
        if missing:
            raise ValueError(f"config.json ({self.model_type}) is missing required fields: {', '.join(missing)}")

    def parse_config(self, hf: dict, dtype: Optional[str] = None, strict: bool = True) -> ParsedConfig:
        """config.json -> ModelConfig. strict (load_hf): ValueError for anything moekit cannot
        run exactly. strict=False (the analyzer): ignore values that do not change the shapes."""
        self.check_required(hf)
        if hf.get("hidden_act", "silu") != "silu":
            refuse(f"hidden_act={hf['hidden_act']!r} is not supported; moekit's FFNs are SwiGLU (silu)", strict)
        d_model, n_heads = int(self.value(hf, "hidden_size")), int(self.value(hf, "num_attention_heads"))
        head_dim = int(hf.get("head_dim") or d_model // n_heads)
        max_pos = int(self.value(hf, "max_position_embeddings"))
        theta = float(rope_params(hf).get("rope_theta") or hf.get("rope_theta") or self.default("rope_theta"))
        try:
            scaling, attention_factor = rope_scaling_from_hf(hf, max_pos)
        except ValueError:
            if strict:
                raise
            scaling, attention_factor = None, 1.0
        window = int(self.sliding_window(hf) or 0)
        max_seq_len = min(max_pos, window) if window else max_pos
        notes = f"imported from HF {self.model_type}"
        if window and window < max_pos:
            notes += f"; max_seq_len capped at the sliding window ({window}) where attention is exact"
        hf_dtype = hf.get("dtype") or hf.get("torch_dtype")
        if dtype is None:
            dtype = str(hf_dtype) if str(hf_dtype) in DTYPE_NAMES else "float32"
        sparse_step, dense_layers = self.layer_pattern(hf)
        cfg = ModelConfig(
            name=self.model_type, notes=notes,
            vocab_size=int(self.value(hf, "vocab_size")), d_model=d_model,
            n_layers=int(self.value(hf, "num_hidden_layers")),
            n_heads=n_heads, n_kv_heads=int(hf.get("num_key_value_heads") or n_heads), head_dim=head_dim,
            rope_theta=theta, rope_scaling=scaling, norm_eps=float(self.value(hf, "rms_norm_eps")),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), d_ff=int(self.value(hf, "intermediate_size")),
            sparse_step=sparse_step, dense_layers=dense_layers, moe=self.moe_from_hf(hf, d_model),
            max_seq_len=max_seq_len, dtype=dtype, init_std=float(self.value(hf, "initializer_range")),
            **self.attention_from_hf(hf, strict),
        )
        dense = dense_layer_indices(cfg)
        if dense and hf.get("intermediate_size") is None:
            raise ValueError(f"config.json ({self.model_type}) has dense layers {dense} but no intermediate_size")
        self.check_parsed(cfg, strict)
        if attention_factor != 1.0 and cfg.clip_qkv is not None:
            refuse("YaRN attention_factor != 1 together with clip_qkv cannot be folded into the weights", strict)
        return ParsedConfig(cfg, attention_factor, max_pos, None if hf_dtype is None else str(hf_dtype))

    def attention_from_hf(self, hf: dict, strict: bool) -> dict:
        """ModelConfig's attention_bias, qk_norm and clip_qkv."""
        if hf.get("attention_bias"):  # a bias on o_proj too
            refuse(f"{self.model_type} with attention_bias=True is not supported (moekit's o_proj has no bias)", strict)
        clip = hf.get("clip_qkv") if self.clip_qkv else None
        return dict(attention_bias=False, qk_norm=self.qk_norm, clip_qkv=None if clip is None else float(clip))

    def sliding_window(self, hf: dict) -> Optional[int]:
        """The attention window, if any layer uses one."""
        return None

    def layer_pattern(self, hf: dict) -> Tuple[int, Tuple[int, ...]]:
        """(ModelConfig.sparse_step, ModelConfig.dense_layers)."""
        return 1, ()

    def shared_size(self, hf: dict) -> int:
        """The shared expert's intermediate size (0: none)."""
        return 0

    def moe_from_hf(self, hf: dict, d_model: int) -> Optional[MoEConfig]:
        num_experts = int(self.value(hf, self.num_experts_key))
        if num_experts == 0:
            return None
        norm = self.always_renormalise or bool(hf.get("norm_topk_prob", False))
        shared = self.shared_size(hf)
        return MoEConfig(
            d_model=d_model, d_expert=int(self.value(hf, self.expert_size_key)), num_experts=num_experts,
            top_k=int(self.value(hf, "num_experts_per_tok")), router="softmax_topk", norm_topk_prob=norm,
            aux_loss_coef=float(self.value(hf, "router_aux_loss_coef")),
            num_shared_experts=1 if shared else 0, d_shared=shared or None, shared_gate=bool(shared),
        )

    def check_parsed(self, cfg: ModelConfig, strict: bool) -> None:
        """Architecture-specific refusals of a parsed config (see `refuse`)."""

    # ----------------------------------------------------------- ModelConfig -> config.json
    def config_to_hf(self, cfg: ModelConfig, dtype: str) -> dict:
        """config.json contents (call `problems` first)."""
        moe = cfg.moe
        hf = {
            "architectures": [self.architecture], "model_type": self.model_type,
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling_to_hf(cfg),
            "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
            "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_loss_coef,
            "attention_dropout": 0.0, "use_cache": True, "dtype": dtype,
        }
        if self.writes_head_dim:
            hf["head_dim"] = cfg.head_dim
        hf.update(self.hf_fields(cfg))
        return hf

    def hf_fields(self, cfg: ModelConfig) -> dict:
        """The architecture's own config.json entries (expert counts and sizes, flags)."""
        raise NotImplementedError(f"{type(self).__name__} does not write config.json")

    # ----------------------------------------------------------- what cannot be written
    def problems(self, cfg: ModelConfig) -> List[str]:
        """Why `cfg` cannot be written as this architecture ([] when it can, exactly)."""
        moe = cfg.moe
        if moe is None:
            return ["the model has no MoE layers (cfg.moe is None)"]
        mt, problems = self.model_type, []
        if cfg.attention != "gqa":
            problems.append(f"attention={cfg.attention!r} ({mt} has grouped-query attention)")
        if cfg.rope_dim != cfg.head_dim and not self.partial_rotary:
            problems.append(f"rotary_dim={cfg.rotary_dim} ({mt} rotates whole heads)")
        if moe.router not in self.routers:
            problems.append(f"router={moe.router!r} ({mt} routes with {self.routing})")
        if self.always_renormalise and not gates_renormalised(moe):
            problems.append(f"norm_topk_prob=False ({mt} always renormalises the top-k gates)")
        if moe.routed_scaling_factor != 1.0 and not self.scaled_gates:
            scaled = having("scaled_gates", " (only {} scales the gates)")
            problems.append(f"routed_scaling_factor={moe.routed_scaling_factor}{scaled}")
        if moe.router_noise:
            problems.append("router_noise=True (no noise weights in HF)")
        if moe.token_rounding is not None:
            problems.append(f"token_rounding={moe.token_rounding!r}")
        dense = dense_layer_indices(cfg)
        if dense and not self.dense_layers:
            problems.append(f"dense layers {dense} ({mt} has MoE in every layer)")
        if moe.num_shared_experts and not self.shared_expert:
            problems.append(f"shared experts ({mt} has none" + having("shared_expert", "; {} has them") + ")")
        elif moe.num_shared_experts and moe.shared_gate != (self.shared_expert == "gated"):
            problems.append(f"shared experts with shared_gate={moe.shared_gate} ({mt} "
                            f"{'always' if self.shared_expert == 'gated' else 'never'} gates its shared expert)")
        if cfg.attention_bias and not self.qkv_bias:
            problems.append(f"attention_bias=True ({mt} has no q/k/v-only bias" + having("qkv_bias", "; {} has") + ")")
        if cfg.qk_norm != self.qk_norm and not (cfg.qk_norm is None and self.optional_qk_norm):
            problems.append(f"qk_norm={cfg.qk_norm!r} ({mt} has qk_norm={self.qk_norm!r})")
        if cfg.clip_qkv is not None and not self.clip_qkv:
            problems.append(f"clip_qkv={cfg.clip_qkv}" + having("clip_qkv", " (only {} clips q/k/v)"))
        return problems

    def claims(self, cfg: ModelConfig) -> bool:
        """Whether save_hf writes `cfg` as this architecture when none is named (default: q/k norm of this kind)."""
        return cfg.qk_norm is not None and cfg.qk_norm == self.qk_norm

    # ----------------------------------------------------------- tensor names
    def tensor_table(self, cfg: ModelConfig, layout: str) -> Dict[str, Piece]:
        """HF tensor name -> Piece for one expert layout, in file order."""
        if layout not in LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
        table = {"model.embed_tokens.weight": Piece("embed.weight")}
        for i in range(cfg.n_layers):
            p, t = f"model.layers.{i}.", f"layers.{i}."
            table[p + "input_layernorm.weight"] = Piece(t + "attn_norm.weight")
            for x in "qkvo":
                table[f"{p}self_attn.{x}_proj.weight"] = Piece(f"{t}attn.{x}_proj.weight")
            if cfg.attention_bias:
                for x in "qkv":
                    table[f"{p}self_attn.{x}_proj.bias"] = Piece(f"{t}attn.{x}_proj.bias")
            if cfg.qk_norm is not None:
                for x in "qk":
                    table[f"{p}self_attn.{x}_norm.weight"] = Piece(f"{t}attn.{x}_norm.weight")
            table[p + "post_attention_layernorm.weight"] = Piece(t + "ffn_norm.weight")
            if cfg.is_dense_layer(i):
                table.update(swiglu_pieces(p + "mlp.", t + "ffn."))
            else:
                table.update(self.moe_tensors(cfg, i, layout))
        table["model.norm.weight"] = Piece("norm.weight")
        if not cfg.tie_embeddings:
            table["lm_head.weight"] = Piece("lm_head.weight")
        return table

    def moe_module(self, layout: str) -> str:
        """The HF name of layer i's MoE block, after "model.layers.i."."""
        return "mlp."

    def moe_tensors(self, cfg: ModelConfig, i: int, layout: str) -> Dict[str, Piece]:
        p, t = f"model.layers.{i}.{self.moe_module(layout)}", f"layers.{i}.ffn."
        table = {p + "gate.weight": Piece(t + "router.weight")}
        if layout == "fused":
            table[p + "experts.gate_up_proj"] = Piece(t + "experts.w13")
            table[p + "experts.down_proj"] = Piece(t + "experts.w2")
        else:
            for e in range(cfg.moe.num_experts):
                table.update(swiglu_pieces(f"{p}experts.{e}.", t + "experts.", self.expert_names, expert=e))
        table.update(self.extra_moe_tensors(cfg, p, t))
        return table

    def extra_moe_tensors(self, cfg: ModelConfig, hf_prefix: str, target: str) -> Dict[str, Piece]:
        """Tensors of an MoE block beside the router and the routed experts (a shared expert)."""
        return {}

    def skips(self, key: str, cfg: ModelConfig) -> bool:
        """A checkpoint tensor load_hf reads past (deepseek_v3's multi-token-prediction layers)."""
        return False

    # ----------------------------------------------------------- analysis only
    def to_arch(self, hf: dict, name: str):
        """The analyzer's `Arch` for a config.json moekit cannot load (`loadable = False`)."""
        raise NotImplementedError(f"{type(self).__name__} maps config.json to a ModelConfig; use parse_config")


SPECS: Dict[str, ArchSpec] = {}  # model_type -> spec, in registration order


def register(spec: ArchSpec) -> ArchSpec:
    if not spec.model_type:
        raise ValueError(f"{type(spec).__name__} has no model_type")
    SPECS[spec.model_type] = spec
    return spec


def loadable_types() -> Tuple[str, ...]:
    """The model_types load_hf reads and save_hf writes."""
    return tuple(mt for mt, spec in SPECS.items() if spec.loadable)


def get_spec(model_type, loadable: bool = True) -> ArchSpec:
    """The registered spec; loadable=False also returns analysis-only ones."""
    spec = SPECS.get(model_type) if isinstance(model_type, str) else None
    if loadable and (spec is None or not spec.loadable):
        raise ValueError(f"unsupported model_type {model_type!r}; moekit reads and writes {', '.join(loadable_types())}")
    if spec is None:
        raise ValueError(f"cannot analyze model_type {model_type!r}; supported: {', '.join(SPECS)}")
    return spec


def having(flag: str, template: str) -> str:
    """For messages: `template` filled with the loadable architectures that have feature `flag` ("" if none)."""
    names = [mt for mt, spec in SPECS.items() if spec.loadable and getattr(spec, flag)]
    return template.format(" / ".join(names)) if names else ""


def config_from_hf(hf: dict) -> ModelConfig:
    """The ModelConfig for an HF config.json dict (raises ValueError when unsupported)."""
    return get_spec(hf.get("model_type")).parse_config(hf).cfg


def config_to_hf(cfg: ModelConfig, model_type: str, dtype: str) -> dict:
    """config.json contents for `model_type` (call check_representable first)."""
    return get_spec(model_type).config_to_hf(cfg, dtype)


def infer_model_type(cfg: ModelConfig) -> str:
    """The architecture `save_hf` writes by default: the first, in `infer_rank` order, that `claims` cfg."""
    ranked = sorted((s for s in SPECS.values() if s.loadable and s.infer_rank is not None), key=lambda s: s.infer_rank)
    for spec in ranked:
        if spec.claims(cfg):
            return spec.model_type
    return ranked[-1].model_type
