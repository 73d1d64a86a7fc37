"""Bytes a forward saves for backward (`torch.autograd.graph.saved_tensors_hooks`), for the
memory-contract and analyzer tests and the layer benchmarks."""

from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple, TypeVar

import torch

T = TypeVar("T")


def saved_bytes(fn: Callable[[], T], params: Iterable[torch.Tensor] = ()) -> Tuple[int, T]:
    """Run fn(); (bytes of the distinct storages it saves for backward, its output). Each storage
    counts once; the storages of `params` (weights) are excluded."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), out
