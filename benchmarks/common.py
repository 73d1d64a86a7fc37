"""Pieces the benchmark scripts share (they run as scripts, so this directory is on sys.path)."""

from __future__ import annotations

import subprocess

from moekit import ModelConfig, MoEConfig


def git_commit() -> str:
    """The short commit hash of HEAD, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def bench_config() -> ModelConfig:
    """The `small` preset's shape with a Qwen3-MoE-representable MoE layer, so HF transformers can load the
    same weights (the `small` preset's sigmoid router and shared expert have no Qwen3-MoE equivalent)."""
    small = ModelConfig.preset("small")
    m = small.moe
    moe = MoEConfig(d_model=m.d_model, d_expert=m.d_expert, num_experts=m.num_experts, top_k=m.top_k,
                    router="softmax_topk", norm_topk_prob=True, num_shared_experts=0)
    return small.replace(name="small-qwen3moe", moe=moe, first_k_dense=0)
