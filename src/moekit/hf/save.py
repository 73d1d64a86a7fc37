"""`save_hf` (a moekit Transformer -> an HF checkpoint directory) and `moekit convert` (`cli`)."""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path
from typing import Dict, Iterable, Optional

import torch

from ..checkpoint import TOKENIZER_FILE
from ..model import Transformer
from .io import CONFIG_FILE, MAX_SHARD_BYTES, PathLike, dtype_name, read_config, resolve_dtype, safetensors, write_weights
from .load import load_hf
from .spec import LAYOUTS, Piece, config_from_hf, get_spec, infer_model_type, loadable_types

# small files beside the weights that `moekit convert` carries over unchanged
SIDE_FILES = ("generation_config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# config.json keys `moekit convert` carries over (token ids moekit's config does not hold)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def check_representable(model: Transformer, model_type: str, config_only: bool = False) -> None:
    """Raise ValueError naming every feature `model_type` cannot represent exactly.
    config_only: skip the checks that read weights (for a model on the meta device)."""
    problems = get_spec(model_type).problems(model.cfg)
    biased = [] if config_only else [
        i for i, block in enumerate(model.layers) if block.is_moe and bool(block.ffn.router.expert_bias.any())
    ]
    if biased:
        problems.append(f"non-zero router.expert_bias (aux-loss-free balancing) in layers {biased}")
    if problems:
        raise ValueError(f"cannot save this model as {model_type}: " + "; ".join(problems))


def _hf_tensor(state: Dict[str, torch.Tensor], piece: Piece, dtype: torch.dtype) -> torch.Tensor:
    if piece.target is None:
        return torch.zeros(piece.shape, dtype=dtype)
    # a copy: safetensors refuses views that share storage (experts of one w13)
    return piece.view(state[piece.target].detach()).to("cpu", dtype, copy=True).contiguous()


def save_hf(model: Transformer, path: PathLike, model_type: Optional[str] = None, layout: str = "per_expert",
            dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES, extra_config: Optional[dict] = None,
            progress: bool = False) -> Path:
    """Write `model` as an HF checkpoint directory that transformers loads with the same logits.

    model_type: a registered architecture (SUPPORTED); None infers it (`infer_model_type`).
    layout: "per_expert" (hub / transformers save_pretrained format; loads in transformers 4
        and 5) or "fused" (3-D gate_up_proj/down_proj expert tensors; transformers >= 5 only).
    dtype: torch.dtype or name for the written tensors; None keeps the model's.
    max_shard_bytes: above this the weights are split into shards with an index file.
    extra_config: config.json entries to add (e.g. token ids); they never override ours.
    """
    safetensors()  # a clear ImportError before anything is written
    if not isinstance(model, Transformer):
        raise ValueError(f"save_hf expects a moekit Transformer, got {type(model).__name__}")
    cfg = model.cfg
    model_type = model_type or infer_model_type(cfg)
    check_representable(model, model_type)
    spec = get_spec(model_type)
    dtype = resolve_dtype(dtype) or model.embed.weight.dtype
    table = spec.tensor_table(cfg, layout)
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: math.prod(piece.shape_in(shapes.get(piece.target, ()))) * itemsize for key, piece in table.items()}
    write_weights(path, sizes, lambda key: _hf_tensor(state, table[key], dtype), max_shard_bytes, progress)

    hf = spec.config_to_hf(cfg, dtype_name(dtype))
    for key, value in (extra_config or {}).items():
        hf.setdefault(key, value)
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save(str(path / TOKENIZER_FILE))
    return path


def _parser() -> argparse.ArgumentParser:
    types = loadable_types()
    parser = argparse.ArgumentParser(
        prog="moekit convert",
        description="Re-save an HF-format MoE checkpoint (change dtype, expert layout or architecture name). "
                    f"Reads and writes {', '.join(types)}.",
    )
    parser.add_argument("src", help="HF checkpoint directory (config.json + safetensors)")
    parser.add_argument("dst", help="output directory (created; old weight files in it are replaced)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="dtype of the written weights (default: the source's)")
    parser.add_argument("--model-type", choices=types, default=None,
                        help="architecture to write (default: inferred; see moekit.hf.infer_model_type)")
    parser.add_argument("--layout", choices=LAYOUTS, default="per_expert",
                        help="expert tensors: per_expert (hub format, transformers 4 and 5) or fused (transformers >= 5)")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 1024**3,
                        help="split the weights into shards of at most this many GiB (default: 2)")
    return parser


def _convert(args) -> None:
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and src.resolve() == dst.resolve():
        raise ValueError("DST must differ from SRC")
    if args.max_shard_gb <= 0:
        raise ValueError(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    source_config = read_config(src)
    if args.model_type is not None:  # fail before reading the weights
        with torch.device("meta"):
            check_representable(Transformer(config_from_hf(source_config)), args.model_type, config_only=True)
    model = load_hf(src, dtype=args.dtype, progress=True)
    extra = {k: source_config[k] for k in TOKEN_ID_KEYS if source_config.get(k) is not None}
    save_hf(model, dst, model_type=args.model_type, layout=args.layout, max_shard_bytes=int(args.max_shard_gb * 1024**3),
            extra_config=extra, progress=True)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
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
