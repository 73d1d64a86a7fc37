"""`load_hf`: an HF checkpoint directory -> a moekit Transformer, through the architecture's spec."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..checkpoint import load_tokenizer
from ..model import Transformer
from .io import PathLike, dtype_name, read_config, read_weights, resolve_dtype, weight_files
from .packed import QuantizedParts, quant_method
from .spec import Piece, get_spec


def _listing(items: List[str], limit: int = 8) -> str:
    """a, b and 3 more"""
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


class StateBuilder:
    """Collects moekit tensors from HF pieces, checking shapes and coverage; the parts of quantized
    tensors (hf/packed.py) are joined first: into float tensors, or packed weights (`self.packed`)."""

    def __init__(self, table: Dict[str, Piece], shapes: Dict[str, torch.Size], dtype, device,
                 parts: Optional[QuantizedParts] = None):
        self.table, self.shapes, self.dtype, self.device = table, shapes, dtype, device
        self.parts = parts or QuantizedParts(None, {})
        self.state: Dict[str, torch.Tensor] = {}
        self.packed: Dict[str, object] = {}  # target -> QuantizedWeight (MXFP4 experts kept packed)
        self.read: Dict[str, List[str]] = defaultdict(list)  # target -> HF keys read
        self.unexpected: List[str] = []

    def expected_shape(self, key: str) -> Optional[Tuple[int, ...]]:
        split = self.parts.split(key)
        if split is not None:
            return self.parts.expected_shape(key, self.expected_shape(split[0]))
        piece = self.table.get(key)
        return None if piece is None else piece.shape_in(self.shapes.get(piece.target, ()))

    def add(self, key: str, tensor: torch.Tensor) -> None:
        split = self.parts.split(key)
        if split is not None or self.parts.waits_for(key, tensor):
            base, part = split or (key, "")
            whole = self.parts.add(base, tensor, part)
            if isinstance(whole, tuple):
                self.add_packed(base, *whole[1:])
            elif whole is not None:
                self.add(base, whole)
            return
        piece = self.table[key]
        if piece.target is None:
            return
        self.read[piece.target].append(key)
        dtype = torch.float32 if piece.float32 else self.dtype
        tensor = piece.from_hf(tensor)
        if piece.whole:
            self.state[piece.target] = tensor.to(self.device, dtype).contiguous()
            return
        full = self.state.get(piece.target)
        if full is None:
            full = self.state[piece.target] = torch.empty(self.shapes[piece.target], dtype=dtype, device=self.device)
        piece.view(full).copy_(tensor)

    def add_packed(self, key: str, blocks: torch.Tensor, scales: torch.Tensor) -> None:
        """An MXFP4 matrix kept packed; HF's interleaved gate/up rows reordered to moekit's halves."""
        from ..quantize.modules import QuantizedWeight

        piece = self.table[key]
        if piece.layout == "interleave_t":
            blocks, scales = (torch.cat(t.unflatten(1, (-1, 2)).unbind(2), dim=1) for t in (blocks, scales))
        self.read[piece.target].append(key)
        self.packed[piece.target] = QuantizedWeight.from_mxfp4_blocks(blocks.to(self.device), scales.to(self.device),
                                                                      self.dtype)

    def check_complete(self) -> None:
        waiting = self.parts.incomplete()
        if waiting:
            parts = _listing([f"{k!r} (has {', '.join(p or 'weight' for p in v)})" for k, v in waiting.items()])
            raise ValueError(f"incomplete quantized tensors in the checkpoint: {parts}")
        if self.unexpected:
            unexpected = _listing([repr(k) for k in self.unexpected])
            raise ValueError(f"unexpected tensors in the checkpoint (moekit has no place for them): {unexpected}")
        keys_by_target: Dict[str, List[str]] = defaultdict(list)
        for key, piece in self.table.items():
            if piece.target is not None:
                keys_by_target[piece.target].append(key)
        missing: List[str] = []
        for target, keys in keys_by_target.items():
            if target in self.read or not all(self.table[k].optional for k in keys):
                missing += self._missing_for(target, keys)
        if missing:
            raise ValueError(f"missing tensors in the checkpoint: {_listing(missing)}")

    def _missing_for(self, target: str, keys: List[str]) -> List[str]:
        """Descriptions of what `target` still lacks: one whole tensor, or every per-expert piece."""
        got = self.read.get(target, [])
        whole_got = [k for k in got if self.table[k].whole]
        if len(whole_got) > 1 or (whole_got and len(got) > len(whole_got)):
            got_keys = _listing([repr(k) for k in got])
            raise ValueError(f"tensors {got_keys} all provide {target!r}; a checkpoint must hold only one of them")
        if whole_got:
            return []
        whole_keys = [k for k in keys if self.table[k].whole]
        part_keys = [k for k in keys if not self.table[k].whole]
        if got or not whole_keys:  # (some) pieces read: every piece is needed
            got_set = set(got)
            return [repr(k) for k in part_keys if k not in got_set]
        alternatives = " or ".join(repr(k) for k in whole_keys)
        if part_keys:
            alternatives += f" (or its per-expert tensors such as {part_keys[0]!r})"
        return [alternatives]


def materialize(model: Transformer, state: Dict[str, torch.Tensor], device, packed=None) -> None:
    """Assign the loaded tensors to the meta-device model (no second copy), the packed weights in
    place of their float parameters; zero the buffers HF does not store (expert_bias, token counters)
    and rebuild the RoPE table."""
    for target, weight in (packed or {}).items():
        module_name, name = target.rsplit(".", 1)
        module = model.get_submodule(module_name)
        delattr(module, name)
        setattr(module, name, weight)
        state.update({f"{target}.{k}": v for k, v in weight.state_dict().items()})
    if packed:
        model.quantization = {"method": "mxfp4", "quantize_head": False, "experts_only": True}
    buffers = {name for name, _ in model.named_buffers()}
    for name, meta in model.state_dict().items():
        if name in state:
            continue
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            state[name] = state["embed.weight"]
        else:
            assert name in buffers, f"internal: no HF tensor maps to parameter {name!r}"
            state[name] = torch.zeros(meta.shape, dtype=meta.dtype, device=device)
    model.load_state_dict(state, strict=True, assign=True)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.inv_freq = model.rope_inv_freq().to(device)


def load_hf(path: PathLike, dtype=None, device="cpu", progress: bool = False,
            dequantize: bool = False) -> Transformer:
    """Load an HF checkpoint directory as a moekit Transformer (eval mode).

    dtype: torch.dtype or name; None keeps config.json's dtype. Shards are read one at a
    time straight into the final tensors. `model.tokenizer` is the directory's
    tokenizer.json as a `tokenizers.Tokenizer`, or None. Quantized checkpoints (hf/packed.py):
    block-FP8 weights are dequantized; MXFP4 experts (gpt-oss) stay packed as weight-only mxfp4
    (`model.quantization`), or become float weights with dequantize=True (for training).
    """
    path = Path(path)
    hf = read_config(path)
    spec = get_spec(hf.get("model_type"))
    dtype = resolve_dtype(dtype)
    parsed = spec.parse_config(hf, dtype=None if dtype is None else dtype_name(dtype))
    cfg = parsed.cfg
    files = weight_files(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    shapes = {name: t.shape for name, t in model.state_dict().items()}
    # both layouts: a checkpoint may hold either (even mixed per layer); a tied model's may hold an equal lm_head
    table = {**spec.tensor_table(cfg, "per_expert"), **spec.tensor_table(cfg, "fused")}
    if cfg.tie_embeddings:
        table["lm_head.weight"] = Piece("lm_head.weight", optional=True)
    parts = QuantizedParts(quant_method(hf), hf, spec.mxfp4_matrices, dequantize)
    builder = StateBuilder(table, shapes, cfg.torch_dtype, torch.device(device), parts)
    read_weights(files, builder, progress)
    builder.unexpected = [key for key in builder.unexpected if not spec.skips(key, cfg)]
    builder.check_complete()
    head_VD = builder.state.pop("lm_head.weight", None) if cfg.tie_embeddings else None
    if head_VD is not None and not torch.equal(head_VD, builder.state["embed.weight"]):  # transformers would untie
        raise ValueError("config.json has tie_word_embeddings=true but the checkpoint's lm_head.weight differs from "
                         "model.embed_tokens.weight; set tie_word_embeddings to false to load both")
    materialize(model, builder.state, device, builder.packed)
    if parsed.attention_factor != 1.0:  # scale q and k so scores match transformers' YaRN cos/sin (RoPE is linear)
        with torch.no_grad():
            for attn in (block.attn for block in model.layers):
                for module in (attn.q_norm, attn.k_norm) if attn.q_norm is not None else (attn.q_proj, attn.k_proj):
                    for param in module.parameters():
                        param.mul_(parsed.attention_factor)
    model.tokenizer = load_tokenizer(path)
    return model.eval()
