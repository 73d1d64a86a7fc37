"""Files of an HF checkpoint directory: config.json, safetensors (one file or shards named by
an index), dtype names, and a progress line. No architecture knowledge here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import torch

PathLike = Union[str, Path]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_SHARD_BYTES = 2 * 1024**3
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch.dtype, or a name such as "bfloat16"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def safetensors():
    """(safe_open, save_file), or a clear ImportError."""
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as err:
        raise ImportError("HF checkpoints need the 'safetensors' package: pip install safetensors (or moekit[hf])") from err
    return safe_open, save_file


def read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"HF checkpoint {str(path)!r} is not a directory")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"no {CONFIG_FILE} in {str(path)!r}: not an HF checkpoint directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON: {err}") from err


def weight_files(path: Path) -> List[Path]:
    """The safetensors files: one model.safetensors or the shards an index names."""
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ValueError(f"{INDEX_FILE} in {str(path)!r} names shard files that do not exist: {missing}")
        return [path / n for n in names]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ValueError(f"no weights in {str(path)!r}: expected {SINGLE_FILE} or {INDEX_FILE}")


def read_weights(files: List[Path], builder, progress: bool) -> None:
    """Stream every tensor of `files` into `builder` (load.StateBuilder): `expected_shape(key)`
    (None: a tensor it has no place for, collected in `builder.unexpected`), then `add(key, tensor)`."""
    safe_open, _ = safetensors()
    seen = set()
    total = 0
    if progress:  # headers only
        for file in files:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                total += len(list(f.keys()))
    bar = Progress(total, "loading tensors", progress)
    for file in files:  # one shard open at a time
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                if key in seen:
                    raise ValueError(f"tensor {key!r} appears in more than one shard")
                seen.add(key)
                want = builder.expected_shape(key)
                if want is None:
                    builder.unexpected.append(key)
                    continue
                found = tuple(f.get_slice(key).get_shape())
                if found != want:
                    raise ValueError(f"tensor {key!r} has shape {found}, expected {want} (from {file.name})")
                builder.add(key, f.get_tensor(key))
                bar.update()
    bar.close()


def write_weights(path: Path, sizes: Dict[str, int], tensor_for: Callable[[str], torch.Tensor],
                  max_shard_bytes: int, progress: bool) -> None:
    """Write the tensors named by `sizes` (bytes each, in file order) as model.safetensors or as
    shards of at most max_shard_bytes with an index; `tensor_for(name)` makes each one when its
    shard is written, so only one shard is in memory. Old weight files in `path` are removed."""
    _, save_file = safetensors()
    for old in [path / SINGLE_FILE, path / INDEX_FILE, *path.glob("model-*-of-*.safetensors")]:
        if old.is_file():
            old.unlink()
    shards: List[List[str]] = [[]]  # tensor names in order; a tensor bigger than max_shard_bytes gets its own
    used = 0
    for key, size in sizes.items():
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += size
    count = len(shards)
    names = [SINGLE_FILE] if count == 1 else [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]
    bar = Progress(len(sizes), "writing tensors", progress)
    for keys, name in zip(shards, names):
        tensors = {}
        for key in keys:
            tensors[key] = tensor_for(key)
            bar.update()
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    bar.close()
    if count > 1:
        weight_map = {key: name for keys, name in zip(shards, names) for key in keys}
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


class Progress:
    """tqdm on stderr when importable, else a plain counter line; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.count, self._bar = total, desc, enabled, 0, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return  # the plain counter line
            self._bar = tqdm(total=total, desc=desc, file=sys.stderr, unit="tensor")

    def update(self, n: int = 1) -> None:
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and (self.count == self.total or self.count % 64 == 0):
            print(f"\r{self.desc}: {self.count}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            print(file=sys.stderr)
