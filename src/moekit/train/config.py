"""`TrainConfig`, the model a run trains (a preset plus `[model]` overrides), and every check that can
run before any work (README.md, "Training"). Nothing here touches the corpus or the run directory.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from ..config import ModelConfig
from ..presets import MODEL_PRESETS

OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("cosine", "wsd")
TRAINABLE_PRESETS = ("tiny", "small", "mla-tiny", "glm-tiny", "minimax-tiny", "gpt-oss-tiny", "hybrid-tiny")  # the others are real models' shapes, for analysis

# model fields a run may set ([model] table, flags); the rest come from the preset or from training
# (vocab_size from the tokenizer, max_seq_len from seq_len, dtype: training runs in float32)
MODEL_FIELDS = {
    "d_model": "model width D",
    "n_layers": "number of decoder blocks",
    "n_heads": "attention query heads",
    "n_kv_heads": "key/value heads (GQA; = n_heads for MHA, 1 for MQA)",
    "head_dim": "per-head dimension (default d_model // n_heads)",
    "qk_norm": "RMSNorm on queries/keys: 'head' (Qwen3), 'full' (OLMoE) or 'none'",
    "attention_bias": "bias on the q/k/v projections (Qwen2)",
    "clip_qkv": "clamp q/k/v to [-c, c] (OLMoE)",
    "rope_theta": "RoPE base",
    "norm_eps": "RMSNorm epsilon",
    "tie_embeddings": "share the input embedding and the output head",
    "d_ff": "hidden size of the dense FFN layers",
    "first_k_dense": "the first k blocks use a dense FFN (DeepSeek)",
    "sparse_step": "block i is MoE when (i + 1) %% step == 0 (Qwen2-MoE decoder_sparse_step)",
    "init_std": "standard deviation of the weight initialisation",
    "attention": "attention kind of the full and sliding layers: gqa or mla",
    "rotary_dim": "RoPE on the first rotary_dim dims of each head (GLM-4.5, MiniMax-M2; default all)",
    "sliding_window": "keys a 'sliding' layer (layer_types) sees, itself included (gpt-oss: 128)",
    "attention_sinks": "a learned per-head sink logit in each softmax (gpt-oss)",
    "attention_out_bias": "bias on the attention output projection (gpt-oss)",
    "attn_output_gate": "attention output times sigmoid(a gate from q_proj) (Qwen3-Next)",
    "zero_centred_norm": "RMSNorm computes x * (1 + w) (Qwen3-Next)",
    "q_lora_rank": "mla: query LoRA rank (none: a plain q_proj)",
    "kv_lora_rank": "mla: width of the cached latent",
    "qk_nope_head_dim": "mla: per-head query/key dims without RoPE",
    "qk_rope_head_dim": "mla: rotary query dims per head and the shared rotary key",
    "v_head_dim": "mla: per-head value dims",
    "rope_interleave": "mla: RoPE on interleaved pairs (DeepSeek's layout)",
    "linear_num_key_heads": "linear layers (Gated DeltaNet): key heads",
    "linear_num_value_heads": "linear layers: value heads",
    "linear_key_head_dim": "linear layers: key head dim",
    "linear_value_head_dim": "linear layers: value head dim",
    "linear_conv_kernel": "linear layers: causal conv kernel",
    "linear_fused_proj": "linear layers: Qwen3-Next's fused in_proj_qkvz/in_proj_ba (else Qwen3.5's split ones)",
}
# model fields settable in a [model] table (or a .py config) but not as flags (lists and tables)
TABLE_FIELDS = {
    "layer_types": "per layer: 'full', 'sliding' or 'linear' (gpt-oss, Qwen3-Next)",
    "dense_layers": "explicit dense layer indices (Qwen mlp_only_layers)",
    "rope_scaling": "RoPE scaling table: {type = 'linear' | 'llama3' | 'yarn', factor = ..., ...}",
}
MOE_FIELDS = {
    "num_experts": "routed experts per MoE layer E",
    "top_k": "experts per token K",
    "d_expert": "hidden size of one expert F",
    "router": "routing function",
    "norm_topk_prob": "renormalise the K gates to sum to 1",
    "num_groups": "sigmoid_topk: expert groups (DeepSeek-V3 n_group)",
    "topk_groups": "sigmoid_topk: groups kept per token",
    "routed_scaling_factor": "multiplier of the routed gates (DeepSeek-V3: 2.5)",
    "num_shared_experts": "shared experts (one fused FFN of num_shared_experts * d_expert)",
    "d_shared": "hidden size of the fused shared expert (default num_shared_experts * d_expert)",
    "shared_gate": "sigmoid gate on the shared expert (Qwen2-MoE)",
    "aux_loss_coef": "Switch load-balancing loss coefficient",
    "seq_aux_loss_coef": "DeepSeek-V3 sequence-wise balance loss coefficient",
    "z_loss_coef": "router z-loss coefficient",
    "bias_update_speed": "aux-loss-free balancing step gamma (0: off)",
    "hash_vocab_size": "hash router: size of the token-id -> experts table",
    "router_noise": "noisy top-k routing in training",
    "token_rounding": "SonicMoE token rounding: 'up', 'down', 'nearest' or 'none'",
    "rounding_tile": "token rounding tile",
    "experts_impl": "expert backend (a runtime setting, not saved): reference, grouped, triton",
    "activation": "expert activation: swiglu, or swiglu_oai (gpt-oss's clamped SwiGLU)",
    "swiglu_limit": "swiglu_oai: the clamp limit (7.0)",
    "swiglu_alpha": "swiglu_oai: the sigmoid slope (1.702)",
    "expert_bias": "biases on the experts' matrices (gpt-oss)",
    "router_bias": "a bias on the router logits (gpt-oss)",
}

SUFFIXES = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text) -> float:
    """Seconds from '90', '90s', '8m', '1.5h'."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text))
        if match is None:
            raise ValueError(f"time_budget {text!r} is not a duration such as 90s, 8m or 1.5h")
        seconds = float(match.group(1)) * SUFFIXES[match.group(2) or "s"]
    if not seconds > 0:
        raise ValueError(f"time_budget must be positive, got {text!r}")
    return seconds


@dataclass
class TrainConfig:
    preset: str = "small"
    model: dict = field(default_factory=dict)  # overrides of the preset: MODEL_FIELDS, and "moe": {MOE_FIELDS}
    corpus: Optional[str] = None  # None: the Python standard library of this interpreter
    out: Optional[str] = None  # run directory; None: runs/<preset>-<timestamp>
    tokenizer: Optional[str] = None  # an existing tokenizer.json (else a byte-level BPE is trained)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 400
    time_budget: Optional[str] = None  # wall-clock budget ("8m"): max_steps is fitted to what fits
    optimizer: str = "muon"  # "muon" (hidden matrices) + AdamW (the rest), or "adamw"
    lr: float = 3e-3  # AdamW learning rate
    muon_lr: float = 0.02
    weight_decay: float = 0.1
    schedule: str = "cosine"  # "cosine" (warmup + cosine) or "wsd" (warmup-stable-decay)
    warmup_steps: int = 20
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    log_every: int = 10
    val_fraction: float = 0.05
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available
    bf16: bool = True  # bf16 autocast on CUDA (CPU trains in float32)
    compile: bool = False
    precision: str = "none"  # low-precision GEMM recipe: NAME[:opt=v,...] (moekit.lowp.recipes; none: off)
    cache_dir: Optional[str] = None  # token shard cache; None: ~/.cache/moekit
    export_hf: Optional[str] = None  # also write the final weights as an HF checkpoint here
    # the parallel layout under torchrun (moekit.dist.mesh.Layout): a launch setting, not saved for resume
    ep: int = 1  # expert-parallel degree (divides dp_shard and num_experts)
    dp_shard: int = -1  # FSDP degree; -1: the world size / dp_replicate
    dp_replicate: int = 1  # HSDP replicas

    def validate(self) -> None:
        """Checks of the values alone (no file is read)."""
        for name in ("vocab_size", "seq_len", "batch_size", "grad_accum", "max_steps", "eval_every",
                     "eval_batches", "ckpt_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("ep", "dp_replicate"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dp_shard, int) or isinstance(self.dp_shard, bool) or not (self.dp_shard >= 1
                                                                                       or self.dp_shard == -1):
            raise ValueError(f"dp_shard must be a positive integer or -1 (the rest), got {self.dp_shard!r}")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("lr", "muon_lr", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.time_budget is not None:
            parse_duration(self.time_budget)
        from ..lowp.recipes import get_recipe

        get_recipe(self.precision)
        if self.tokenizer is not None and not Path(self.tokenizer).is_file():
            raise ValueError(f"tokenizer file {self.tokenizer!r} does not exist")
        model_config(self, self.vocab_size)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training settings in {source}: {', '.join(unknown)}; "
                             f"see `moekit train --help`")
        return cls(**data)


def model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset with the run's `[model]` overrides, sized to the tokenizer and the sequence length."""
    if cfg.preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {', '.join(MODEL_PRESETS)} "
                         f"(trainable on a CPU: {', '.join(TRAINABLE_PRESETS)})")
    if not isinstance(cfg.model, dict):
        raise ValueError(f"the [model] table must be a table of model fields, got {cfg.model!r}")
    overrides = dict(cfg.model)
    moe_overrides = overrides.pop("moe", None) or {}
    settable = {**MODEL_FIELDS, **TABLE_FIELDS}
    unknown = sorted(set(overrides) - set(settable)) + sorted(f"moe.{k}" for k in set(moe_overrides) - set(MOE_FIELDS))
    if unknown:
        raise ValueError(f"unknown model settings: {', '.join(unknown)}; settable: "
                         f"{', '.join(settable)}, moe: {', '.join(MOE_FIELDS)} (vocab_size, max_seq_len and dtype "
                         "come from the tokenizer, seq_len and float32 training)")
    for key in ("qk_norm",):
        if overrides.get(key) == "none":
            overrides[key] = None
    if moe_overrides.get("token_rounding") == "none":
        moe_overrides["token_rounding"] = None
    base = dict(MODEL_PRESETS[cfg.preset])
    d_model = overrides.get("d_model", base["d_model"])
    if "head_dim" not in overrides and ("d_model" in overrides or "n_heads" in overrides):
        base.pop("head_dim", None)  # re-derive d_model // n_heads
    moe = base.get("moe")
    if moe_overrides and moe is None:
        raise ValueError(f"preset {cfg.preset!r} has no MoE layers to set moe.* fields on")
    if moe is not None:
        moe = {**moe, **moe_overrides, "d_model": d_model}
    base.update(overrides, moe=moe, vocab_size=vocab_size, max_seq_len=max(base.get("max_seq_len", 0), cfg.seq_len),
                dtype="float32")
    if overrides or moe_overrides:
        base["name"] = f"{cfg.preset}+custom"
    try:
        return ModelConfig(**base)
    except TypeError as err:  # a wrong value type reaching a dataclass
        raise ValueError(f"invalid model settings: {err}") from None


def check_before_work(cfg: TrainConfig) -> ModelConfig:
    """Every check that needs no data: values, the model, the device, the corpus path and the HF export.
    Returns the model configuration (vocab_size not yet known: the configured one)."""
    from ..cliargs import check_device
    from ..corpus import check_corpus

    cfg.validate()
    mcfg = model_config(cfg, cfg.vocab_size)
    check_layout(cfg, mcfg)
    check_device(cfg.device)
    check_corpus(cfg.corpus)
    if cfg.export_hf:
        from ..hf import export_problems

        problems = export_problems(mcfg)
        if problems:
            raise ValueError(f"--export-hf: this model cannot be written as an HF checkpoint: {'; '.join(problems)}")
    return mcfg


def launched_world_size() -> Optional[int]:
    """torchrun's WORLD_SIZE, or None when this process was not launched by torchrun."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_layout(cfg: TrainConfig, mcfg: ModelConfig):
    """The resolved moekit.dist.mesh.Layout under torchrun (None for one plain process), or ValueError naming
    the numbers that do not fit the world size and the model."""
    world = launched_world_size()
    if world is None and (cfg.ep, cfg.dp_shard, cfg.dp_replicate) == (1, -1, 1):
        return None  # one process: torch.distributed is never imported
    if cfg.ep > 1 and mcfg.moe is None:
        raise ValueError(f"--ep {cfg.ep}: preset {cfg.preset!r} has no MoE layers to split over ranks")
    from ..dist.mesh import Layout

    where = "" if world is not None else " (one process: launch with torchrun --nproc-per-node N -m moekit train ...)"
    try:
        return Layout(dp_replicate=cfg.dp_replicate, dp_shard=cfg.dp_shard, ep=cfg.ep).check(
            world or 1, mcfg.moe.num_experts if mcfg.moe is not None else None)
    except ValueError as err:
        raise ValueError(f"{err}{where}") from None


# --------------------------------------------------------------------------- resume
# what a resumed run may change: freely, only with --allow-config-change, or never
FREE = ("out", "max_steps", "time_budget", "eval_every", "eval_batches", "ckpt_every", "log_every", "device",
        "bf16", "compile", "cache_dir", "export_hf")
TUNABLE = ("lr", "muon_lr", "weight_decay", "grad_clip", "batch_size", "grad_accum", "warmup_steps", "schedule",
           "decay_fraction", "min_lr_ratio")
LAUNCH = ("ep", "dp_shard", "dp_replicate")  # how this launch is laid out: taken from the flags, never the run
FIXED_REASON = {
    "seq_len": "the data position is counted in windows of seq_len",
    "vocab_size": "the tokenizer and embedding are fixed", "tokenizer": "the tokenizer is fixed",
    "corpus": "the data position refers to this corpus", "val_fraction": "the validation split is fixed",
    "preset": "the model is fixed", "model": "the model is fixed", "optimizer": "the optimizer state is fixed",
    "seed": "the data order and RNG streams are fixed",
    "precision": "the GEMM numerics recipe is part of the run",
}


def merge_resume(saved: dict, given: dict) -> TrainConfig:
    """The run's saved TrainConfig with the explicitly `given` settings on top (the Trainer checks what
    may change: FREE freely, TUNABLE with allow_config_change, the rest never; the LAUNCH layout comes from
    `given` or the defaults, so a run resumes at any world size). A given `model` table
    is merged into the saved one, so the Trainer can name a difference."""
    names = {f.name for f in fields(TrainConfig)} - set(LAUNCH)
    merged = {k: v for k, v in saved.items() if k in names}
    model = {**merged.get("model", {}), **given.get("model", {})}
    if "moe" in merged.get("model", {}) or "moe" in given.get("model", {}):
        model["moe"] = {**merged.get("model", {}).get("moe", {}), **given.get("model", {}).get("moe", {})}
    return TrainConfig.from_dict({**merged, **given, "model": model}, "the run's config.json")
