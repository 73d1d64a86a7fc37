"""Training a gpt-oss-shaped model (sinks, sliding + full layers, biased clamped-SwiGLU experts, router
bias) with the real `moekit train` command: the loss falls on the corpus fixture, and the run's
checkpoint generates the same tokens through the engine as through `generate`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moekit import load_model
from moekit.engine import Engine, SamplingParams
from moekit.generate import generate

MOEKIT = str(Path(sys.executable).parent / "moekit")


@pytest.mark.slow  # a real training run: about a minute on 2 busy cores
def test_train_gpt_oss_tiny_lowers_the_loss(corpus, tmp_path):
    run = tmp_path / "run"
    done = subprocess.run([MOEKIT, "train", "--preset", "gpt-oss-tiny", "--corpus", str(corpus), "--cache-dir",
                           str(tmp_path / "cache"), "--seq-len", "48", "--batch-size", "4", "--vocab-size", "300",
                           "--val-fraction", "0.1", "--warmup-steps", "2", "--eval-batches", "2", "--log-every", "1",
                           "--max-steps", "16", "--eval-every", "16", "--out", str(run)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    losses = [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert len(losses) >= 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    model = load_model(run)
    assert model.cfg.attention_sinks and model.cfg.moe.activation == "swiglu_oai"
    assert any(block.attn.sinks.abs().sum() > 0 for block in model.layers)  # the sinks were trained
    prompts = [[5, 17, 30, 42, 7], [8, 2]]
    want = generate(model, prompts, max_new_tokens=8)
    out = Engine(model, prefill_chunk=4).generate(prompts, SamplingParams(max_tokens=8))
    assert [o.token_ids for o in out] == want
