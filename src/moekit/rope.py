"""Rotary position embeddings (rotate-half, HF LLaMA numerics) and their scalings. Partial rotary
(GLM-4.5, MiniMax-M2): cos/sin are R = ModelConfig.rope_dim wide and `apply_rope` rotates the first R
dims of each head (rotate-half within them), passing the rest through, as transformers does.
Legend: B batch, T tokens, H heads, Dh head dim, R rotary dim (<= Dh)."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> torch.Tensor:
    """Inverse frequencies (R/2,) for rotary dim R = head_dim (the rotated width), with the configured scaling
    ("linear", "llama3", "yarn"; yarn's "truncate": False as transformers) applied."""
    dim = head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = scaling or {}
    kind = scaling.get("type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "yarn":
        factor = scaling["factor"]
        old_len = scaling.get("original_max_position_embeddings", 4096)
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

        def dim_at(rotations):
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low, high = dim_at(beta_fast), dim_at(beta_slow)
        if scaling.get("truncate", True):  # gpt-oss: truncate=False keeps the fractional range
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions_BT: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, T, R) of the positions (R = 2 * len(inv_freq))."""
    freqs_BTd = positions_BT.float()[..., None] * inv_freq.to(positions_BT.device)
    emb_BTDh = torch.cat([freqs_BTd, freqs_BTd], dim=-1)
    return emb_BTDh.cos().to(dtype), emb_BTDh.sin().to(dtype)


def rope_table(inv_freq: torch.Tensor, max_len: int, dtype: torch.dtype):
    """cos, sin (S_max, R) of every position, once: the engine indexes it (batch-invariant bits)."""
    positions_1S = torch.arange(max_len, device=inv_freq.device)[None]
    cos, sin = rope_cos_sin(inv_freq, positions_1S, dtype)
    return cos[0], sin[0]


def apply_rope(x_BHTDh: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    """RoPE on the first R = cos.shape[-1] dims of each head; the other Dh - R pass through."""
    R = cos_BTR.shape[-1]
    if R == x_BHTDh.shape[-1]:
        return rotate(x_BHTDh, cos_BTR, sin_BTR)
    return torch.cat([rotate(x_BHTDh[..., :R], cos_BTR, sin_BTR), x_BHTDh[..., R:]], dim=-1)


def rotate(x_BHTR: torch.Tensor, cos_BTR: torch.Tensor, sin_BTR: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTR.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTR * cos_BTR[:, None] + rotated * sin_BTR[:, None]
