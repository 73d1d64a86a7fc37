"""The moekit checkpoint format: `save_model`, `load_moekit` (loading.py's `load_model` reads every kind).

A moekit checkpoint is a directory:

    moekit_config.json   ModelConfig.to_dict() plus {"format": "moekit", "version": 1}
    model.safetensors    the state dict (lm_head.weight is left out when the embeddings are tied)
    checksums.json       {file: sha256} of the files above and below (rundir.py); verified on load, so
                         a corrupt file is an error naming it. Older checkpoints without it load unverified.
    tokenizer.json       optional: a `tokenizers.Tokenizer`, saved when `model.tokenizer` is set
    quantization.json    optional: {"method", "quantize_head"} of a `moekit.quantize`d model, whose
                         model.safetensors then holds the packed buffers (see moekit/quantize)

safetensors and tokenizers are imported only when a function needs them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch

from .config import ModelConfig
from .model import Transformer
from .moe.config import RUNTIME_FIELDS
from .quantize import quantize_model
from .rundir import CONFIG_FILE, WEIGHTS_FILE, verify_checksums, write_checksums

TOKENIZER_FILE = "tokenizer.json"
QUANT_FILE = "quantization.json"  # present in checkpoints of moekit.quantize'd models
FORMAT_NAME = "moekit"
FORMAT_VERSION = 1

PathLike = Union[str, os.PathLike]


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:
        raise ImportError(
            "moekit checkpoints need the 'safetensors' package: pip install safetensors (or moekit[hf])"
        ) from None
    return st


# ---------------------------------------------------------------------------- save
def save_model(model: Transformer, path: PathLike) -> Path:
    """Write `model` as a moekit checkpoint directory at `path`, atomically (a temp directory beside it,
    renamed into place; on an error it is removed and `path` is left as it was). An existing directory at
    `path` is replaced only when empty or a moekit checkpoint."""
    st = _safetensors()
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"cannot save a checkpoint to {str(path)!r}: it exists and is not a directory")
        if any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
            raise ValueError(
                f"refusing to replace {str(path)!r}: it is a non-empty directory that is not a moekit checkpoint"
            )
    path.parent.mkdir(parents=True, exist_ok=True)

    cfg = model.cfg
    state = model.state_dict()
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    tensors = {name: t.detach().contiguous().cpu() for name, t in state.items()}

    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, **cfg.to_dict()}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        st.save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        written = [CONFIG_FILE, WEIGHTS_FILE]
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save(str(tmp / TOKENIZER_FILE))
            written.append(TOKENIZER_FILE)
        if getattr(model, "quantization", None):  # moekit.quantize: {"method", "quantize_head"}
            (tmp / QUANT_FILE).write_text(json.dumps(model.quantization) + "\n")
            written.append(QUANT_FILE)
        write_checksums(tmp, written)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}-{tmp.name[-8:]}"
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except BaseException:
            if old is not None:  # put the previous checkpoint back
                os.rename(old, path)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ---------------------------------------------------------------------------- load
def load_tokenizer(path: PathLike):
    """`tokenizers.Tokenizer` from path/tokenizer.json, or None (no file, or the package is missing)."""
    file = Path(path) / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # the tokenizers package raises a bare Exception on a bad file
        raise ValueError(f"{str(file)!r} is not a readable tokenizer (truncated or corrupt?): {err}") from None


def read_quantization(path: PathLike):
    """{"method", "quantize_head"} of path/quantization.json, or None (not a quantized checkpoint)."""
    file = Path(path) / QUANT_FILE
    if not file.is_file():
        return None
    try:
        quant = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
    if not isinstance(quant, dict):
        raise ValueError(f"{str(file)!r} is not a JSON object")
    return quant


def read_config(path: PathLike) -> ModelConfig:
    """The ModelConfig of a moekit checkpoint directory."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"moekit checkpoint {str(path)!r} has no {CONFIG_FILE}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(file)!r} is not a JSON object")
    fmt, version = data.pop("format", None), data.pop("version", None)
    if fmt != FORMAT_NAME:
        raise ValueError(f"{str(file)!r} has format {fmt!r}, expected {FORMAT_NAME!r}")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{str(file)!r} has format version {version!r}; this moekit reads versions <= {FORMAT_VERSION}"
        )
    known = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{str(file)!r} has unknown ModelConfig fields {unknown} (written by a newer moekit?)")
    if isinstance(data.get("moe"), dict):  # older checkpoints saved the expert backend: a runtime setting
        data["moe"] = {k: v for k, v in data["moe"].items() if k not in RUNTIME_FIELDS}
    return ModelConfig.from_dict(data)


def load_moekit(path: PathLike, dtype=None, device="cpu") -> Transformer:
    """Load a moekit checkpoint directory, in eval mode, with `model.tokenizer` (or None: no
    tokenizer.json or no `tokenizers` package). `dtype`: None, a torch.dtype or a name ("bfloat16").
    A missing, truncated or corrupt file (checksums.json) is a ValueError naming it."""
    st = _safetensors()
    path = Path(path)
    if dtype is not None and not isinstance(dtype, torch.dtype):
        if not (isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype)):
            raise ValueError(f"unknown dtype {dtype!r}; use a torch.dtype or a name such as 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    verify_checksums(path)
    cfg = read_config(path)
    if dtype is not None:
        cfg = cfg.replace(dtype=str(dtype).removeprefix("torch."))
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"moekit checkpoint {str(path)!r} has no {WEIGHTS_FILE}")
    from safetensors import SafetensorError

    try:
        state = st.load_file(str(weights), device=str(device))
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{str(weights)!r} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    quant = read_quantization(path)

    # build without initialising (meta), then adopt the loaded tensors
    with torch.device("meta"):
        model = Transformer(cfg)
        if quant is not None:  # rebuild the quantized modules (on meta) before adopting the stored buffers
            quantize_model(model, **quant)
    param_names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    if dtype is not None:
        state = {k: v.to(dtype) if k in param_names and v.is_floating_point() else v for k, v in state.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state.get("embed.weight")
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected or any(v is None for v in state.values()):
        raise ValueError(
            f"{str(weights)!r} does not match the config: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    # non-persistent buffers are not in the file
    model.inv_freq = model.rope_inv_freq().to(device)
    leftover = [name for name, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise ValueError(f"tensors not restored from {str(weights)!r}: {leftover[:8]}")
    model.tokenizer = load_tokenizer(path)
    return model.eval()
