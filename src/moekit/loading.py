"""`load_model`: one entry point for every checkpoint kind moekit reads."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CONFIG_FILE as CHECKPOINT_CONFIG, PathLike, load_moekit
from .dist.checkpoint import is_sharded, load_sharded, model_dir
from .hf import load_hf
from .model import Transformer
from .rundir import is_run_dir


def load_model(path: PathLike, dtype=None, device="cpu") -> Transformer:
    """Load a moekit checkpoint (checkpoint.py), a sharded one written under torchrun (dist/checkpoint.py),
    a training run directory (its checkpoint/, or checkpoint.old/ when a crash interrupted the swap) or an
    HF checkpoint (config.json, via `load_hf`). The model is in eval mode with `model.tokenizer` set (or None).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is not a directory")
    if is_run_dir(path) and not (path / CHECKPOINT_CONFIG).is_file():
        path = model_dir(path)  # its config.json is the training configuration, not a model's
    if is_sharded(path):
        return load_sharded(path, dtype=dtype, device=device)
    if (path / CHECKPOINT_CONFIG).is_file():
        return load_moekit(path, dtype=dtype, device=device)
    if (path / "config.json").is_file():
        return load_hf(path, dtype=dtype, device=device)
    raise ValueError(
        f"{str(path)!r} is not a checkpoint: expected {CHECKPOINT_CONFIG} (moekit), config.json (HF) "
        f"or a checkpoint/ subdirectory (a training run)"
    )
