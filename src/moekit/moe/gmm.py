"""Grouped (varlen-M) matrix multiplies over token rows grouped by expert, in plain PyTorch.

`ExpertRows` lays out the P pairs, sorted by expert, as GEMM rows: a grid of E blocks of
`block` rows (each expert's first `block` pairs, zero rows where it has fewer; one `bmm`)
and a compact tail of the pairs beyond `block` (one GEMM per overflowing expert). block = 0
is the compact layout (no padding); block = max count is fully padded. `choose_block` picks
the block by a cost model (constants below), tuned at E=256, K=8, T=4096 on CPU
(benchmarks/moe_layer.py; tables in benchmarks/results/moe_layer_cpu.md).

Operations: gather / scatter_add (token rows in, token sums out), to_rows / to_pairs (a
per-pair tensor in and out of the layout), mm (out[rows_e] = a[rows_e] @ w[e].T, or @ w[e]
with w_transposed) and wgrad (out[e] = a[rows_e].T @ b[rows_e]).

`gemm`: a low-precision recipe (moekit.lowp.recipes.Recipe) or None. With one, mm is the recipe's
forward GEMM (dgrad with w_transposed) and wgrad its wgrad GEMM: the operands are quantised along the
reduction dim (K of a and w; for wgrad each expert's own rows, whatever the layout) and multiplied as
the recipe's execution says (Recipe.runs_as: emulated in float32, or FP8 scaled matmuls, one per
expert row range), the result in a's dtype. These are all the expert GEMMs of moe/grouped.py.

Legend: T tokens, P pairs (sorted by expert), R rows of the layout, E experts, K/N dims,
B candidate block sizes (choose_block).
"""

from __future__ import annotations

from typing import List, Tuple, Union

import torch
import torch.nn.functional as F

LAYOUTS = ("auto", "compact", "padded")
# cost model of choose_block, in "grid rows": a tail row costs about 3 grid rows
# (small per-expert GEMMs are slower than one bmm), each tail GEMM call about 64
TAIL_ROW_COST = 3.0
TAIL_CALL_COST = 64.0
# with this many rows per expert on average the per-expert GEMMs are already efficient
# (compact beat padded at E=32, K=4, T=4096, i.e. 512 rows per expert: benchmarks/moe_layer.py)
MAX_MEAN_ROWS_FOR_GRID = 256


class ExpertRows:
    def __init__(self, tok_P: torch.Tensor, counts_E: torch.Tensor, num_tokens: int, block: int, gemm=None):
        E, P = counts_E.numel(), tok_P.numel()
        device = tok_P.device
        self.num_tokens, self.num_experts, self.block = num_tokens, E, block
        self.gemm = gemm
        self.counts = counts_E.tolist() if gemm is not None else None
        self.grid_rows = E * block
        over_E = (counts_E - block).clamp(min=0)
        self.num_rows = self.grid_rows + int(over_E.sum())
        tail_start_E = self.grid_rows + torch.cumsum(over_E, 0) - over_E
        self.tail: List[Tuple[int, int, int]] = [
            (e, s, s + n) for e, (s, n) in enumerate(zip(tail_start_E.tolist(), over_E.tolist())) if n > 0
        ]
        if block == 0:  # compact: rows are the sorted pairs themselves
            self.slot_P, self.tok_R = None, tok_P
            return
        expert_P = torch.repeat_interleave(torch.arange(E, device=device), counts_E)
        rank_P = torch.arange(P, device=device) - (torch.cumsum(counts_E, 0) - counts_E)[expert_P]
        self.slot_P = torch.where(rank_P < block, expert_P * block + rank_P, tail_start_E[expert_P] + rank_P - block)
        # padding slots point at row T, the zero row that gather() appends
        self.tok_R = torch.full((self.num_rows,), num_tokens, dtype=tok_P.dtype, device=device)
        self.tok_R[self.slot_P] = tok_P

    def gather(self, src_TD: torch.Tensor) -> torch.Tensor:
        if self.slot_P is None:
            return src_TD.index_select(0, self.tok_R)
        return F.pad(src_TD, (0, 0, 0, 1)).index_select(0, self.tok_R)

    def scatter_add(self, rows_RD: torch.Tensor) -> torch.Tensor:
        extra = 0 if self.slot_P is None else 1
        out_TD = rows_RD.new_zeros(self.num_tokens + extra, rows_RD.shape[1])
        return out_TD.index_add_(0, self.tok_R, rows_RD)[: self.num_tokens]

    def to_rows(self, v_P: torch.Tensor) -> torch.Tensor:
        if self.slot_P is None:
            return v_P
        v_R = v_P.new_zeros((self.num_rows,) + tuple(v_P.shape[1:]))
        v_R[self.slot_P] = v_P
        return v_R

    def to_pairs(self, v_R: torch.Tensor) -> torch.Tensor:
        return v_R if self.slot_P is None else v_R[self.slot_P]

    def _grid(self, a_RK: torch.Tensor) -> torch.Tensor:
        return a_RK[: self.grid_rows].view(self.num_experts, self.block, a_RK.shape[-1])

    def mm(self, a_RK: torch.Tensor, w_ENK: torch.Tensor, w_transposed: bool = False) -> torch.Tensor:
        if self.gemm is not None:  # quantised operands (float32, reduction dim possibly padded)
            role, b_ENK = ("dgrad", w_ENK.transpose(1, 2)) if w_transposed else ("fwd", w_ENK)
            if self.gemm.runs_as(role, a_RK.device) == "scaled_mm":
                return self.gemm.grouped_product(role, a_RK, b_ENK, self.row_ranges())
            a_q, w_q = self.gemm.operands(role, a_RK, b_ENK)
            return self.plain_mm(a_q, w_q.transpose(1, 2)).to(a_RK.dtype)
        return self.plain_mm(a_RK, w_ENK if w_transposed else w_ENK.transpose(1, 2))

    def plain_mm(self, a_RK: torch.Tensor, w_EKN: torch.Tensor) -> torch.Tensor:
        out_RN = a_RK.new_empty(self.num_rows, w_EKN.shape[2])
        if self.block:
            torch.bmm(self._grid(a_RK), w_EKN, out=self._grid(out_RN))
        for e, start, end in self.tail:
            torch.mm(a_RK[start:end], w_EKN[e], out=out_RN[start:end])
        return out_RN

    def row_ranges(self) -> List[Tuple[int, int, int]]:
        """(expert, start, end) of every block of rows one expert owns: its grid block, then its tail."""
        grid = [(e, e * self.block, (e + 1) * self.block) for e in range(self.num_experts)] if self.block else []
        return grid + self.tail

    def expert_rows(self, e: int) -> torch.Tensor:
        """Row indices of expert e's pairs in sorted order (grid part, then tail; no padding rows)."""
        grid = torch.arange(e * self.block, e * self.block + min(self.counts[e], self.block))
        tails = [torch.arange(s, t) for x, s, t in self.tail if x == e]
        return torch.cat([grid] + tails)

    def wgrad(self, a_RK: torch.Tensor, b_RN: torch.Tensor) -> torch.Tensor:
        if self.gemm is not None:  # per expert: quantise along its rows (the reduction dim)
            out_EKN = a_RK.new_zeros(self.num_experts, a_RK.shape[1], b_RN.shape[1])
            for e in range(self.num_experts):
                if self.counts[e]:
                    rows = self.expert_rows(e).to(a_RK.device)
                    out_EKN[e] = self.gemm.product("wgrad", a_RK[rows].t(), b_RN[rows].t())
            return out_EKN
        if self.block:
            out_EKN = torch.bmm(self._grid(a_RK).transpose(1, 2), self._grid(b_RN))
            for e, start, end in self.tail:
                out_EKN[e].addmm_(a_RK[start:end].t(), b_RN[start:end])
            return out_EKN
        out_EKN = a_RK.new_zeros(self.num_experts, a_RK.shape[1], b_RN.shape[1])  # experts without rows: 0
        for e, start, end in self.tail:
            torch.mm(a_RK[start:end].t(), b_RN[start:end], out=out_EKN[e])
        return out_EKN


def choose_block(counts_E: torch.Tensor, device: torch.device, layout: Union[str, int] = "auto") -> int:
    """Grid block size: 0 for 'compact', the largest count for 'padded', an int as given,
    and for 'auto' the cost-model minimum on CPU when experts are small (else 0)."""
    if isinstance(layout, int) and not isinstance(layout, bool):
        if layout < 0:
            raise ValueError(f"grouped layout block must be >= 0, got {layout}")
        return layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown grouped layout {layout!r}; choose one of {LAYOUTS} or an int block size")
    E, P = counts_E.numel(), int(counts_E.sum())
    if layout == "compact" or P == 0:
        return 0
    if layout == "padded":
        return int(counts_E.max())
    if device.type != "cpu" or P > MAX_MEAN_ROWS_FOR_GRID * E:
        return 0
    candidates_B = torch.unique(torch.cat([counts_E.new_zeros(1), counts_E]))
    over_BE = (counts_E[None, :] - candidates_B[:, None]).clamp(min=0)
    cost_B = E * candidates_B + TAIL_ROW_COST * over_BE.sum(1) + TAIL_CALL_COST * (over_BE > 0).sum(1)
    return int(candidates_B[torch.argmin(cost_B)])
