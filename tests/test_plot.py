"""`moekit plot` on a metrics.jsonl written by hand: a resume, a dead expert, a torn last line."""

import json
import subprocess
import sys

import pytest

from moekit.plot import expert_share, read_metrics


def train_line(step, loads, loss=3.0):
    return {"step": step, "tokens": 64 * step, "loss": loss, "aux_loss": 0.01, "lr_factor": min(1.0, step / 2),
            "grad_norm": 1.0 / step, "tokens_per_s": 100.0, "mfu": 0.01,
            "expert_load_imbalance": [max(l) * len(l) / sum(l) for l in loads], "expert_load": loads}


def write_run(run):
    run.mkdir()
    lines = [
        {"step": 0, "event": "start"},
        # layer 0: 4 experts; layer 1: expert 2 never gets a token
        train_line(1, [[1, 3, 2, 2], [4, 2, 0, 2]]),
        train_line(2, [[2, 2, 2, 2], [3, 3, 0, 2]]),
        {"step": 2, "tokens": 128, "val_loss": 2.9},
        train_line(3, [[8, 0, 0, 0], [8, 0, 0, 0]], loss=9.0),  # logged, then the run died before a checkpoint
        {"step": 2, "event": "resume"},
        train_line(3, [[0, 4, 2, 2], [2, 4, 0, 2]]),
        train_line(4, [[2, 2, 3, 1], [1, 5, 0, 2]]),
        {"step": 4, "tokens": 256, "val_loss": 2.5},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (run / "metrics.jsonl").write_text(text + '{"step": 5, "tokens": 320, "lo')  # torn by a kill mid-write
    return run


def test_read_metrics_drops_the_torn_line_and_the_rerun_stretch(tmp_path):
    messages = []
    run = read_metrics(write_run(tmp_path / "run"), log=messages.append)
    assert [r["step"] for r in run.train] == [1, 2, 3, 4]
    assert run.train[2]["loss"] == 3.0  # the step 3 logged after the resume, not the one it replaced
    assert [(r["step"], r["val_loss"]) for r in run.val] == [(2, 2.9), (4, 2.5)]
    assert run.resumes == [2]
    assert len(messages) == 1 and "torn last line 10" in messages[0]


def test_expert_share_is_tokens_over_the_mean_and_the_dead_expert_row_is_zero(tmp_path):
    steps, grids = expert_share(read_metrics(write_run(tmp_path / "run"), log=lambda m: None).train)
    assert steps == [1, 2, 3, 4]
    # each step routes 8 tokens over 4 experts: the mean is 2, so the share is tokens / 2
    assert grids[0].tolist() == [[0.5, 1.0, 0.0, 1.0], [1.5, 1.0, 2.0, 1.0], [1.0, 1.0, 1.0, 1.5], [1.0, 1.0, 1.0, 0.5]]
    assert grids[1].tolist() == [[2.0, 1.5, 1.0, 0.5], [1.0, 1.5, 2.0, 2.5], [0.0] * 4, [1.0] * 4]


def test_moekit_plot_writes_the_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    run = write_run(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "moekit.cli", "plot", str(run), "--out", str(tmp_path / "png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torn last line" in proc.stderr + proc.stdout and "Traceback" not in proc.stderr
    paths = proc.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["loss.png", "expert_load.png"]
    for path in paths:
        height, width, _ = imread(path).shape
        assert height > 300 and width > 300


def test_moekit_plot_on_a_directory_without_metrics_is_a_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moekit.cli", "plot", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("moekit plot: error: no metrics.jsonl") and "Traceback" not in proc.stderr
