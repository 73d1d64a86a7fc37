"""Each frontier family trains with the real `moekit train` and leaves the run as an HF checkpoint that
transformers runs: a model config parsed from a tiny HF config.json (GLM-4.5's glm4_moe with partial rotary,
shared expert and dense first layer; MiniMax-M2's minimax_m2 with full-width q/k norm and partial rotary)
is trained from scratch on the corpus fixture (the loss falls), converted with `moekit convert --model-type`,
and transformers' logits of the converted checkpoint equal moekit's logits of the run. (DeepSeek-V3 / Kimi K2
train as `mla-tiny`, gpt-oss as `gpt-oss-tiny`, the hybrids as `hybrid-tiny`: their own test files.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit import load_model  # noqa: E402
from moekit.hf import config_from_hf  # noqa: E402

MOEKIT = str(Path(sys.executable).parent / "moekit")
COMMON = dict(vocab_size=300, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              num_experts_per_tok=2, max_position_embeddings=64, head_dim=12, rope_theta=1000.0)
FAMILIES = {
    "glm4_moe": dict(intermediate_size=64, n_routed_experts=4, moe_intermediate_size=16, n_shared_experts=1,
                     first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5),
    "minimax_m2": dict(intermediate_size=16, num_local_experts=4, rotary_dim=6),
}


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_trains_and_converts_to_transformers(model_type, corpus, tmp_path):
    if model_type == "minimax_m2" and not hasattr(transformers, "MiniMaxM2ForCausalLM"):
        pytest.skip("this transformers has no MiniMax-M2")
    hf = transformers.AutoConfig.for_model(model_type, **COMMON, **FAMILIES[model_type]).to_dict()
    model = config_from_hf(hf).to_dict()
    for key in ("vocab_size", "max_seq_len", "dtype", "name", "notes"):  # set by training, refused in [model]
        del model[key]
    model["moe"] = {k: v for k, v in model["moe"].items() if k not in ("d_model", "causal", "capacity_factor")}
    conf = tmp_path / "family.py"
    conf.write_text(f"model = {model!r}\n")
    run = tmp_path / "run"
    done = subprocess.run([MOEKIT, "train", "--config", str(conf), "--corpus", str(corpus), "--cache-dir",
                           str(tmp_path / "cache"), "--seq-len", "32", "--batch-size", "4", "--vocab-size", "300",
                           "--lr", "3e-3", "--val-fraction", "0.1", "--warmup-steps", "1", "--eval-batches", "1",
                           "--log-every", "1", "--max-steps", "12", "--eval-every", "12", "--out", str(run)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    out = tmp_path / "hf"
    done = subprocess.run([MOEKIT, "convert", str(run), str(out), "--model-type", model_type], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ours = load_model(run).eval()
    ids = torch.tensor([[5, 17, 30, 42, 7, 99, 3, 250]])
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, ours(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset, model_type", [("glm-tiny", "glm4_moe"), ("minimax-tiny", "minimax_m2"),
                                                ("gpt-oss-tiny", "gpt_oss"), ("mla-tiny", "deepseek_v3"),
                                                ("hybrid-tiny", "qwen3_5_moe_text")])
def test_trainable_family_presets_are_what_transformers_computes(preset, model_type, tmp_path):
    """Each family's trainable miniature is a real model of that family: saved with save_hf, transformers'
    logits equal moekit's."""
    from moekit import ModelConfig, Transformer
    from moekit.hf import save_hf

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset)).eval()
    save_hf(model, tmp_path, model_type=model_type)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 500, (2, 40))
    with torch.no_grad():
        assert torch.allclose(theirs(ids).logits, model(ids), atol=1e-4, rtol=0)
