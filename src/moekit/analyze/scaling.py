"""The fine-grained MoE scaling law of Krajewski et al. 2024 and its compute-optimal (N, D, G) for a FLOP
budget (docs/formulas.md#fine-grained-scaling-law). Pure arithmetic: no torch, no numpy.

    L(N, D, G) = c + (g / G^gamma + a) / N^alpha + b / D^beta        (MoE, paper Eq. 9)
    L(N, D)    = c + a / N^alpha + b / D^beta                        (dense, Eq. 1)

N: non-embedding parameters without the router, d²·(8E + 4)·n_blocks at expansion rate E (attention 4d²,
E FFNs of 8d² per block); D: training tokens; G = d_ff / d_expert with d_ff = 4d (the paper's G, not
SonicMoE's d / d_expert). FLOPs (Eq. 10, Appendix E): F = (12d²·c_f + d·E·G·c_r)·D·n_blocks with c_f = 6,
c_r = 14 (the router), embeddings excluded; d = 64·n_blocks (Section 6.1). The optimum over N for each G
is found by golden-section search on log d, then the best G of `GRANULARITIES`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SOURCE = ("Krajewski et al. 2024, 'Scaling Laws for Fine-Grained Mixture of Experts', arXiv:2402.07871: "
          "Eq. 9 with Table 1's fitted coefficients; FLOPs of Eq. 10 / Appendix E")


@dataclass(frozen=True)
class Law:
    """Loss = c + (g / G^gamma + a) / N^alpha + b / D^beta; g = 0 is the dense law (Eq. 1)."""

    a: float
    alpha: float
    b: float
    beta: float
    c: float
    g: float = 0.0
    gamma: float = 0.0

    def loss(self, N: float, D: float, G: float = 1.0) -> float:
        granular = self.g / G**self.gamma if self.g else 0.0
        return self.c + (granular + self.a) / N**self.alpha + self.b / D**self.beta

    def coefficients(self) -> Dict[str, float]:
        return asdict(self)


MOE_LAW = Law(a=18.1, alpha=0.115, b=30.8, beta=0.147, c=0.47, g=2.1, gamma=0.58)  # Table 1, MoE (E = 64)
DENSE_LAW = Law(a=16.3, alpha=0.126, b=26.7, beta=0.127, c=0.47)  # Table 1, Dense
C_F = 6  # training FLOPs per active parameter per token (2 forward + 4 backward)
C_R = 14  # training FLOPs per router parameter per token (Appendix E: logits, gradients, routing in and out)
EXPANSION = 64  # E: total MoE-layer parameters over one dense FFN's; the law was fitted at 64
WIDTH_PER_BLOCK = 64  # d_model = 64 · n_blocks (Section 6.1); also the head dimension of the paper's models
GRANULARITIES: Tuple[int, ...] = tuple(2**k for k in range(8))  # 1 .. 128, the paper's log-spaced G


def n_blocks(d: float) -> float:
    return d / WIDTH_PER_BLOCK


def total_params(d: float, expansion: int = EXPANSION) -> float:
    """N of the law: d²·(8E + 4)·n_blocks (no embeddings, no router)."""
    return d * d * (8 * expansion + 4) * n_blocks(d)


def active_params(d: float) -> float:
    """N_act: 12·d² per block (attention 4d², the FFN's worth of experts 8d²)."""
    return 12 * d * d * n_blocks(d)


def flops_per_token(d: float, G: float, expansion: int = EXPANSION) -> float:
    """Training FLOPs per token, Eq. 10: (12d²·c_f + d·E·G·c_r)·n_blocks; G = 0: dense (no router)."""
    return (12 * d * d * C_F + d * expansion * G * C_R) * n_blocks(d)


@dataclass(frozen=True)
class Point:
    """A model on the iso-FLOP curve: width d (continuous), G (0: dense), N, N_act, D and the loss."""

    G: int
    d_model: float
    n_blocks: float
    params: float  # N of the law
    active_params: float
    tokens: float
    flops: float
    loss: float

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def point(flops: float, G: int, d: float, law: Optional[Law] = None) -> Point:
    """The model of width d and granularity G trained on what `flops` buys (G = 0: the dense law)."""
    D = flops / flops_per_token(d, G)
    if G == 0:
        N = active_params(d)
        loss = (law or DENSE_LAW).loss(N, D)
    else:
        N = total_params(d)
        loss = (law or MOE_LAW).loss(N, D, G)
    return Point(G, d, n_blocks(d), N, active_params(d), D, flops, loss)


def golden_min(f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-10) -> float:
    """The x in [lo, hi] minimizing a unimodal f (golden-section search)."""
    r = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - r * (hi - lo), lo + r * (hi - lo)
    f1, f2 = f(x1), f(x2)
    while hi - lo > tol:
        if f1 < f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - r * (hi - lo)
            f1 = f(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + r * (hi - lo)
            f2 = f(x2)
    return (lo + hi) / 2


def best_width(flops: float, G: int, law: Optional[Law] = None) -> Point:
    """The loss-minimizing width at granularity G on the iso-FLOP curve of `flops`."""
    check_budget(flops)
    log_d = golden_min(lambda x: point(flops, G, math.exp(x), law).loss, math.log(8.0), math.log(1e7))
    return point(flops, G, math.exp(log_d), law)


def optimum(flops: float, granularities: Sequence[int] = GRANULARITIES, law: Optional[Law] = None
            ) -> Tuple[Point, List[Point]]:
    """(the compute-optimal MoE, the best model at each granularity) for a budget of `flops`."""
    curve = [best_width(flops, G, law) for G in granularities]
    return min(curve, key=lambda p: p.loss), curve


def dense_optimum(flops: float, law: Optional[Law] = None) -> Point:
    """The compute-optimal dense Transformer (Chinchilla-style, F = 6·N·D) under the dense law."""
    return best_width(flops, 0, law)


def dense_flops_for_loss(loss: float, law: Optional[Law] = None) -> float:
    """The budget at which the compute-optimal dense model reaches `loss` (bisection on log F)."""
    lo, hi = math.log(1e10), math.log(1e40)
    if dense_optimum(math.exp(hi), law).loss > loss:
        return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        if dense_optimum(math.exp(mid), law).loss > loss:
            lo = mid
        else:
            hi = mid
    return math.exp(hi)


def optimum_for_active(n_active: float, granularities: Sequence[int] = GRANULARITIES, law: Optional[Law] = None
                       ) -> Point:
    """The compute-optimal MoE whose N_act is `n_active` (how Table 2 lists its rows): bisection on the budget."""
    lo, hi = math.log(1e12), math.log(1e40)
    for _ in range(80):
        mid = (lo + hi) / 2
        if optimum(math.exp(mid), granularities, law)[0].active_params < n_active:
            lo = mid
        else:
            hi = mid
    return optimum(math.exp((lo + hi) / 2), granularities, law)[0]


def check_budget(flops: float) -> None:
    if not (isinstance(flops, (int, float)) and math.isfinite(flops) and flops > 0):
        raise ValueError(f"the FLOP budget must be a positive number, got {flops!r}")
