"""Token rounding (SonicMoE): make every expert's token count a multiple of a GEMM tile.

Modes: "up" (ceil, filling with the best-scoring tokens not yet routed there), "down" (floor,
dropping the lowest-scoring ones), "nearest" (ties round up). Within an expert, tokens rank
with the original top-K choices first, then by router score, so rounding up never drops an
original choice and rounding down never adds one. A token's expert count then varies (zero
output with "down") and depends on the batch: for training throughput, not inference.

Legend: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import torch


def rounded_counts(counts_E: torch.Tensor, tile: int, mode: str, max_count: int) -> torch.Tensor:
    """Round each expert's token count to a multiple of `tile` (never above max_count tokens)."""
    offset = {"up": tile - 1, "down": 0, "nearest": tile // 2}[mode]  # mode validated by MoEConfig
    return (torch.div(counts_E + offset, tile, rounding_mode="floor") * tile).clamp(max=max_count)


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
