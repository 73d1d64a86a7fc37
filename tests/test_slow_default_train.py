"""Slow tier: the default `moekit train` run (small preset, stdlib corpus) reaches the README's validation loss."""

import json

import pytest

from moekit.train import cli

pytestmark = pytest.mark.slow

# the final validation loss of the default run reported in the README (same seed; CPU, 2 cores)
README_VAL_LOSS = 3.3696
TOLERANCE = 0.05


def test_default_run_reaches_reported_val_loss(tmp_path):
    run = tmp_path / "run"
    assert cli(["--out", str(run), "--cache-dir", str(tmp_path / "cache")]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    final = [l["val_loss"] for l in lines if "val_loss" in l][-1]
    assert final <= README_VAL_LOSS + TOLERANCE
