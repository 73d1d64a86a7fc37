"""Blockwise random Hadamard transform (RHT) along the last dim: each run of `block` values x -> x S H,
H the normalised Sylvester Hadamard matrix (H Hᵀ = I), S = diag of random signs (one sign vector of
`block` entries, drawn fresh for each call and shared by both operands of a GEMM). Q = S H is
orthogonal, so (A Q)(B Q)ᵀ = A Bᵀ: applied to both operands along the reduction dim it leaves the
product unchanged while spreading outliers over the block before quantisation (Tseng et al. 2025).

A last dim that is not a multiple of the block is zero-padded (the product is still unchanged, the
padded result is longer). Legend: K the last dim, G blocks.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch

from .formats import pad_last


@lru_cache(maxsize=None)
def cached_hadamard(block: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(block)


def hadamard_matrix(block: int, device=None) -> torch.Tensor:
    """The normalised Sylvester Hadamard matrix of size block (a power of two), float32."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"Hadamard block size must be a power of two, got {block}")
    return cached_hadamard(block, str(torch.device(device or "cpu")))


def random_signs(block: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    bits = torch.randint(0, 2, (block,), generator=generator, device=device)
    return (bits * 2 - 1).float()


def rht(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """x (..., K) -> (..., K padded to a multiple of block), float32: each block times diag(signs) H."""
    xp = pad_last(x.float(), block)
    q = signs[:, None] * hadamard_matrix(block, xp.device)  # diag(S) H
    x_GB = xp.reshape(*xp.shape[:-1], xp.shape[-1] // block, block)
    return (x_GB @ q).reshape(xp.shape)
