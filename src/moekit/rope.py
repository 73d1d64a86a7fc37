"""Rotary position embeddings (rotate-half, HF LLaMA numerics) and their scalings.
Legend: B batch, T tokens, H heads, Dh head dim (rotary dim)."""

from __future__ import annotations

import math

import torch


def rope_inv_freq(head_dim: int, theta: float, scaling=None) -> torch.Tensor:
    """Inverse frequencies (Dh/2,), with the configured scaling ("linear", "llama3", "yarn") applied."""
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

        low, high = max(math.floor(dim_at(beta_fast)), 0), min(math.ceil(dim_at(beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions_BT: torch.Tensor, dtype: torch.dtype):
    """cos, sin (B, T, Dh) of the positions."""
    freqs_BTd = positions_BT.float()[..., None] * inv_freq.to(positions_BT.device)
    emb_BTDh = torch.cat([freqs_BTd, freqs_BTd], dim=-1)
    return emb_BTDh.cos().to(dtype), emb_BTDh.sin().to(dtype)


def rope_table(inv_freq: torch.Tensor, max_len: int, dtype: torch.dtype):
    """cos, sin (S_max, Dh) of every position, once: the engine indexes it (batch-invariant bits)."""
    positions_1S = torch.arange(max_len, device=inv_freq.device)[None]
    cos, sin = rope_cos_sin(inv_freq, positions_1S, dtype)
    return cos[0], sin[0]


def apply_rope(x_BHTDh: torch.Tensor, cos_BTDh: torch.Tensor, sin_BTDh: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTDh.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTDh * cos_BTDh[:, None] + rotated * sin_BTDh[:, None]
