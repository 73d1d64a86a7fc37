"""The learning-rate schedule, new decay phases on resume, and fitting max_steps to a time budget.

`lr_factor(step, cfg)` multiplies the base learning rates: linear warmup over `warmup_steps`, then
cosine to `min_lr_ratio` at `max_steps`, or warmup-stable-decay (flat, then a linear decay over the
last `decay_fraction` of the steps).

An *anchor* (step a, factor f_a) starts a new decay phase there: a resumed run whose `max_steps`
changed continues from the factor it had (no jump) and decays to `min_lr_ratio` at the new
`max_steps` — cosine from f_a over [a, max_steps), or wsd: flat at f_a until the new decay start,
then linear. Without an anchor, changing max_steps would recompute the whole curve and jump (a
cosine run at step 400 of 400 sits at 0.1; recomputed for 800 steps it would be at 0.57).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

Anchor = Optional[Tuple[int, float]]


def lr_factor(step: int, cfg, anchor: Anchor = None) -> float:
    """Multiplier of the base learning rates at `step` (0-based)."""
    lo = cfg.min_lr_ratio
    if anchor is not None and step >= anchor[0]:
        start, peak = anchor
    elif step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    else:
        start, peak = cfg.warmup_steps, 1.0
    if cfg.schedule == "cosine":
        progress = (step - start) / max(1, cfg.max_steps - start)
        return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = max(start, int(cfg.max_steps * (1 - cfg.decay_fraction)))
    if step < decay_start:
        return peak
    progress = (step - decay_start) / max(1, cfg.max_steps - decay_start)
    return peak - (peak - lo) * min(progress, 1.0)


def new_decay_anchor(step: int, old_cfg, old_anchor: Anchor) -> Anchor:
    """The anchor that continues a run at `step` from the factor its old schedule gives there
    (None while still warming up: the warmup ends as planned and the curve after it is new)."""
    if old_anchor is None and step < old_cfg.warmup_steps:
        return None
    return step, lr_factor(step, old_cfg, old_anchor)


def fit_steps(budget_s: float, elapsed_s: float, steps_done: int, step_s: float, cfg) -> int:
    """The largest max_steps whose remaining steps, evaluations and checkpoints end within the budget.

    `step_s` is a measured training step; an evaluation batch costs about a third of one (forward only,
    per micro-batch), a checkpoint is counted as one step.
    """
    eval_s = step_s * cfg.eval_batches / (3 * cfg.grad_accum)
    per_step = step_s + eval_s / cfg.eval_every + step_s / cfg.ckpt_every
    remaining = budget_s - elapsed_s - eval_s - step_s  # the final evaluation and checkpoint
    return max(steps_done + 1, min(cfg.max_steps, steps_done + int(remaining / per_step)))
