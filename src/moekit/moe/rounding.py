"""Token rounding (SonicMoE): make every expert's token count a multiple of a GEMM tile.

A grouped GEMM pads each expert's rows up to the tile size; an expert with
129 tokens at tile 128 pays for 256 rows. Token rounding changes the routing so
each count is a multiple of the tile:

- "up":      ceil to the tile, filling with the best-scoring tokens not yet routed there;
- "down":    floor to the tile, dropping the expert's lowest-scoring tokens;
- "nearest": whichever multiple is closer (ties round up).

Within an expert, tokens are ranked with the original top-K choices first, then by
router score, and the first `target` are kept. So rounding up never drops an original
choice and rounding down never adds a new one.

Trade-off: tokens per pair stop being exactly K (a token can gain experts, or lose
all of them with "down", when its routed output is zero), so the layer's function
changes slightly and depends on the batch; in exchange no GEMM tile is partly empty.
Use it for training throughput on GPUs; leave it off (the default) for exact
top-K semantics and for inference.

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def rounded_counts(counts_E: torch.Tensor, tile: int, mode: str, max_count: int) -> torch.Tensor:
    """Round each expert's token count to a multiple of `tile` (never above max_count tokens)."""
    if mode == "up":
        target_E = torch.div(counts_E + tile - 1, tile, rounding_mode="floor") * tile
    elif mode == "down":
        target_E = torch.div(counts_E, tile, rounding_mode="floor") * tile
    elif mode == "nearest":
        target_E = torch.div(counts_E + tile // 2, tile, rounding_mode="floor") * tile
    else:
        raise ValueError(f"unknown token rounding mode {mode!r}; choose 'nearest', 'up' or 'down'")
    return target_E.clamp(max=max_count)


@torch.no_grad()
def round_selection(select_TE: torch.Tensor, topk_idx_TK: torch.Tensor, tile: int, mode: str) -> torch.Tensor:
    """Return a (T, E) bool mask of the rounded routing."""
    T, E = select_TE.shape
    chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=select_TE.device)
    chosen_TE.scatter_(1, topk_idx_TK, True)
    target_E = rounded_counts(chosen_TE.sum(dim=0), tile, mode, T)
    # rank tokens per expert: original choices first, then by score (two stable sorts);
    # masked-out scores (-inf, from group limiting) rank last
    by_score_ET = torch.argsort(select_TE.t(), dim=1, descending=True, stable=True)
    chosen_sorted_ET = chosen_TE.t().gather(1, by_score_ET).to(torch.int8)
    chosen_first_ET = torch.argsort(chosen_sorted_ET, dim=1, descending=True, stable=True)
    order_ET = by_score_ET.gather(1, chosen_first_ET)
    rank_ET = torch.empty_like(order_ET)
    rank_ET.scatter_(1, order_ET, torch.arange(T, device=select_TE.device).expand(E, T))
    return (rank_ET < target_E[:, None]).t()
