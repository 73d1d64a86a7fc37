"""`moekit plot RUN_DIR`: PNGs of a training run from its metrics.jsonl.

    loss.png         train and validation loss against tokens seen
    expert_load.png  per MoE layer, max/mean tokens per expert over training (a heatmap:
                     1.0 is perfectly balanced)

Needs matplotlib (`pip install matplotlib`, part of the `dev` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional


def read_metrics(run_dir: Path) -> tuple:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"no metrics.jsonl in {str(run_dir)!r} (is it a moekit run directory?)")
    train, val = [], []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            (val if "val_loss" in record else train).append(record)
    if not train:
        raise ValueError(f"{path} has no training lines yet")
    return train, val


def plot_run(run_dir, out_dir: Optional[str] = None) -> List[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("moekit plot needs matplotlib: pip install matplotlib") from None
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    train, val = read_metrics(run_dir)

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        ax.plot([r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set(xlabel="tokens seen", ylabel="cross-entropy (nats/token)", title=f"{run_dir.name}: loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    paths = [out / "loss.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    rows = [r["expert_load_imbalance"] for r in train if r.get("expert_load_imbalance")]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3 + 0.2 * len(rows[0])))
        grid = [[row[layer] for row in rows] for layer in range(len(rows[0]))]
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(train[0]["step"] - 0.5, train[-1]["step"] + 0.5, len(grid) - 0.5, -0.5))
        fig.colorbar(image, ax=ax, label="max / mean tokens per expert")
        ax.set(yticks=range(len(grid)), xlabel="step", ylabel="MoE layer (in order)",
               title=f"{run_dir.name}: expert load imbalance")
        fig.tight_layout()
        paths.append(out / "expert_load.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def cli(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moekit plot", description="Write loss and expert-load PNGs for a run directory.")
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="where to write the PNGs (default: the run directory)")
    args = p.parse_args(argv)
    try:
        for path in plot_run(args.run_dir, args.out):
            print(path)
    except ValueError as exc:
        print(f"moekit plot: error: {exc}", file=sys.stderr)
        return 2
    return 0
