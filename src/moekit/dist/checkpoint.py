"""Sharded checkpoints with torch.distributed.checkpoint (DCP): what a run under torchrun writes, and how one
process reads it back (resume at another world size or EP degree, load_model, convert).

A sharded checkpoint directory (in a run: checkpoint/, written as checkpoint.new/ and swapped in with
renames on rank 0, exactly like a single-process one, moekit/rundir.py):

    .metadata, __<rank>_0.distcp   DCP: {"model": model state, "optim": optimizer state}, keyed by parameter
                                   name (torch.distributed.checkpoint.state_dict), each tensor in its global
                                   shape, so any layout can read it back (DCP reshards on load)
    moekit_config.json             the model's configuration, as in a moekit checkpoint (checkpoint.py)
    tokenizer.json                 when the model has one
    trainer_state.pt               step, data position, configurations, ... (rank 0; no optimizer)
    rng.<rank>.pt                  each rank's RNG states
    checksums.json                 sha256 of every file above (rank 0, after the others finished)

Only the functions that write or read DCP import torch.distributed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import FORMAT_NAME, FORMAT_VERSION, TOKENIZER_FILE, load_tokenizer, read_config
from ..rundir import (CHECKSUMS_FILE, CKPT, CKPT_NEW, CKPT_OLD, CONFIG_FILE, STATE_FILE, WEIGHTS_FILE,
                      missing_files, model_checkpoint, verify_checksums, write_checksums)

METADATA = ".metadata"  # DCP's metadata file: marks a sharded checkpoint
SHARDED_FILES = (CONFIG_FILE, METADATA)
SINGLE_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def is_sharded(path) -> bool:
    return (Path(path) / METADATA).is_file()


def rng_file(rank: int) -> str:
    return f"rng.{rank}.pt"


def run_checkpoint(run_dir, need_state: bool = False, verify: bool = False) -> Optional[Path]:
    """The complete checkpoint of a run, single-process (model.safetensors) or sharded (DCP): checkpoint/,
    or checkpoint.old/ when a crash interrupted the swap. `need_state`: it must hold trainer_state.pt
    (to resume); `verify`: check its checksums. None when there is none."""
    extra = (STATE_FILE,) if need_state else ()
    for name in (CKPT, CKPT_OLD):
        path = Path(run_dir) / name
        if path.is_dir() and any(not missing_files(path, files + extra) for files in (SINGLE_FILES, SHARDED_FILES)):
            if verify:
                verify_checksums(path)
            return path
    return None


def resume_checkpoint(run_dir, verify: bool = True) -> Optional[Path]:
    """The checkpoint to resume a run from (with trainer_state.pt), checksums verified; None when none."""
    return run_checkpoint(run_dir, need_state=True, verify=verify)


def has_sharded_weights(run_dir) -> bool:
    """Whether any checkpoint dir of the run (complete or not) holds DCP shards."""
    return any(is_sharded(Path(run_dir) / name) for name in (CKPT, CKPT_OLD, CKPT_NEW))


def model_dir(run_dir) -> Path:
    """The checkpoint of a run to load weights from, or ValueError saying why there is none."""
    return run_checkpoint(run_dir) or model_checkpoint(run_dir)


# ---------------------------------------------------------------------------- state dicts
def optimizers_of(optimizer) -> list:
    """The torch optimizers inside moekit's CombinedOptimizer (or [optimizer])."""
    return list(getattr(optimizer, "optimizers", {"": optimizer}).values())


def load_states(path, model, optimizer=None) -> None:
    """Read a sharded checkpoint into `model` (and `optimizer`) of any layout: sharded under torchrun,
    or one plain process (then torch.distributed is not started). Resharding is DCP's."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optims = optimizers_of(optimizer) if optimizer is not None else []
    model_sd, optim_sd = get_state_dict(model, optims)
    state = {"model": model_sd, **({"optim": optim_sd} if optims else {})}
    with warnings.catch_warnings():  # one process reading on purpose: DCP's warning about it is noise
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_state_dict(model, optims, model_state_dict=state["model"], optim_state_dict=state.get("optim", {}))


def load_full_states(plain, plain_optimizer, model, optimizer) -> None:
    """Copy a one-device model and optimizer (e.g. from a single-process checkpoint) into their parallelized
    counterparts: every rank holds the full tensors and keeps its shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(plain, optimizers_of(plain_optimizer))
    set_state_dict(model, optimizers_of(optimizer), model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def load_sharded(path, dtype=None, device="cpu"):
    """A one-process Transformer (eval mode, `model.tokenizer` set) from a sharded checkpoint directory."""
    from ..model import Transformer

    path = Path(path)
    verify_checksums(path)
    cfg = read_config(path)
    model = Transformer(cfg.replace(dtype="float32"))
    load_states(path, model)
    if dtype is not None:
        model = model.to(dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype)))
    model = model.to(device)
    model.inv_freq = model.rope_inv_freq().to(device)
    model.tokenizer = load_tokenizer(path)
    return model.eval()


# ---------------------------------------------------------------------------- the run's checkpoint
def save_run_checkpoint(run_dir, model, optimizer, state: dict, model_cfg, tokenizer=None) -> Path:
    """Every rank calls this: write checkpoint.new/ (DCP shards from every rank, the rest from rank 0), then
    rank 0 swaps it in after a barrier, as the single-process save does; returns checkpoint/."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    new, cur, old = Path(run_dir) / CKPT_NEW, Path(run_dir) / CKPT, Path(run_dir) / CKPT_OLD
    if rank == 0:
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizers_of(optimizer))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(new))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, new / rng_file(rank))
    dist.barrier()
    if rank == 0:
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **model_cfg.to_dict()}
        (new / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(str(new / TOKENIZER_FILE))
        torch.save(state, new / STATE_FILE)
        write_checksums(new, sorted(p.name for p in new.iterdir() if p.is_file() and p.name != CHECKSUMS_FILE))
        if cur.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(cur, old)
        os.replace(new, cur)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return cur


def load_rng(path, rank: int) -> Optional[dict]:
    """This rank's RNG states from a sharded checkpoint (None when that rank did not exist then)."""
    file = Path(path) / rng_file(rank)
    return torch.load(file, weights_only=False) if file.is_file() else None
