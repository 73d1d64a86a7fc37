"""`save_hf`: a moekit Transformer -> an HF checkpoint directory; `export_problems`: what keeps a
model configuration from being written (checked before training)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..config import ModelConfig
from ..model import Transformer
from .io import CONFIG_FILE, MAX_SHARD_BYTES, PathLike, dtype_name, resolve_dtype, safetensors, write_weights
from .spec import SPECS, Piece, get_spec, having, infer_model_type
from .tokenizer import TOKEN_ID_KEYS, token_ids, write_generation_config, write_tokenizer


def export_problems(model_cfg: ModelConfig, model_type: Optional[str] = None) -> List[str]:
    """Why a model of `model_cfg` cannot be written as an HF checkpoint ([] when it can), from the
    configuration alone: the trainer checks it before step 1. model_type None: the architecture
    `save_hf` infers. Each reason starts with the architecture's name. A positive bias_update_speed
    counts (training makes router.expert_bias non-zero); `save_hf` checks the weights themselves."""
    try:
        model_type = model_type or infer_model_type(model_cfg)
        spec = get_spec(model_type)
    except ValueError as err:
        return [str(err)]
    problems = spec.problems(model_cfg)
    moe = model_cfg.moe
    if moe is not None and moe.bias_update_speed > 0 and not spec.expert_bias:
        others = "".join(f"; {mt} can, with router={'/'.join(s.routers)}" for mt, s in SPECS.items()
                         if s.loadable and s.expert_bias)
        problems.append(f"bias_update_speed={moe.bias_update_speed} (training makes router.expert_bias non-zero; "
                        f"{model_type} cannot store it{others})")
    return [f"{model_type}: {problem}" for problem in problems]


def check_representable(model: Transformer, model_type: str, config_only: bool = False) -> None:
    """Raise ValueError naming every feature `model_type` cannot represent exactly.
    config_only: skip the checks that read weights (for a model on the meta device)."""
    spec = get_spec(model_type)
    problems = spec.problems(model.cfg)
    biased = [] if config_only or spec.expert_bias else [
        i for i, block in enumerate(model.layers) if block.is_moe and bool(block.ffn.router.expert_bias.any())
    ]
    if biased:
        others = having("expert_bias", "; {} stores it")
        problems.append(f"non-zero router.expert_bias (aux-loss-free balancing) in layers {biased}{others}")
    if problems:
        raise ValueError(f"cannot save this model as {model_type}: " + "; ".join(problems))


def _hf_tensor(state: Dict[str, torch.Tensor], piece: Piece, dtype: torch.dtype) -> torch.Tensor:
    dtype = torch.float32 if piece.float32 else dtype
    if piece.target is None:
        return torch.zeros(piece.shape, dtype=dtype)
    # a copy: safetensors refuses views that share storage (experts of one w13)
    return piece.to_hf(piece.view(state[piece.target].detach())).to("cpu", dtype, copy=True).contiguous()


def dense_state(model: Transformer) -> Dict[str, torch.Tensor]:
    """The state dict with each quantized weight (a packed MXFP4 expert, quantize_model's) dequantized:
    HF checkpoints hold float tensors."""
    from ..quantize.modules import QuantizedWeight

    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, QuantizedWeight):
            state[name] = module.dense()
    return state


def save_hf(model: Transformer, path: PathLike, model_type: Optional[str] = None, layout: str = "per_expert",
            dtype=None, max_shard_bytes: int = MAX_SHARD_BYTES, extra_config: Optional[dict] = None,
            progress: bool = False) -> Path:
    """Write `model` as an HF checkpoint directory that transformers loads with the same logits.

    model_type: a registered architecture (SUPPORTED); None infers it (`infer_model_type`).
    layout: "per_expert" (hub / transformers save_pretrained format; loads in transformers 4
        and 5) or "fused" (3-D gate_up_proj/down_proj expert tensors; transformers >= 5 only).
    dtype: torch.dtype or name for the written tensors; None keeps the model's. Quantized weights
        (packed MXFP4 experts) are written dequantized in that dtype.
    max_shard_bytes: above this the weights are split into shards with an index file.
    extra_config: config.json entries to add (e.g. token ids); they never override ours.
    With `model.tokenizer` set, the tokenizer files transformers' AutoTokenizer needs are written
    (hf/tokenizer.py); token ids (extra_config's, else the tokenizer's end-of-text as bos and eos)
    go to config.json and generation_config.json.
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
    state = dense_state(model)
    shapes = {k: tuple(v.shape) for k, v in state.items()}

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: math.prod(piece.shape_in(shapes.get(piece.target, ()))) * (4 if piece.float32 else itemsize)
             for key, piece in table.items()}
    write_weights(path, sizes, lambda key: _hf_tensor(state, table[key], dtype), max_shard_bytes, progress)

    hf = spec.config_to_hf(cfg, dtype_name(dtype))
    tokenizer = getattr(model, "tokenizer", None)
    for key, value in {**token_ids(tokenizer), **(extra_config or {})}.items():
        hf.setdefault(key, value)
    (path / CONFIG_FILE).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        write_tokenizer(path, tokenizer, cfg.max_seq_len)
    if any(hf.get(key) is not None for key in TOKEN_ID_KEYS):
        write_generation_config(path, hf)
    return path
