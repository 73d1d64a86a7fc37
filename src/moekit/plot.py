"""`moekit plot RUN_DIR`: PNGs of a training run from its metrics.jsonl.

    loss.png         three panels against the step: train and validation loss, the learning-rate
                     factor, the gradient norm (before clipping); tokens seen on the top axis
    expert_load.png  one heatmap per MoE layer: x the step, y the expert, colour the expert's share
                     of the routed tokens relative to uniform (1 = its fair share, 0 = dead, 3 = three
                     times its share), so a hot or a dead expert shows as a red or blue stripe

Resume points (`{"step": S, "event": "resume"}` lines the trainer writes) are dashed vertical lines
on every panel. A resume at step S replaces what the run logged after S before it stopped, so those
older lines are dropped. A torn last line (a run killed mid-write) is dropped with a note (moekit.rundir.read_metrics).

Needs matplotlib (`pip install matplotlib`, part of the `dev` extra).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

from . import rundir


class RunMetrics(NamedTuple):
    train: list  # training lines, in step order
    val: list  # evaluation lines (they carry val_loss)
    resumes: list  # steps at which the run was resumed


def split_metrics(records: List[dict]) -> RunMetrics:
    """Sort the lines into training, evaluation and resume events; a resume at step S drops the lines
    logged after S before it (that stretch was run again)."""
    kept, resumes = [], []
    for record in records:
        if record.get("event") == "resume":
            resumes.append(record["step"])
            kept = [r for r in kept if r["step"] <= record["step"]]
        elif "event" not in record:
            kept.append(record)
    train = [r for r in kept if "loss" in r]
    val = [r for r in kept if "val_loss" in r]
    return RunMetrics(train, val, resumes)


def read_metrics(run_dir: Path, log: Callable[[str], None] = print) -> RunMetrics:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"no metrics.jsonl in {str(run_dir)!r} (is it a moekit run directory?)")
    run = split_metrics([r for r in rundir.read_metrics(path, log) if "step" in r])
    if not run.train:
        raise ValueError(f"{path} has no training lines yet")
    return run


def expert_share(train: List[dict]):
    """(steps, grids): grids[layer] is a float array [experts, logged steps] of each expert's share of
    that layer's routed tokens relative to uniform, tokens_e / mean_e(tokens_e): 1 is balanced, 0 dead."""
    import numpy as np

    rows = [r for r in train if r.get("expert_load")]
    if not rows:
        return [], []
    steps = [r["step"] for r in rows]
    grids = []
    for layer in range(len(rows[0]["expert_load"])):
        load_ES = np.array([r["expert_load"][layer] for r in rows], dtype=np.float64).T
        mean_S = load_ES.mean(axis=0)
        grids.append(np.divide(load_ES, mean_S, out=np.zeros_like(load_ES), where=mean_S > 0))
    return steps, grids


def _mark_resumes(ax, resumes: list) -> None:
    for i, step in enumerate(resumes):
        ax.axvline(step, color="grey", linestyle="--", linewidth=1, label="resume" if i == 0 else None)


def _loss_figure(plt, name: str, run: RunMetrics):
    train, val = run.train, run.val
    steps = [r["step"] for r in train]
    fig, (loss_ax, lr_ax, grad_ax) = plt.subplots(3, 1, figsize=(7, 7.5), sharex=True, layout="constrained",
                                                   gridspec_kw={"height_ratios": [2, 1, 1]})
    loss_ax.plot(steps, [r["loss"] for r in train], label="train loss")
    if val:
        loss_ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    loss_ax.set(ylabel="cross-entropy (nats/token)", title=f"{name}: loss")
    last = train[-1]
    if last.get("tokens") and last["step"]:
        per_step = last["tokens"] / last["step"]
        top = loss_ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
        top.set_xlabel("tokens seen")
    for ax, key, label in ((lr_ax, "lr_factor", "lr / peak lr"), (grad_ax, "grad_norm", "gradient norm")):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points))
        ax.set(ylabel=label)
    grad_ax.set(xlabel="step")
    for ax in (loss_ax, lr_ax, grad_ax):
        _mark_resumes(ax, run.resumes)
        ax.grid(alpha=0.3)
    loss_ax.legend()
    return fig


def _expert_figure(plt, name: str, run: RunMetrics, steps: list, grids: list):
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import MaxNLocator

    n_layers = len(grids)
    n_cols = math.ceil(n_layers / 8)
    n_rows = math.ceil(n_layers / n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(6 * n_cols, 1.2 + 2.2 * n_rows), squeeze=False,
                             sharex=True, layout="constrained")
    top = max(2.0, max(float(g.max()) for g in grids))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top)
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        grid = grids[layer]
        # pcolormesh with cell edges halfway between logged steps keeps uneven logging honest
        edges = [steps[0] - half] + [(a + b) / 2 for a, b in zip(steps, steps[1:])] + [steps[-1] + half]
        n_experts = grid.shape[0]
        image = ax.pcolormesh(edges, [e - 0.5 for e in range(n_experts + 1)], grid, cmap="RdBu_r", norm=norm)
        ax.set(ylim=(n_experts - 0.5, -0.5), ylabel=f"layer {layer}: expert")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        _mark_resumes(ax, run.resumes)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    fig.suptitle(f"{name}: share of routed tokens per expert (1 = uniform, 0 = dead)")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="tokens / mean tokens per expert")
    return fig


def plot_run(run_dir, out_dir: Optional[str] = None, log: Callable[[str], None] = print) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("moekit plot needs matplotlib: pip install matplotlib") from None
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    run = read_metrics(run_dir, log)

    figures = [("loss.png", _loss_figure(plt, run_dir.name, run))]
    steps, grids = expert_share(run.train)
    if grids:
        figures.append(("expert_load.png", _expert_figure(plt, run_dir.name, run, steps, grids)))
    paths = []
    for filename, fig in figures:
        paths.append(out / filename)
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moekit plot", description="Write loss and expert-load PNGs for a run directory.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: the run directory)")
    args = p.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out, log=lambda msg: print(msg, file=sys.stderr)):
            print(path)
    except ValueError as exc:
        print(f"moekit plot: error: {exc}", file=sys.stderr)
        return 2
    return 0
