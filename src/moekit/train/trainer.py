"""`Trainer`: the training loop, exact resume and the run directory's lifecycle (README.md, "Training").

A run directory (moekit/rundir.py) holds config.json ({"train": TrainConfig, "model": ModelConfig}),
metrics.jsonl (training lines with "loss", evaluation lines with "val_loss", {"event": "start"|"resume"}
lines), tensorboard/ (when installed), tokenizer.json and checkpoint/: a moekit checkpoint plus
trainer_state.pt, with checksums.json. Checkpoints are written to checkpoint.new/ and swapped in with
renames; mid-swap, checkpoint.old/ is the loadable one. One process writes a run at a time (.lock).

Under torchrun (README.md, "Scaling out") every rank runs this trainer on its part of each global batch
(batch_size x data-parallel ranks x grad_accum windows) with the model parallelized by moekit/dist/fsdp.py;
rank 0 alone writes the run directory (ranks.py) and checkpoints are sharded (moekit/dist/checkpoint.py).

Legend: B batch, T sequence length, V vocab.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..dist.checkpoint import (has_sharded_weights, is_sharded, load_full_states, load_rng, load_states,
                               resume_checkpoint, save_run_checkpoint)
from ..rundir import (CKPT, CKPT_NEW, CKPT_OLD, METRICS_FILE, STATE_FILE, RunLock, clean_stale, has_weights,
                      reset_metrics, truncate_metrics, write_checksums)
from .config import TUNABLE, FIXED_REASON, TrainConfig, check_before_work, check_layout, model_config, parse_duration
from .peak import peak_flops
from .ranks import Ranks
from .schedule import fit_steps, lr_factor, new_decay_anchor

SCHEDULE_FIELDS = ("max_steps", "schedule", "warmup_steps", "decay_fraction", "min_lr_ratio")
RUN_FILES = (CKPT, CKPT_NEW, CKPT_OLD, METRICS_FILE, "tensorboard", "config.json", "tokenizer.json")


# ---------------------------------------------------------------------------- trainer
class Trainer:
    """`Trainer(cfg).train()`. `resume`: continue the run in cfg.out from its checkpoint; `overwrite`: replace
    a run there; `new_decay`: on resume with other schedule settings (max_steps, ...), continue the LR from
    its current value with a new decay phase; `allow_config_change`: accept other TUNABLE settings on resume.
    Holds the run's lock until `close()` (called by `train()` when it returns)."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log: Callable[[str], None] = print,
                 overwrite: bool = False, new_decay: bool = False, allow_config_change: bool = False):
        self.started = time.perf_counter()
        self.layout = check_layout(cfg, check_before_work(cfg))  # None: one process
        self.ranks = Ranks(self._init_distributed())
        self.cfg, self.log = cfg, log if self.ranks.main else (lambda message: None)
        self.run_dir = Path(self.ranks.share(cfg.out or f"runs/{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"))
        self.lock: Optional[RunLock] = None
        self.anchor = None  # (step, factor) where a new decay phase starts (schedule.py)
        self.step = 0
        self.tokens_seen = 0
        created = self.ranks.share(not self.run_dir.exists())
        try:
            self.ranks.on_main(lambda: self._prepare_run_dir(resume, overwrite))
            self.resume_from = self.ranks.share(self.resume_from if self.ranks.main else None)
            auto = "cuda" if torch.cuda.is_available() else "cpu"
            self.device = torch.device(auto if cfg.device == "auto" else cfg.device)
            if self.ranks.distributed:
                self.device = self.ranks.env.device
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            self._prepare_data(resume)
            self._prepare_model()
            if resume:
                self._resume(new_decay, allow_config_change)
            elif self.ranks.main:
                reset_metrics(self.run_dir / METRICS_FILE)
            self._write_config()
        except BaseException:
            self.close()
            if created and self.ranks.main:  # a refused start leaves nothing behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise
        self._event("resume" if resume else "start")

    def _init_distributed(self):
        """Join torchrun's process group (moekit/dist/mesh.py); None for one plain process."""
        if self.layout is None:
            return None
        from ..dist.mesh import build_meshes, init_distributed

        env = init_distributed()
        self.meshes = build_meshes(env, self.layout)
        return env

    def close(self) -> None:
        """Release the run directory's lock."""
        if self.lock is not None:
            self.lock.__exit__(None, None, None)
            self.lock = None

    # -- setup
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        run = self.run_dir
        if run.exists() and not run.is_dir():
            raise ValueError(f"run directory {str(run)!r} exists and is not a directory")
        try:
            run.mkdir(parents=True, exist_ok=True)
            probe = run / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise ValueError(f"cannot write to run directory {str(run)!r}: {exc.strerror or exc}") from None
        self.lock = RunLock(run).__enter__()
        clean_stale(run, self.log)
        self.resume_from = resume_checkpoint(run) if resume else None
        if resume and self.resume_from is None:
            why = " (it holds weights but no trainer_state.pt, so it cannot continue exactly)" if has_weights(run) else ""
            raise ValueError(f"--resume: no complete checkpoint in {str(run)!r}{why}")
        if not resume and (has_weights(run) or has_sharded_weights(run)):
            if not overwrite:
                raise ValueError(f"{str(run)!r} already holds a training run; pass --resume to continue it, "
                                 f"--overwrite to replace it, or choose another --out")
            for name in RUN_FILES:
                path = run / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
            self.log(f"--overwrite: removed the previous run in {str(run)!r}")

    def _prepare_data(self, resume: bool) -> None:
        from .. import corpus, data

        cfg, ranks = self.cfg, self.ranks
        tok_path = self.run_dir / "tokenizer.json"
        cache = Path(cfg.cache_dir) if cfg.cache_dir else Path.home() / ".cache" / "moekit"

        def prepare(main: bool):
            """The split, the tokenizer and the token shards: rank 0 makes them, then the others read them."""
            files = corpus.corpus_files(cfg.corpus, log=self.log)
            train_files, val_files = corpus.split_files(files, cfg.val_fraction, log=self.log)
            if not main:
                tokenizer = data.load_tokenizer(tok_path)
            elif resume and tok_path.is_file():
                tokenizer = data.load_tokenizer(tok_path)
            elif cfg.tokenizer:
                tokenizer = data.load_tokenizer(cfg.tokenizer)
            else:
                self.log(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) on the train split ...")
                tokenizer = data.train_tokenizer(corpus.read_documents(train_files), cfg.vocab_size)
            if main:
                tokenizer.save(str(tok_path))
            if ranks.distributed:  # every rank keys the shard cache by the same (saved) tokenizer
                tokenizer = data.load_tokenizer(tok_path)
            shards = data.cached_shards(train_files, val_files, tokenizer, cache, progress=main)
            return train_files, val_files, tokenizer, shards

        prepared = ranks.on_main(lambda: prepare(True))
        train_files, val_files, tokenizer, (train_bin, val_bin) = prepared or prepare(False)
        self.tokenizer = tokenizer
        dp = ranks.world
        self.train_data = data.TokenWindows(train_bin, cfg.seq_len, cfg.batch_size, seed=cfg.seed, shuffle=True,
                                            shard=ranks.rank, num_shards=dp)
        val_windows = (data.read_shard_meta(val_bin)["num_tokens"] - 1) // cfg.seq_len
        if dp > 1 and val_windows < dp:
            raise ValueError(f"the validation split has {val_windows} windows of seq_len={cfg.seq_len}, fewer than "
                             f"the {dp} data-parallel ranks; use a larger --val-fraction or fewer processes")
        self.val_data = data.TokenWindows(val_bin, cfg.seq_len, min(cfg.batch_size, max(1, val_windows // dp)),
                                          seed=cfg.seed, shuffle=False, shard=ranks.rank, num_shards=dp)
        self.log(f"data: {len(train_files)} train / {len(val_files)} val sources, "
                 f"{len(self.train_data)} train windows of {cfg.seq_len} tokens")

    def _prepare_model(self) -> None:
        from ..model import Transformer
        from ..optim import build_optimizer

        cfg = self.cfg
        mcfg = model_config(cfg, self.tokenizer.get_vocab_size())
        self.model_cfg = mcfg
        self.model = Transformer(mcfg).to(self.device)
        self.model.tokenizer = self.tokenizer
        if cfg.precision != "none":  # before parallelize: FSDP wraps the low-precision modules
            from ..lowp.transform import apply_precision

            apply_precision(self.model, cfg.precision)
            self.log(f"precision: {cfg.precision} (emulated: quantise, dequantise, multiply in float32)")
        self.active_params = self.model.num_params(active=True)
        self.log(f"model {mcfg.name}: {self.model.num_params() / 1e6:.2f}M parameters, "
                 f"{self.active_params / 1e6:.2f}M active")
        if self.ranks.distributed:
            from ..dist.fsdp import parallelize

            parallelize(self.model, self.meshes, self.layout)
            lay = self.layout
            self.log(f"{self.ranks.world} processes: dp_replicate {lay.dp_replicate} x dp_shard {lay.dp_shard}, "
                     f"ep {lay.ep}; global batch {cfg.batch_size} x {self.ranks.world} x {cfg.grad_accum}")
        self.optimizer, description = build_optimizer(self.model, kind=cfg.optimizer, lr=cfg.lr,
                                                      weight_decay=cfg.weight_decay, muon_lr=cfg.muon_lr)
        self.log("optimizer parameter groups:\n" + description)
        self.step_fn = torch.compile(self._loss) if cfg.compile else self._loss

    def _load_state(self, path: Path) -> dict:
        file = path / STATE_FILE
        try:
            state = torch.load(file, weights_only=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as err:
            raise ValueError(f"{str(file)!r} is corrupt and cannot be read ({type(err).__name__}); "
                             f"resume from a copy of the run or start a new one") from None
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError(f"{str(file)!r} is not a moekit trainer state")
        return state

    def _resume(self, new_decay: bool, allow_config_change: bool) -> None:
        path = self.resume_from
        state = self._load_state(path)
        saved = state["model_config"]
        if saved != self.model_cfg.to_dict():
            raise ValueError(f"cannot resume: the checkpoint in {str(path)!r} was trained with a different model "
                             f"configuration (e.g. preset {saved.get('name')!r} vs {self.model_cfg.name!r})")
        old_cfg = TrainConfig(**{**self.cfg.to_dict(), **state["train_config"]})
        self._check_changes(old_cfg, allow_config_change, state.get("data_parallel", 1))
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.anchor = state.get("schedule_anchor")
        if any(getattr(old_cfg, k) != getattr(self.cfg, k) for k in SCHEDULE_FIELDS):
            was, now = lr_factor(self.step, old_cfg, self.anchor), lr_factor(self.step, self.cfg, self.anchor)
            if not new_decay:
                raise ValueError(
                    f"--resume with other schedule settings ({self._diff(old_cfg, SCHEDULE_FIELDS)}) would move the "
                    f"LR factor at step {self.step} from {was:.3f} to {now:.3f}; pass --new-decay to continue from "
                    f"{was:.3f} with a new decay phase to step {self.cfg.max_steps}, or keep the run's settings")
            self.anchor = new_decay_anchor(self.step, old_cfg, self.anchor)
            self.log(f"new decay phase: LR factor {was:.3f} at step {self.step} -> {self.cfg.min_lr_ratio:.3f} "
                     f"at step {self.cfg.max_steps} ({self.cfg.schedule})")
        if self.cfg.max_steps < self.step:
            raise ValueError(f"--max-steps {self.cfg.max_steps} is below the run's step {self.step}")
        if is_sharded(path):  # written under torchrun: DCP reshards it to this layout
            load_states(path, self.model, self.optimizer)
            rng = load_rng(path, self.ranks.rank)  # None: this rank did not exist then (its seeded RNG stays)
        elif self.ranks.distributed:
            from ..model import Transformer
            from ..optim import build_optimizer

            plain = Transformer(self.model_cfg).to(self.device)
            optimizer, _ = build_optimizer(plain, kind=self.cfg.optimizer, lr=self.cfg.lr,
                                           weight_decay=self.cfg.weight_decay, muon_lr=self.cfg.muon_lr)
            self._load_single(path, state, plain, optimizer)
            load_full_states(plain, optimizer, self.model, self.optimizer)
            rng = state["rng"] if self.ranks.main else None
        else:
            self._load_single(path, state, self.model, self.optimizer)
            rng = state["rng"]
        self.train_data.load_state_dict(state["data"])
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        if self.ranks.main:
            truncate_metrics(self.run_dir / METRICS_FILE, self.step, self.log)
        self.log(f"resumed from {path} at step {self.step}")

    def _load_single(self, path: Path, state: dict, model, optimizer) -> None:
        """Weights and optimizer state of a single-process checkpoint into a one-device model."""
        from safetensors.torch import load_file

        weights = load_file(str(path / "model.safetensors"))
        if self.model_cfg.tie_embeddings:
            weights.setdefault("lm_head.weight", weights["embed.weight"])
        model.load_state_dict(weights, strict=True)
        optimizer.load_state_dict(state["optimizer"])

    def _diff(self, old: TrainConfig, keys) -> str:
        return ", ".join(f"{k} {getattr(old, k)!r} -> {getattr(self.cfg, k)!r}" for k in keys
                         if getattr(old, k) != getattr(self.cfg, k))

    def _check_changes(self, old: TrainConfig, allow: bool, old_dp: int) -> None:
        fixed = [f"{self._diff(old, [k])} ({why})" for k, why in FIXED_REASON.items()
                 if k not in ("preset", "model") and getattr(old, k) != getattr(self.cfg, k)]
        if fixed:
            raise ValueError(f"cannot resume with a different {'; '.join(fixed)}; start a new run instead")
        dp, cfg = self.ranks.world, self.cfg
        batch = ("batch_size", "grad_accum")
        was, now = old.batch_size * old_dp * old.grad_accum, cfg.batch_size * dp * cfg.grad_accum
        tuned = self._diff(old, [k for k in TUNABLE if k not in SCHEDULE_FIELDS + (batch if was == now else ())])
        if was != now:  # the global batch: batch_size x data-parallel ranks x grad_accum
            change = (f"the global batch {old.batch_size} x {old_dp} x {old.grad_accum} = {was} -> "
                      f"{cfg.batch_size} x {dp} x {cfg.grad_accum} = {now} (batch_size x ranks x grad_accum)")
            tuned = f"{tuned}, {change}" if tuned else change
        if tuned and not allow:
            raise ValueError(f"--resume would change {tuned}; pass --allow-config-change to accept, or drop "
                             f"those settings to continue as the run was configured")
        if tuned:
            self.log(f"warning: resuming with changed settings: {tuned}")

    def _write_config(self) -> None:
        if not self.ranks.main:
            return
        config = {"train": self.cfg.to_dict(), "model": self.model_cfg.to_dict()}
        tmp = self.run_dir / ".config.json.tmp"
        tmp.write_text(json.dumps(config, indent=2))
        os.replace(tmp, self.run_dir / "config.json")

    def _event(self, kind: str) -> None:
        if not self.ranks.main:
            return
        with (self.run_dir / METRICS_FILE).open("a") as f:
            f.write(json.dumps({"step": self.step, "event": kind}) + "\n")

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
        return self.ranks.mean([total / max(count, 1)])[0]

    def save(self, fault: Optional[Callable[[str], None]] = None) -> Path:
        """Write checkpoint.new/, then swap it in. `fault(stage)` is a test hook to simulate a crash."""
        from ..checkpoint import save_model

        fault = fault or (lambda stage: None)
        state = {"step": self.step, "tokens_seen": self.tokens_seen, "data": self.train_data.state_dict(),
                 "train_config": self.cfg.to_dict(), "model_config": self.model_cfg.to_dict(),
                 "schedule_anchor": self.anchor, "data_parallel": self.ranks.world}
        if self.ranks.distributed:
            return save_run_checkpoint(self.run_dir, self.model, self.optimizer, state, self.model_cfg, self.tokenizer)
        rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        state.update(optimizer=self.optimizer.state_dict(), rng=rng)
        new, cur, old = self.run_dir / CKPT_NEW, self.run_dir / CKPT, self.run_dir / CKPT_OLD
        shutil.rmtree(new, ignore_errors=True)
        save_model(self.model, new)
        fault("written-model")
        torch.save(state, new / STATE_FILE)
        write_checksums(new, [STATE_FILE])
        fault("written-state")
        if cur.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cur, old)
        fault("moved-old")
        os.replace(new, cur)
        shutil.rmtree(old, ignore_errors=True)
        return cur

    def _fit_to_budget(self, budget_s: float, step_s: float) -> None:
        """Set max_steps to the steps that end within the time budget (the schedule follows)."""
        cfg = self.cfg
        fitted = fit_steps(budget_s, time.perf_counter() - self.started, self.step, step_s, cfg)
        if fitted >= cfg.max_steps:
            self.log(f"time budget {cfg.time_budget}: all {cfg.max_steps} steps fit ({step_s:.2f} s/step)")
            return
        old = TrainConfig(**cfg.to_dict())
        cfg.max_steps = fitted
        self.anchor = new_decay_anchor(self.step, old, self.anchor)
        self.log(f"time budget {cfg.time_budget}: {fitted} of {old.max_steps} steps fit at {step_s:.2f} s/step; "
                 f"the LR schedule now ends at step {fitted}")
        self._write_config()

    def train(self, stop_after: Optional[int] = None) -> list:
        """Run to max_steps, the time budget, or `stop_after` more steps (for tests); returns this call's
        losses. Releases the run's lock when it returns."""
        try:
            if self.step == self.cfg.max_steps:
                self.log(f"the run is complete (step {self.step} of {self.cfg.max_steps}): nothing to do; to train "
                         f"further pass a larger --max-steps with --new-decay")
                return []
            return self._train(stop_after)
        finally:
            self.close()

    def _train(self, stop_after: Optional[int]) -> list:
        from ..moe import update_expert_biases

        cfg, model, ranks = self.cfg, self.model, self.ranks
        model.train()
        metrics = (self.run_dir / METRICS_FILE).open("a") if ranks.main else None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            board = None
        else:
            board = SummaryWriter(str(self.run_dir / "tensorboard")) if ranks.main else None

        def record(line: dict) -> None:
            if metrics is None:
                return
            metrics.write(json.dumps(line) + "\n")
            metrics.flush()
            for key, value in line.items():
                if board is not None and key != "step" and isinstance(value, (int, float)):
                    board.add_scalar(key, value, line["step"])

        peak = peak_flops(self.device, bf16=self.device.type == "cuda" and cfg.bf16)
        budget_s = parse_duration(cfg.time_budget) if cfg.time_budget else None
        fit_at = self.step + min(max(cfg.warmup_steps, 3), 10) if budget_s and self.step == 0 else None
        tokens_per_step = cfg.batch_size * ranks.world * cfg.seq_len * cfg.grad_accum
        flops_per_token = 6 * self.active_params
        peak *= ranks.world
        losses, t_start, t_last, t_second = [], time.perf_counter(), time.perf_counter(), None
        logged_at = self.step
        end = cfg.max_steps if stop_after is None else min(cfg.max_steps, self.step + stop_after)
        while self.step < end:
            factor = lr_factor(self.step, cfg, self.anchor)
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
            if ranks.distributed:  # the global batch's loss; FSDP averaged the gradients over the ranks
                from ..dist.fsdp import clip_grad_norm

                loss_sum, aux_sum = ranks.mean([loss_sum, aux_sum])
                grad_norm = clip_grad_norm(model, cfg.grad_clip)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            update_expert_biases(model)
            self.step += 1
            self.tokens_seen += tokens_per_step
            losses.append(loss_sum)
            now = time.perf_counter()
            t_second = t_second or now  # the first step (allocations, compilation) is not timed
            if self.step == fit_at:
                self._fit_to_budget(budget_s, ranks.share((now - t_second) / max(1, len(losses) - 1)))
                end = min(end, cfg.max_steps)
            over_budget = budget_s is not None and ranks.share(now - self.started > budget_s)
            last = self.step == end or over_budget
            if self.step % cfg.log_every == 0 or last:
                steps_done = len(losses)
                tok_s = tokens_per_step * (self.step - logged_at) / max(now - t_last, 1e-9)
                t_last, logged_at = now, self.step
                loads = [t.double() for t in aux.tokens_per_expert]
                mfu = tok_s * flops_per_token / peak
                record({"step": self.step, "tokens": self.tokens_seen, "loss": loss_sum, "aux_loss": aux_sum,
                        "lr_factor": factor, "grad_norm": float(grad_norm), "tokens_per_s": tok_s,
                        "flops_per_s": tok_s * flops_per_token, "mfu": mfu if mfu <= 1 else None,
                        "expert_load_imbalance": [(l.max() / l.mean()).item() for l in loads],
                        "expert_load": [l.tolist() for l in loads]})
                eta = (now - t_start) / steps_done * (end - self.step)
                shown = f"MFU {mfu:.1%}" if mfu <= 1 else "MFU n/a (the machine got faster than its measured peak)"
                self.log(f"step {self.step}/{cfg.max_steps}  loss {loss_sum:.4f}  {tok_s:,.0f} tok/s  "
                         f"{shown}  ETA {eta:.0f}s")
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps or over_budget:
                val = self.evaluate()
                record({"step": self.step, "tokens": self.tokens_seen, "val_loss": val})
                self.log(f"step {self.step}  val_loss {val:.4f}")
            if self.step % cfg.ckpt_every == 0 or last:
                self.save()
            if over_budget:
                self.log(f"time budget {cfg.time_budget} reached at step {self.step} of {cfg.max_steps}; "
                         f"continue with --resume --max-steps N --new-decay")
                break
        if metrics is not None:
            metrics.close()
        if board is not None:
            board.close()
        if cfg.export_hf and (self.step == cfg.max_steps or budget_s is not None) and ranks.main:
            from ..hf import save_hf

            if ranks.distributed:  # the whole model, from the checkpoint just written
                from ..dist.checkpoint import load_sharded

                model = load_sharded(self.run_dir / CKPT)
            save_hf(model, cfg.export_hf)
            self.log(f"exported HF checkpoint to {cfg.export_hf}")
        ranks.barrier()
        return losses
