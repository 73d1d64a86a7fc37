"""`moekit train`: flags and a config file (.toml with [train] and [model] tables, or .py) -> a run.

Settings come from TrainConfig's defaults, then the config file, then flags. Model settings (the
`[model]` table, `[model.moe]`, or flags such as --n-layers / --num-experts) override the preset.
With --resume everything comes from the run's config.json; flags may change only what a resumed
run can change (Trainer: FREE, TUNABLE with --allow-config-change, schedule with --new-decay).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from dataclasses import fields
from pathlib import Path

from ..cliargs import device_name, parser
from ..moe.experts import EXPERT_IMPLS
from ..moe.router import ROUTERS
from ..presets import MODEL_PRESETS
from .config import MODEL_FIELDS, MOE_FIELDS, OPTIMIZERS, SCHEDULES, TRAINABLE_PRESETS, TrainConfig, merge_resume
from .trainer import Trainer

REFUSAL_GRACE_S = 3.0  # a silent rank's wait before exiting on a refused start (see `cli`)

TRAIN_HELP = {
    "preset": f"model preset to start from (trainable on a CPU: {', '.join(TRAINABLE_PRESETS)})",
    "corpus": "training text: a .txt/.jsonl/.parquet file or a directory of them (default: this Python's stdlib)",
    "out": "run directory (default runs/<preset>-<timestamp>)",
    "tokenizer": "an existing tokenizer.json to use instead of training a byte-level BPE",
    "vocab_size": "vocabulary size of the trained tokenizer",
    "seq_len": "tokens per training sequence",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step",
    "max_steps": "optimizer steps (the LR schedule ends here)",
    "time_budget": "wall-clock budget such as 90s, 8m or 1h: max_steps is fitted to the steps that fit, "
                   "and the run stops (with a checkpoint) when the budget is spent",
    "optimizer": "muon: Muon on hidden matrices + AdamW on the rest; adamw: AdamW throughout",
    "lr": "AdamW learning rate",
    "muon_lr": "Muon learning rate",
    "weight_decay": "decoupled weight decay",
    "schedule": "cosine: warmup + cosine; wsd: warmup-stable-decay",
    "warmup_steps": "linear warmup steps",
    "decay_fraction": "wsd: the last fraction of steps decays linearly",
    "min_lr_ratio": "final LR as a fraction of the peak",
    "grad_clip": "clip the gradient norm to this value",
    "eval_every": "validation loss every N steps",
    "eval_batches": "validation batches per evaluation",
    "ckpt_every": "checkpoint every N steps (and at the end)",
    "log_every": "a metrics.jsonl line every N steps",
    "val_fraction": "share of the corpus held out for validation (by file, or by document for one file)",
    "seed": "seed of the data order, initialisation and sampling",
    "device": "auto (cuda when available), cpu, cuda or cuda:N",
    "bf16": "bf16 autocast on CUDA (CPU trains in float32)",
    "compile": "torch.compile the loss step",
    "precision": "low-precision GEMMs: none, fp8-tensorwise, fp8-rowwise, fp8-blockwise, mxfp8, mxfp4-bwd; "
                 "options after a colon, e.g. mxfp4-bwd:sr=0,rht=1,rht_block=64 or fp8-blockwise:keep=head+experts "
                 "(docs/low_precision.md); kept on --resume",
    "cache_dir": "token shard cache (default ~/.cache/moekit)",
    "export_hf": "also write the final weights as an HF checkpoint here (checked before training starts)",
    "ep": "under torchrun: expert-parallel degree (divides dp_shard and num_experts; README \"Scaling out\")",
    "dp_shard": "under torchrun: FSDP degree (-1: the world size / dp_replicate)",
    "dp_replicate": "under torchrun: HSDP replicas (parameters replicated across them, sharded within)",
}

EPILOG = """\
equivalents (HF Trainer | torchtitan):
  --lr                learning_rate | optimizer.lr          --max-steps     max_steps | training.steps
  --batch-size        per_device_train_batch_size | training.local_batch_size
  --grad-accum        gradient_accumulation_steps           --seq-len       (tokenizer max_length) | training.seq_len
  --warmup-steps      warmup_steps | lr_scheduler.warmup_steps
  --grad-clip         max_grad_norm | training.max_norm     --ckpt-every    save_steps | checkpoint.interval
  --eval-every        eval_steps                            --resume        resume_from_checkpoint | checkpoint.enable
  --compile           torch_compile | compile.enable        --config        a TrainingArguments JSON | a job TOML

examples:
  moekit train                                    the small preset on the stdlib (~10 min on 2 cores)
  moekit train --corpus notes.jsonl --preset tiny --max-steps 200 --out runs/t
  moekit train --config my.toml --out runs/t      [train] and [model] (+ [model.moe]) tables
  moekit train --out runs/t --resume              continue from the run's checkpoint with its settings
  moekit train --out runs/t --resume --max-steps 800 --new-decay
  moekit train --preset tiny --precision mxfp4-bwd:sr=1,rht=0   MXFP4 backward GEMMs, SR without the RHT
"""


def kind_of(f):
    text = str(f.type)
    return bool if "bool" in text else int if "int" in text else float if "float" in text else str


def choices_of(name: str):
    return {"preset": tuple(MODEL_PRESETS), "optimizer": OPTIMIZERS, "schedule": SCHEDULES,
            "router": tuple(ROUTERS), "qk_norm": ("head", "full", "none"), "experts_impl": EXPERT_IMPLS,
            "token_rounding": ("up", "down", "nearest", "none")}.get(name)


def add_field(group, f, dest: str, help: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    kind = kind_of(f)
    if kind is bool:
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, action=argparse.BooleanOptionalAction, help=help)
    else:
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, type=device_name if f.name == "device" else kind,
                           choices=choices_of(f.name), metavar=None if choices_of(f.name) else f.name.upper(), help=help)


def build_parser() -> argparse.ArgumentParser:
    from ..config import ModelConfig
    from ..moe.config import MoEConfig

    p = parser("moekit train", "Train an MoE language model (defaults: the small preset on the Python standard "
               "library, about 10 minutes on 2 CPU cores). Defaults shown are TrainConfig's.", epilog=EPILOG)
    p.usage = "moekit train [options]   (moekit train --help lists them)"
    run = p.add_argument_group("run")
    run.add_argument("--config", help="a .toml ([train] and [model] tables) or .py file of settings; flags override it")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, "
                     "with the settings saved in the run")
    run.add_argument("--overwrite", action="store_true", help="replace a run already in --out (its weights are lost)")
    run.add_argument("--new-decay", action="store_true", help="on --resume with other schedule settings (e.g. a "
                     "larger --max-steps): continue the LR from its current value with a new decay phase")
    run.add_argument("--allow-config-change", action="store_true", help="on --resume, accept a different lr, "
                     "muon-lr, weight-decay, grad-clip, batch-size or grad-accum (refused otherwise)")
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for f in fields(TrainConfig):
        if f.name != "model":
            shown = "" if defaults[f.name] in (None, False) else f" (default: {defaults[f.name]})"
            add_field(run, f, f.name, TRAIN_HELP[f.name] + shown)
    model = p.add_argument_group("model (overrides the preset; also a [model] table in --config)")
    for f in fields(ModelConfig):
        if f.name in MODEL_FIELDS:
            add_field(model, f, f"model.{f.name}", MODEL_FIELDS[f.name])
    moe = p.add_argument_group("MoE layer (overrides the preset; also a [model.moe] table in --config)")
    for f in fields(MoEConfig):
        if f.name in MOE_FIELDS:
            add_field(moe, f, f"moe.{f.name}", MOE_FIELDS[f.name])
    return p


def read_config_file(path: str) -> dict:
    """{train fields..., "model": {...}} from a .toml ([train]/[model] tables, or top-level train keys) or .py."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {path!r} is not valid TOML: {err}") from None
        if "train" in data:
            extra = sorted(set(data) - {"train", "model"})
            if extra:
                raise ValueError(f"config file {path!r} has unknown tables or keys {extra}; use [train] and [model]")
            values = dict(data["train"])
            if "model" in data:
                values["model"] = data["model"]
            return values
        return data
    if p.suffix == ".py":
        namespace: dict = {}
        exec(compile(p.read_text(), str(p), "exec"), namespace)
        return {k: v for k, v in namespace.items() if k in {f.name for f in fields(TrainConfig)}}
    raise ValueError(f"config file must be .toml or .py, got {path!r}")


def given_settings(args: argparse.Namespace) -> dict:
    """What the user set: the config file, then flags on top (model fields nested)."""
    values = read_config_file(args.config) if args.config else {}
    model = dict(values.get("model") or {})
    moe = dict(model.get("moe") or {})
    for dest, value in vars(args).items():
        if dest.startswith("model."):
            model[dest[6:]] = value
        elif dest.startswith("moe."):
            moe[dest[4:]] = value
        elif dest in {f.name for f in fields(TrainConfig)}:
            values[dest] = value
    if moe:
        model["moe"] = moe
    if model:
        values["model"] = model
    return values


def cli(argv=None) -> int:
    """`moekit train`; under torchrun every rank runs it, and only rank 0 reports (a refused start is one
    error line from rank 0; the other ranks exit with the same code, silently, after REFUSAL_GRACE_S: torchrun
    stops every rank once one has failed, and rank 0 must have written its line by then)."""
    if os.environ.get("RANK", "0") == "0":
        return train(argv)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return train(argv)
    except (ValueError, SystemExit) as refused:
        code = refused.code if isinstance(refused, SystemExit) else 2
        if code:
            time.sleep(REFUSAL_GRACE_S)
        raise SystemExit(code) from None


def train(argv=None) -> int:
    from ..runtime import tune_cpu_allocator

    args = build_parser().parse_args(argv)
    given = given_settings(args)
    if args.resume:
        if not given.get("out"):
            raise ValueError("--resume needs --out RUN_DIR (the run to continue)")
        saved_file = Path(given["out"]) / "config.json"
        try:
            saved = json.loads(saved_file.read_text())["train"]
        except FileNotFoundError:
            raise ValueError(f"--resume: {str(saved_file)!r} does not exist (not a moekit run directory?)") from None
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"--resume: {str(saved_file)!r} is not a moekit run configuration") from None
        cfg = merge_resume(saved, given)
    else:
        cfg = TrainConfig.from_dict(given, "the settings")
    tune_cpu_allocator()
    trainer = Trainer(cfg, resume=args.resume, log=lambda m: print(m, flush=True), overwrite=args.overwrite,
                      new_decay=args.new_decay, allow_config_change=args.allow_config_change)
    print(f"run directory: {trainer.run_dir}", flush=True)
    trainer.train()
    if trainer.ranks.main:
        print(f"done. run directory: {trainer.run_dir}\n  moekit generate {trainer.run_dir} --prompt 'def '")
    if trainer.ranks.distributed:
        from ..dist.mesh import finish_and_exit

        finish_and_exit(0)
    return 0
