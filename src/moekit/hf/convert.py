"""`moekit convert SRC DST`: any checkpoint `moekit.load_model` reads (a moekit checkpoint, a
training run directory, an HF checkpoint) -> an HF checkpoint (dtype, expert layout, architecture,
shards). From an HF source the token ids and the tokenizer/generation side files carry over."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Iterable, Optional

import torch

from ..checkpoint import CONFIG_FILE as MOEKIT_CONFIG, QUANT_FILE, load_moekit, read_config as read_moekit_config
from ..config import ModelConfig
from ..dist.checkpoint import is_sharded, load_sharded, model_dir
from ..model import Transformer
from ..rundir import is_run_dir
from .io import CONFIG_FILE, MAX_SHARD_BYTES, read_config
from .load import load_hf
from .save import check_representable, save_hf
from .spec import LAYOUTS, config_from_hf, infer_model_type, loadable_types
from .tokenizer import TOKEN_ID_KEYS

# small files beside an HF source's weights that convert carries over unchanged
SIDE_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def _parser() -> argparse.ArgumentParser:
    types = loadable_types()
    parser = argparse.ArgumentParser(
        prog="moekit convert", allow_abbrev=False,
        description="Write a checkpoint as an HF checkpoint that transformers loads with the same logits "
                    f"(change dtype, expert layout or architecture on the way). Writes {', '.join(types)}.",
    )
    parser.add_argument("src", help="a moekit checkpoint, a training run directory (its checkpoint/) "
                                    "or an HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory (created; old weight files in it are replaced)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="dtype of the written weights (default: the source's)")
    parser.add_argument("--model-type", choices=types, default=None,
                        help="architecture to write (default: inferred; see moekit.hf.infer_model_type)")
    parser.add_argument("--layout", choices=LAYOUTS, default="per_expert",
                        help="expert tensors: per_expert (hub format, transformers 4 and 5) "
                             "or fused (transformers >= 5)")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1024**3,
                        help="split the weights into shards of at most this many GiB (default: 2)")
    return parser


def source_dir(src: Path) -> Path:
    """The checkpoint directory `moekit.load_model` reads for `src`: src itself, or a run's checkpoint/
    (checkpoint.old/ mid-swap). (moekit.loading imports moekit.hf, so convert follows its rules here.)"""
    if not src.is_dir():
        raise ValueError(f"checkpoint path {str(src)!r} is not a directory")
    if not (src / MOEKIT_CONFIG).is_file() and is_run_dir(src):
        return model_dir(src)
    return src


def source_config(checkpoint: Path) -> ModelConfig:
    """The ModelConfig of a moekit or HF checkpoint directory, without reading its weights."""
    if (checkpoint / QUANT_FILE).is_file():
        raise ValueError(f"{str(checkpoint)!r} is a quantized checkpoint ({QUANT_FILE}); HF checkpoints hold "
                         "plain weights: convert the checkpoint it was quantized from")
    if (checkpoint / MOEKIT_CONFIG).is_file():
        return read_moekit_config(checkpoint)
    if (checkpoint / CONFIG_FILE).is_file():
        return config_from_hf(read_config(checkpoint))
    raise ValueError(f"{str(checkpoint)!r} is not a checkpoint: expected {MOEKIT_CONFIG} (moekit), {CONFIG_FILE} (HF) "
                     "or a checkpoint/ subdirectory (a training run)")


def _convert(args) -> None:
    src, dst = Path(args.src), Path(args.dst)
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    checkpoint = source_dir(src)
    if dst.exists() and dst.resolve() in (src.resolve(), checkpoint.resolve()):
        raise ValueError("DST must differ from SRC (and from its checkpoint/)")
    with torch.device("meta"):  # the architecture checks fail before reading the weights
        skeleton = Transformer(source_config(checkpoint))
    check_representable(skeleton, args.model_type or infer_model_type(skeleton.cfg), config_only=True)
    hf_source = not (checkpoint / MOEKIT_CONFIG).is_file()
    if hf_source:
        model = load_hf(checkpoint, dtype=args.dtype, progress=True)
    elif is_sharded(checkpoint):  # written under torchrun
        model = load_sharded(checkpoint, args.dtype)
    else:
        model = load_moekit(checkpoint, args.dtype)
    source = json.loads((checkpoint / CONFIG_FILE).read_text()) if hf_source else {}
    extra = {k: source[k] for k in TOKEN_ID_KEYS if source.get(k) is not None}
    save_hf(model, dst, model_type=args.model_type, layout=args.layout,
            max_shard_bytes=int(args.max_shard_gb * 1024**3), extra_config=extra, progress=True)
    for name in SIDE_FILES if hf_source else ():
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, dst / name)
    print(f"wrote {dst} ({args.model_type or infer_model_type(model.cfg)}, {args.layout} layout)", file=sys.stderr)


def cli(argv: Optional[Iterable[str]] = None) -> int:
    """`moekit convert SRC DST [--dtype ...] [--model-type ...] [--layout ...]`; returns the exit code."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed by argparse
        return int(exit_.code or 0)
    try:
        _convert(args)
    except (ValueError, OSError, ImportError) as err:
        print(f"moekit convert: error: {err}", file=sys.stderr)
        return 2
    return 0
