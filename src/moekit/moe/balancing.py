"""Load balancing: Switch, sequence-wise (DeepSeek-V3) and z losses, unweighted (the layer
applies the coefficients), and the aux-loss-free bias update. Formulas: docs/formulas.md.

`reduce` (None, or a sum over data-parallel ranks with autograd: moekit.dist.ep.GlobalSum)
makes a loss that of the global batch: the same value on every rank.

Legend: T tokens, E experts, B sequences, S tokens per sequence, P pairs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

Reduce = Optional[Callable[[torch.Tensor], torch.Tensor]]


def global_mean(values_N: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """Mean of `values_N`, over all ranks' values under `reduce`."""
    if reduce is None:
        return values_N.mean()
    sum_count = reduce(torch.stack([values_N.sum(), values_N.new_tensor(float(values_N.numel()))]))
    return sum_count[0] / sum_count[1]


def switch_loss(probs_TE: torch.Tensor, top1_T: torch.Tensor, reduce: Reduce = None) -> torch.Tensor:
    """E * sum_i f_i * P_i (multiply by alpha for the Switch aux loss)."""
    T, E = probs_TE.shape
    if reduce is None:
        f_E = torch.bincount(top1_T, minlength=E).to(probs_TE.dtype) / T
        P_E = probs_TE.mean(dim=0)
        return E * torch.sum(f_E * P_E)
    counts_E = reduce(torch.bincount(top1_T, minlength=E).to(probs_TE.dtype))
    sum_E = reduce(probs_TE.sum(dim=0))
    T_global = counts_E.sum()  # one first choice per token
    return E * torch.sum((counts_E / T_global) * (sum_E / T_global))


def sequence_aux_loss(
    probs_TE: torch.Tensor, token_idx_P: torch.Tensor, expert_idx_P: torch.Tensor, seq_len: int, top_k: int,
    reduce: Reduce = None,
) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss (unweighted): mean over sequences of sum_i f_i P_i."""
    T, E = probs_TE.shape
    B = T // seq_len
    counts_BE = torch.zeros(B, E, dtype=probs_TE.dtype, device=probs_TE.device)
    counts_BE.index_put_((token_idx_P // seq_len, expert_idx_P), torch.ones_like(token_idx_P, dtype=probs_TE.dtype), accumulate=True)
    f_BE = counts_BE * (E / (top_k * seq_len))
    P_BE = probs_TE.view(B, seq_len, E).mean(dim=1)
    return global_mean((f_BE * P_BE).sum(dim=-1), reduce)


def z_loss(logits_TE: torch.Tensor, reduce: Reduce = None) -> torch.Tensor:
    """Router z-loss (unweighted): mean over tokens of logsumexp(logits)^2."""
    return global_mean(torch.logsumexp(logits_TE, dim=-1).square(), reduce)


@torch.no_grad()
def bias_update(expert_bias_E: torch.Tensor, load_E: torch.Tensor, gamma: float) -> torch.Tensor:
    """In place: an overloaded expert's bias goes down by gamma, an underloaded one's up. Returns the change."""
    load_E = load_E.to(torch.float64)
    delta_E = gamma * torch.sign(load_E.mean() - load_E)
    expert_bias_E.add_(delta_E.to(expert_bias_E.dtype))
    return delta_E.to(expert_bias_E.dtype)
