"""Choosing each request's next token from its logits row, independently of the other rows.

Greedy rows: argmax (a row-wise op, batched). Sampled rows: one at a time with the request's
own `torch.Generator`, through `moekit.generate`'s filters (temperature, top-k, top-p), so a
seeded request draws the same tokens alone or among others, and the same as
`generate(model, [prompt], seed=s)` draws for it (given equal logits).

Legend: R rows (requests with logits this step), V vocab.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..generate import sample_next


def choose_tokens(logits_RV: torch.Tensor, seqs) -> List[Tuple[int, Optional[float]]]:
    """(token, logprob or None) per row; seqs[r] has .params and .generator."""
    R = logits_RV.shape[0]
    out: List[Optional[int]] = [None] * R
    greedy = [r for r in range(R) if seqs[r].params.temperature == 0]
    if greedy:
        idx = torch.tensor(greedy, device=logits_RV.device)
        for r, t in zip(greedy, torch.argmax(logits_RV.index_select(0, idx), dim=-1).tolist()):
            out[r] = t
    for r in range(R):
        if out[r] is None:
            p = seqs[r].params
            out[r] = int(sample_next(logits_RV[r:r + 1], float(p.temperature), p.top_k, p.top_p,
                                     seqs[r].generator)[0])
    want = [r for r in range(R) if seqs[r].params.logprobs]
    logprobs: List[Optional[float]] = [None] * R
    if want:
        idx = torch.tensor(want, device=logits_RV.device)
        lp_RV = torch.log_softmax(logits_RV.index_select(0, idx), dim=-1)
        for j, r in enumerate(want):
            logprobs[r] = float(lp_RV[j, out[r]])
    return list(zip(out, logprobs))
