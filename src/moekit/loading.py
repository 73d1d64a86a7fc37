"""`load_model`: one entry point for every checkpoint kind moekit reads.

    model = load_model("ckpt")           # a moekit checkpoint (checkpoint.py) ...
    model = load_model("runs/x")         # ... a training run directory holding checkpoint/ ...
    model = load_model("hf_dir")         # ... or an HF checkpoint (config.json), via moekit.hf.load_hf

The returned model is in eval mode and has `model.tokenizer` set (a `tokenizers.Tokenizer`,
or None).
"""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CONFIG_FILE as CHECKPOINT_CONFIG
from .checkpoint import PathLike, load_moekit, load_tokenizer
from .hf import load_hf
from .model import Transformer


def load_model(path: PathLike, dtype=None, device="cpu") -> Transformer:
    """Load a moekit checkpoint, a training run directory (path/checkpoint) or an HF checkpoint.

    The returned model is in eval mode and has `model.tokenizer` set (or None).
    """
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint path {str(path)!r} is not a directory")
    if (path / CHECKPOINT_CONFIG).is_file():
        return load_moekit(path, dtype=dtype, device=device)
    if (path / "config.json").is_file() and not (path / "checkpoint").is_dir():
        model = load_hf(path, dtype=dtype, device=device)
        if not hasattr(model, "tokenizer"):
            model.tokenizer = load_tokenizer(path)
        return model.eval()
    if (path / "checkpoint").is_dir():
        return load_model(path / "checkpoint", dtype=dtype, device=device)
    raise ValueError(
        f"{str(path)!r} is not a checkpoint: expected {CHECKPOINT_CONFIG} (moekit), config.json (HF) "
        f"or a checkpoint/ subdirectory (a training run)"
    )
