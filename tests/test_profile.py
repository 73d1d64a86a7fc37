"""`moekit profile`: every component's time is attributed (forward ranges + backward by sequence number)."""

import json

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.profile import COMPONENTS, run_profile


@pytest.mark.parametrize("mode", ["train", "decode"])
def test_profile_attributes_time_to_components(mode, tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", first_k_dense=1, n_layers=3)
    model = Transformer(cfg)
    trace = tmp_path / "trace.json"
    r = run_profile(model, mode=mode, steps=2, batch=2, seq=32, trace=str(trace))
    rows = {row["component"]: row for row in r["components"]}
    assert set(rows) == set(COMPONENTS)
    for comp in ("attention", "experts", "router", "dense_ffn", "head"):
        assert rows[comp]["seconds"] > 0, comp
    # attributed time cannot exceed the wall time, and FLOPs shares are a distribution
    assert sum(row["seconds"] for row in r["components"] if row["component"] != "other") <= r["wall_s"] * 1.05
    assert sum(row["flops_share"] for row in r["components"]) == pytest.approx(1.0)
    assert rows["norms"]["flops_share"] == 0 and rows["experts"]["flops_share"] > 0
    names = {e.get("name", "") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "moekit::experts" in names and "moekit::attention" in names


def test_profile_backward_is_attributed():
    """Backward ops land on their forward component: experts' share in training exceeds its forward-only time."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    r = run_profile(model, mode="train", steps=1, batch=2, seq=32)
    other = next(row for row in r["components"] if row["component"] == "other")
    assert other["time_share"] < 0.6


def test_profile_cli_errors(capsys):
    from moekit.cli import main  # the entry point turns ValueError into `moekit profile: error: ...`, exit 2

    assert main(["profile", "no-such-preset"]) == 2
    assert "tiny" in capsys.readouterr().err
    assert main(["profile", "qwen3-30b-a3b"]) == 2
    assert "moekit analyze" in capsys.readouterr().err
    assert main(["profile", "tiny", "--seq", "100000", "--trace", ""]) == 2
    assert "max_seq_len" in capsys.readouterr().err
