"""Training: `TrainConfig`, `Trainer`, checkpoints that resume exactly, and `moekit train` (README.md, "Training").

A run directory holds config.json ({"train": TrainConfig, "model": ModelConfig}), metrics.jsonl
(training lines with "loss", evaluation lines with "val_loss"), tensorboard/ (when installed),
tokenizer.json and checkpoint/: a moekit checkpoint plus trainer_state.pt. Checkpoints are written
to checkpoint.new/ and swapped in with renames; mid-swap, checkpoint.old/ is the loadable one.

Legend: B batch, T sequence length, V vocab.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .config import ModelConfig

CKPT, CKPT_NEW, CKPT_OLD = "checkpoint", "checkpoint.new", "checkpoint.old"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    preset: str = "small"
    corpus: Optional[str] = None  # None: the Python standard library of this interpreter
    out: Optional[str] = None  # run directory; None: runs/<preset>-<timestamp>
    tokenizer: Optional[str] = None  # an existing tokenizer.json (else a byte-level BPE is trained)
    vocab_size: int = 4096
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 400
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
    cache_dir: Optional[str] = None  # token shard cache; None: ~/.cache/moekit
    export_hf: Optional[str] = None  # also write the final weights as an HF checkpoint here

    def validate(self) -> None:
        for name in ("vocab_size", "seq_len", "batch_size", "grad_accum", "max_steps", "eval_every",
                     "eval_batches", "ckpt_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'muon' or 'adamw'")
        if self.schedule not in ("cosine", "wsd"):
            raise ValueError(f"unknown schedule {self.schedule!r}; choose 'cosine' or 'wsd'")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rates at `step` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return 1.0 - (1 - cfg.min_lr_ratio) * min(progress, 1.0)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """checkpoint/, or checkpoint.old/ when a crash interrupted the swap."""
    for name in (CKPT, CKPT_OLD):
        path = run_dir / name
        if (path / STATE_FILE).is_file():
            return path
    return None


def measure_peak_flops(device: torch.device, size: int = 1024) -> float:
    """Dense matmul FLOP/s of this device in float32 (bf16 on CUDA): the denominator of the MFU estimate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.full((size, size), 0.5, device=device, dtype=dtype)  # no RNG use: resumed runs stay exact
    a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        a @ a
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 3 * 2 * size**3 / (time.perf_counter() - start)


# ---------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print):
        cfg.validate()
        self.cfg, self.log = cfg, log
        self.run_dir = Path(cfg.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}")
        self._prepare_run_dir(resume)
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if cfg.device == "auto" else cfg.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self._prepare_data()
        self._prepare_model()
        self.step = 0
        self.tokens_seen = 0
        if resume:
            self._resume()
        # written only once everything checked out, so a refused start leaves the run as it was
        config = {"train": asdict(cfg), "model": self.model_cfg.to_dict()}
        (self.run_dir / "config.json").write_text(json.dumps(config, indent=2))

    # -- setup
    def _prepare_run_dir(self, resume: bool) -> None:
        run = self.run_dir
        if run.exists() and not run.is_dir():
            raise ValueError(f"run directory {str(run)!r} exists and is not a directory")
        has_ckpt = run.is_dir() and latest_checkpoint(run) is not None
        if resume and not has_ckpt:
            raise ValueError(f"--resume: no checkpoint in {str(run)!r}")
        if not resume and has_ckpt:
            raise ValueError(f"{str(run)!r} already holds a training run; pass --resume to continue it or choose another --out")
        try:
            run.mkdir(parents=True, exist_ok=True)
            probe = run / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"cannot write to run directory {str(run)!r}: {exc.strerror or exc}") from None

    def _prepare_data(self) -> None:
        from . import data

        cfg = self.cfg
        files = data.corpus_files(cfg.corpus)
        train_files, val_files = data.split_files(files, cfg.val_fraction)
        tok_path = self.run_dir / "tokenizer.json"
        if tok_path.is_file():
            tokenizer = data.load_tokenizer(tok_path)
        elif cfg.tokenizer:
            tokenizer = data.load_tokenizer(cfg.tokenizer)
        else:
            self.log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on {len(train_files)} files ...")
            tokenizer = data.train_tokenizer(data.read_documents(train_files), cfg.vocab_size)
        tokenizer.save(str(tok_path))
        self.tokenizer = tokenizer
        cache = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "moekit"
        train_bin, val_bin = data.cached_shards(train_files, val_files, tokenizer, cache)
        self.train_data = data.TokenWindows(train_bin, cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=True)
        val_windows = (data.read_shard_meta(val_bin)["num_tokens"] - 1) // cfg.seq_len
        self.val_data = data.TokenWindows(val_bin, cfg.seq_len, min(cfg.batch_size, max(1, val_windows)),
                                          seed=cfg.seed, shuffle=False)
        self.log(f"data: {len(train_files)} train / {len(val_files)} val files, "
                 f"{len(self.train_data)} train windows of {cfg.seq_len} tokens")

    def _prepare_model(self) -> None:
        from .model import Transformer
        from .optim import build_optimizer

        cfg = self.cfg
        vocab = self.tokenizer.get_vocab_size()
        mcfg = ModelConfig.preset(cfg.preset)
        mcfg = mcfg.replace(vocab_size=vocab, max_seq_len=max(mcfg.max_seq_len, cfg.seq_len))
        self.model_cfg = mcfg
        self.model = Transformer(mcfg).to(self.device)
        self.model.tokenizer = self.tokenizer
        self.optimizer, description = build_optimizer(self.model, kind=cfg.optimizer, lr=cfg.lr,
                                                      weight_decay=cfg.weight_decay, muon_lr=cfg.muon_lr)
        self.log(f"model {mcfg.name}: {self.model.num_params() / 1e6:.2f}M parameters, "
                 f"{self.model.num_params(active=True) / 1e6:.2f}M active")
        self.log("optimizer parameter groups:\n" + description)
        self.step_fn = torch.compile(self._loss) if cfg.compile else self._loss

    def _resume(self) -> None:
        from safetensors.torch import load_file

        path = latest_checkpoint(self.run_dir)
        state = torch.load(path / STATE_FILE, weights_only=False)
        saved = state["model_config"]
        if saved != self.model_cfg.to_dict():
            raise ValueError(f"cannot resume: the checkpoint in {str(path)!r} was trained with a different model "
                             f"configuration (e.g. preset {saved.get('name')!r} vs {self.model_cfg.name!r})")
        weights = load_file(str(path / "model.safetensors"))
        if self.model_cfg.tie_embeddings:
            weights.setdefault("lm_head.weight", weights["embed.weight"])
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.train_data.load_state_dict(state["data"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.is_file():  # drop the lines written after the checkpoint: they will be produced again
            keep = [line for line in metrics.read_text().splitlines() if line and json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in keep))
        self.log(f"resumed from {path} at step {self.step}")

    # -- loop
    def _loss(self, x_BT, y_BT):
        logits_BTV = self.model(x_BT)
        ce = F.cross_entropy(logits_BTV.float().view(-1, logits_BTV.shape[-1]), y_BT.view(-1))
        return ce, self.model.moe_aux()

    def _autocast(self):
        enabled = self.device.type == "cuda" and self.cfg.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for x_BT, y_BT in self.val_data.iter_eval(self.cfg.eval_batches):
            with self._autocast():
                ce, _ = self._loss(x_BT.to(self.device), y_BT.to(self.device))
            total, count = total + ce.item(), count + 1
        self.model.train()
        return total / max(count, 1)

    def save(self, fault: Optional[Callable[[str], None]] = None) -> Path:
        """Write checkpoint.new/, then swap it in. `fault(stage)` is a test hook to simulate a crash."""
        from .checkpoint import save_model

        fault = fault or (lambda stage: None)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "optimizer": self.optimizer.state_dict(),
                 "data": self.train_data.state_dict(), "rng": rng, "train_config": asdict(self.cfg),
                 "model_config": self.model_cfg.to_dict()}
        new, cur, old = self.run_dir / CKPT_NEW, self.run_dir / CKPT, self.run_dir / CKPT_OLD
        shutil.rmtree(new, ignore_errors=True)
        save_model(self.model, new)
        fault("written-model")
        torch.save(state, new / STATE_FILE)
        fault("written-state")
        if cur.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cur, old)
        fault("moved-old")
        os.replace(new, cur)
        shutil.rmtree(old, ignore_errors=True)
        return cur

    def train(self, stop_after: Optional[int] = None) -> list:
        """Run to max_steps (or `stop_after` more steps, for tests); returns this call's losses."""
        from .moe import update_expert_biases

        cfg, model = self.cfg, self.model
        model.train()
        metrics = (self.run_dir / "metrics.jsonl").open("a")
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            board = None
        else:
            board = SummaryWriter(str(self.run_dir / "tensorboard"))

        def record(line: dict) -> None:
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            for key, value in line.items():
                if board is not None and key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, line["step"])

        peak_flops = measure_peak_flops(self.device)
        tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
        flops_per_token = 6 * model.num_params(active=True)
        losses, t_start, t_last = [], time.perf_counter(), time.perf_counter()
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        while self.step < end:
            factor = lr_factor(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            loss_sum, aux_sum = 0.0, 0.0
            for _ in range(cfg.grad_accum):
                x_BT, y_BT = (t.to(self.device) for t in self.train_data.next_batch())
                with self._autocast():
                    ce, aux = self.step_fn(x_BT, y_BT)
                ((ce + aux.loss) / cfg.grad_accum).backward()
                loss_sum += ce.item() / cfg.grad_accum
                aux_sum += aux.loss.item() / cfg.grad_accum
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            update_expert_biases(model)
            self.step += 1
            self.tokens_seen += tokens_per_step
            losses.append(loss_sum)
            if self.step % cfg.log_every == 0 or self.step == end:
                now = time.perf_counter()
                steps_done = len(losses)
                tok_s = tokens_per_step * min(steps_done, cfg.log_every) / max(now - t_last, 1e-9)
                t_last = now
                loads = [t.double() for t in aux.tokens_per_expert]
                mfu = tok_s * flops_per_token / peak_flops
                record({"step": self.step, "tokens": self.tokens_seen, "loss": loss_sum, "aux_loss": aux_sum,
                        "lr_factor": factor, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                        "flops_per_s": tok_s * flops_per_token, "mfu": mfu,
                        "expert_load_imbalance": [(l.max() / l.mean()).item() for l in loads],
                        "expert_load": [l.tolist() for l in loads]})
                eta = (now - t_start) / steps_done * (end - self.step)
                self.log(f"step {self.step}/{cfg.max_steps}  loss {loss_sum:.4f}  {tok_s:,.0f} tok/s  "
                         f"MFU {mfu:.1%}  ETA {eta:.0f}s")
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                val = self.evaluate()
                record({"step": self.step, "tokens": self.tokens_seen, "val_loss": val})
                self.log(f"step {self.step}  val_loss {val:.4f}")
            if self.step % cfg.ckpt_every == 0 or self.step == end:
                self.save()
        metrics.close()
        if board is not None:
            board.close()
        if self.step == cfg.max_steps and cfg.export_hf:
            from .hf import save_hf

            save_hf(model, cfg.export_hf)
            self.log(f"exported HF checkpoint to {cfg.export_hf}")
        return losses


# ---------------------------------------------------------------------------- command line
def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"config file {path!r} does not exist")
    if p.suffix == ".toml":
        import tomllib

        data = tomllib.loads(p.read_text())
        return data.get("train", data)
    if p.suffix == ".py":
        namespace: dict = {}
        exec(compile(p.read_text(), str(p), "exec"), namespace)
        return {k: v for k, v in namespace.items() if k in {f.name for f in fields(TrainConfig)}}
    raise ValueError(f"config file must be .toml or .py, got {path!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moekit train", description="Train an MoE language model (defaults: the small "
                                "preset on the Python standard library, about 10 minutes on 2 CPU cores).")
    p.add_argument("--config", help="a .toml ([train] table or top-level keys) or .py file of TrainConfig fields")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, dest=f.name, default=None, type=kind, help=f"(default {f.default!r})")
    return p


def cli(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        values = _read_config_file(args.config) if args.config else {}
        unknown = set(values) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown TrainConfig fields in {args.config}: {sorted(unknown)}")
        values.update({f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name) is not None})
        from .runtime import tune_cpu_allocator

        tune_cpu_allocator()
        trainer = Trainer(TrainConfig(**values), resume=args.resume, log=lambda m: print(m, flush=True))
        print(f"run directory: {trainer.run_dir}", flush=True)
        trainer.train()
    except ValueError as exc:
        print(f"moekit train: error: {exc}", file=sys.stderr)
        return 2
    print(f"done. run directory: {trainer.run_dir}\n  moekit generate --checkpoint {trainer.run_dir} --prompt 'def '")
    return 0
