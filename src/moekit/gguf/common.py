"""What every GGUF architecture writer shares: the float state dict, the q/k row permutation, the
SwiGLU split, the per-tensor GGML type and its bytes (f32, f16, q8_0, q4_0, mxfp4), and the
attention / RoPE metadata. (Which architecture: moekit.gguf; the file itself: moekit.gguf_export.)
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import numpy as np
import torch

from ..quantize import get_format

TYPES = ("f32", "f16", "q8_0", "q4_0")
QBLOCK = 32  # values per GGML Q8_0 / Q4_0 / MXFP4 block

# (GGUF name, tensor, role): role "matrix", "embed", "output", "f32" (always f32) or "mxfp4" (GGML
# MXFP4 blocks as uint8 (..., N, K/32 * 17), from `mxfp4_ggml_blocks`)
Tensor = Tuple[str, torch.Tensor, str]


def require_gguf():
    try:
        import gguf
    except ImportError:
        raise ValueError("moekit export needs the 'gguf' package: pip install gguf (or moekit[hf])") from None
    return gguf


def float_state(model) -> Dict[str, torch.Tensor]:
    """model.state_dict() with floating tensors as float32 (packed buffers kept as they are)."""
    return {k: v.detach().float() if v.is_floating_point() else v.detach() for k, v in model.state_dict().items()}


def permute_rotary(w_ND: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from rotate-half RoPE (pairs i, i + Dh/2) to llama.cpp's llama RoPE
    (pairs 2i, 2i + 1): within each head, new row 2i = old row i, new row 2i + 1 = old row i + Dh/2."""
    N, D = w_ND.shape
    return w_ND.reshape(n_heads, 2, N // n_heads // 2, D).transpose(1, 2).reshape(N, D)


def swiglu(b: str, suffix: str, w13: torch.Tensor, w2: torch.Tensor, role: str = "matrix") -> Iterator[Tensor]:
    """moekit's fused w13 ((E,) 2F, D: gate rows, then up rows) and w2 -> ffn_gate/up/down{suffix}."""
    F = w13.shape[-2] // 2
    yield b + f"ffn_gate{suffix}.weight", w13[..., :F, :], role
    yield b + f"ffn_up{suffix}.weight", w13[..., F:, :], role
    yield b + f"ffn_down{suffix}.weight", w2, role


def tensor_type(role: str, w: torch.Tensor, file_type: str) -> str:
    """The GGML type one tensor is written in (moekit.gguf_export's docstring)."""
    if role == "mxfp4":
        return "mxfp4"
    if role == "f32" or w.dim() < 2 or file_type == "f32":
        return "f32"
    if file_type == "f16" or w.shape[-1] % QBLOCK:
        return "f16"
    return "q8_0" if file_type == "q4_0" and role == "output" else file_type


def ggml_blocks(packed: Dict[str, torch.Tensor]) -> np.ndarray:
    """moekit's packed q8_0 / q4_0 buffers (..., K) -> GGML blocks [fp16 d, codes] as bytes (..., K/32 * block)."""
    scale_B = packed["scale"].contiguous().numpy().view(np.uint8)  # (..., NB * 2)
    codes = packed["qweight"].contiguous().numpy().view(np.uint8)  # (..., NB * code bytes)
    NB = scale_B.shape[-1] // 2
    lead = codes.shape[:-1]
    blocks = np.concatenate([scale_B.reshape(*lead, NB, 2), codes.reshape(*lead, NB, -1)], axis=-1)
    return blocks.reshape(*lead, -1)


def mxfp4_ggml_blocks(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """moekit's / gpt-oss's mxfp4 (qweight (..., K/2): byte j of a group holds elements 2j (low nibble)
    and 2j + 1 (high); scale (..., K/32) E8M0) -> GGML block_mxfp4 bytes (..., K/32 * 17): [e8m0, 16
    bytes], byte j holding elements j (low) and j + 16 (high). The codes and exponents move unchanged."""
    lead, NB = scale.shape[:-1], scale.shape[-1]
    b_BH = qweight.reshape(*lead, NB, 16)
    codes_BG = torch.stack([b_BH & 15, b_BH >> 4], dim=-1).reshape(*lead, NB, 32)  # element order
    ggml_BH = codes_BG[..., :16] | (codes_BG[..., 16:] << 4)
    return torch.cat([scale.reshape(*lead, NB, 1), ggml_BH], dim=-1).reshape(*lead, NB * 17)


def add_tensor(writer, gguf, name: str, w: torch.Tensor, kind: str) -> None:
    if kind == "f32":
        writer.add_tensor(name, w.contiguous().numpy().astype(np.float32))
    elif kind == "f16":
        writer.add_tensor(name, w.to(torch.float16).contiguous().numpy())
    elif kind == "mxfp4":
        writer.add_tensor(name, w.contiguous().numpy(), raw_dtype=gguf.GGMLQuantizationType.MXFP4)
    else:
        blocks = ggml_blocks(get_format(kind).quantize(w))
        writer.add_tensor(name, blocks, raw_dtype=gguf.GGMLQuantizationType[kind.upper()])


def add_attention_hparams(writer, cfg, key_length: int, value_length: int, rope_dim: int, kv_heads=None) -> None:
    """Context, widths, heads and RoPE (base, linear or YaRN scaling) every architecture writes."""
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads if kv_heads is None else kv_heads)
    writer.add_key_length(key_length)
    writer.add_value_length(value_length)
    writer.add_rope_dimension_count(rope_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    scaling = cfg.rope_scaling
    if scaling is None:
        return
    import gguf

    writer.add_rope_scaling_factor(float(scaling["factor"]))
    if scaling["type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    else:  # yarn (the architectures refuse the others)
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings", 4096)))


def add_expert_hparams(writer, moe, ffn_is_expert: bool = True) -> None:
    """Expert count, experts used per token and the expert size (every MoE arch); `ffn_is_expert`: the
    arch also reads feed_forward_length as the expert size."""
    writer.add_expert_count(moe.num_experts)
    writer.add_expert_used_count(moe.top_k)
    writer.add_expert_feed_forward_length(moe.d_expert)
    if ffn_is_expert:
        writer.add_feed_forward_length(moe.d_expert)


def refuse_rope_scaling(cfg, allowed: Tuple[str, ...], arch: str) -> None:
    kind = (cfg.rope_scaling or {}).get("type")
    if kind is not None and kind not in allowed:
        raise ValueError(f"rope_scaling {kind!r}: the {arch} export writes {' or '.join(('plain',) + allowed)} RoPE")
