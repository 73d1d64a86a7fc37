"""Grouped (varlen-M) matrix multiplies over token rows grouped by expert, in plain PyTorch.

Two row layouts, one interface, so the grouped backend is written once:

CompactRows  rows are the P pairs sorted by expert; expert e owns rows
             offsets[e]:offsets[e+1]. GEMMs loop over experts with `out=` slices:
             no padding and empty experts cost nothing.
PaddedRows   rows are E blocks of M_max (the largest expert's count); pair p sits
             at slot_P[p] and unused slots are zero rows. GEMMs are one `bmm`.
             Measured on the 2-core AVX512-BF16 CI machine, bf16 bmm over
             (256 experts x ~165 rows) ran at 632 GFLOP/s against 342 for the
             per-expert loop. Padding costs E*M_max/P times the work, so it only
             pays when experts are small and routing balanced (see `choose_layout`).

Both layouts expose the same operations:
    gather(src_TD)            rows of src for every slot (zeros for padding)
    scatter_add(rows_RD)      sum rows back into their tokens -> (T, D)
    to_rows(v_P) / to_pairs(v_R)  move a per-pair tensor (sorted order) in/out of the layout
    mm(a_RK, w_ENK)           out[rows_e] = a[rows_e] @ w[e].T   (w_transposed: @ w[e])
    wgrad(a_RK, b_RN)         out[e] = a[rows_e].T @ b[rows_e]   -> (E, K, N)

Legend: T tokens, P pairs (sorted by expert), R rows of the layout, E experts, K/N dims.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

LAYOUTS = ("auto", "compact", "padded")
# padded bmm pays for E*M_max rows; above this ratio to the P real rows it loses
MAX_PADDING_RATIO = 2.0
# with many rows per expert the per-expert GEMMs are already efficient: stay compact
MAX_MEAN_ROWS_FOR_PADDING = 256


class CompactRows:
    def __init__(self, tok_P: torch.Tensor, counts_E: torch.Tensor, num_tokens: int):
        self.tok_P = tok_P
        self.num_tokens = num_tokens
        self.num_experts = counts_E.numel()
        self.offsets: List[int] = [0] + torch.cumsum(counts_E, 0).tolist()

    def gather(self, src_TD: torch.Tensor) -> torch.Tensor:
        return src_TD.index_select(0, self.tok_P)

    def scatter_add(self, rows_RD: torch.Tensor) -> torch.Tensor:
        out_TD = rows_RD.new_zeros(self.num_tokens, rows_RD.shape[1])
        return out_TD.index_add_(0, self.tok_P, rows_RD)

    def to_rows(self, v_P: torch.Tensor) -> torch.Tensor:
        return v_P

    def to_pairs(self, v_R: torch.Tensor) -> torch.Tensor:
        return v_R

    def mm(self, a_RK: torch.Tensor, w_ENK: torch.Tensor, w_transposed: bool = False) -> torch.Tensor:
        N = w_ENK.shape[2] if w_transposed else w_ENK.shape[1]
        out_RN = a_RK.new_empty(a_RK.shape[0], N)
        for e in range(self.num_experts):
            start, end = self.offsets[e], self.offsets[e + 1]
            if end > start:
                w = w_ENK[e] if w_transposed else w_ENK[e].t()
                torch.mm(a_RK[start:end], w, out=out_RN[start:end])
        return out_RN

    def wgrad(self, a_RK: torch.Tensor, b_RN: torch.Tensor) -> torch.Tensor:
        out_EKN = a_RK.new_empty(self.num_experts, a_RK.shape[1], b_RN.shape[1])
        for e in range(self.num_experts):
            start, end = self.offsets[e], self.offsets[e + 1]
            if end > start:
                torch.mm(a_RK[start:end].t(), b_RN[start:end], out=out_EKN[e])
            else:
                out_EKN[e].zero_()
        return out_EKN


class PaddedRows:
    def __init__(self, tok_P: torch.Tensor, counts_E: torch.Tensor, num_tokens: int):
        E = counts_E.numel()
        self.num_tokens, self.num_experts = num_tokens, E
        self.block = max(int(counts_E.max()), 1) if E else 1
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        expert_P = torch.repeat_interleave(torch.arange(E, device=tok_P.device), counts_E)
        rank_P = torch.arange(tok_P.numel(), device=tok_P.device) - starts_E[expert_P]
        self.slot_P = expert_P * self.block + rank_P
        # padding slots point at row T, a zero row appended by gather()
        self.tok_R = torch.full((E * self.block,), num_tokens, dtype=tok_P.dtype, device=tok_P.device)
        self.tok_R[self.slot_P] = tok_P

    def gather(self, src_TD: torch.Tensor) -> torch.Tensor:
        return F.pad(src_TD, (0, 0, 0, 1)).index_select(0, self.tok_R)

    def scatter_add(self, rows_RD: torch.Tensor) -> torch.Tensor:
        out_TD = rows_RD.new_zeros(self.num_tokens + 1, rows_RD.shape[1])
        return out_TD.index_add_(0, self.tok_R, rows_RD)[: self.num_tokens]

    def to_rows(self, v_P: torch.Tensor) -> torch.Tensor:
        v_R = v_P.new_zeros((self.tok_R.numel(),) + tuple(v_P.shape[1:]))
        v_R[self.slot_P] = v_P
        return v_R

    def to_pairs(self, v_R: torch.Tensor) -> torch.Tensor:
        return v_R[self.slot_P]

    def _blocks(self, a_RK: torch.Tensor) -> torch.Tensor:
        return a_RK.view(self.num_experts, self.block, a_RK.shape[-1])

    def mm(self, a_RK: torch.Tensor, w_ENK: torch.Tensor, w_transposed: bool = False) -> torch.Tensor:
        w = w_ENK if w_transposed else w_ENK.transpose(1, 2)
        return torch.bmm(self._blocks(a_RK), w).view(a_RK.shape[0], -1)

    def wgrad(self, a_RK: torch.Tensor, b_RN: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self._blocks(a_RK).transpose(1, 2), self._blocks(b_RN))


def choose_layout(counts_E: torch.Tensor, dtype: torch.dtype, device: torch.device, layout: str = "auto") -> str:
    """'padded' for CPU runs with few rows per expert and balanced routing, else 'compact'.

    Measured on the 2-core CI machine (benchmarks/results/moe_layer_cpu.md): one bmm beat
    the per-expert loop when experts averaged ~128 rows (E=256, K=8, T=4096) in float32
    and bfloat16, even at 1.46x padding, and lost when they averaged 512 rows (E=32, K=4).
    """
    if layout != "auto":
        if layout not in LAYOUTS:
            raise ValueError(f"unknown grouped layout {layout!r}; choose one of {LAYOUTS}")
        return layout
    P, E = int(counts_E.sum()), counts_E.numel()
    if P == 0 or device.type != "cpu" or P > MAX_MEAN_ROWS_FOR_PADDING * E:
        return "compact"
    return "padded" if E * int(counts_E.max()) <= MAX_PADDING_RATIO * P else "compact"


def make_layout(tok_P: torch.Tensor, counts_E: torch.Tensor, num_tokens: int, kind: str):
    return PaddedRows(tok_P, counts_E, num_tokens) if kind == "padded" else CompactRows(tok_P, counts_E, num_tokens)
