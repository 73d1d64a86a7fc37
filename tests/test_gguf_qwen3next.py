"""Qwen3-Next / Qwen3.5-MoE hybrids export as llama.cpp's "qwen3next" (fused in_proj_qkvz / ba) and
"qwen35moe" (split projections): every tensor read back equal to its source mapped by hand (zero-centred
norms as 1 + w, ssm_a = -exp(A_log), the conv kernel squeezed, qwen35moe's value heads in tiled order),
the SSM / interval / shared-expert metadata, one-line refusals, and (slow tier) llama.cpp's greedy tokens
equal moekit's with logits within float rounding."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from moekit import ModelConfig, Transformer  # noqa: E402
from moekit.checkpoint import save_model  # noqa: E402
from moekit.gguf_export import export_gguf  # noqa: E402
from moekit.presets import MODEL_PRESETS  # noqa: E402
from test_gguf import field, llama_cpp_greedy, moekit_greedy, read, tokenizer  # noqa: E402,F401

HYBRID = {**MODEL_PRESETS["hybrid-tiny"], "vocab_size": 320}
ARCHS = {"qwen3next": {"linear_fused_proj": True}, "qwen35moe": {"linear_fused_proj": False}}


def hybrid_model(tokenizer, **changes):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**HYBRID, **changes})).eval()
    with torch.no_grad():  # offsets away from 0 (zero-centred) and weights large enough to route unevenly
        for name, p in model.named_parameters():
            if name.endswith("attn.norm.weight"):  # the DeltaNet output norm: a plain weight
                p.uniform_(0.5, 1.5)
            elif "norm" in name:
                p.uniform_(-0.3, 0.3)
            elif p.dim() >= 2:
                p.normal_(0, 0.3)
    model.tokenizer = tokenizer
    return model


def tiled(w, Hk, R, dim=0):
    """Value-head blocks along `dim` from grouped order (head j R + r) to tiled order (r Hk + j)."""
    blocks = w.chunk(Hk * R, dim=dim)
    return torch.cat([blocks[j * R + r] for r in range(R) for j in range(Hk)], dim=dim)


def source_tensors(model, fused):
    cfg = model.cfg
    sd = {k: v.float() for k, v in model.state_dict().items() if v.is_floating_point()}
    Hk, R = cfg.linear_num_key_heads, cfg.linear_num_value_heads // cfg.linear_num_key_heads
    qk = 2 * Hk * cfg.linear_key_head_dim
    heads = (lambda w, dim=0: w) if fused else (lambda w, dim=0: tiled(w, Hk, R, dim))
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": 1 + sd["norm.weight"],
           "output.weight": sd["lm_head.weight"]}
    F = cfg.moe.d_expert
    for i in range(cfg.n_layers):
        p, b, a = f"layers.{i}.", f"blk.{i}.", f"layers.{i}.attn."
        out[b + "attn_norm.weight"] = 1 + sd[p + "attn_norm.weight"]
        out[b + "post_attention_norm.weight"] = 1 + sd[p + "ffn_norm.weight"]
        if cfg.layer_types[i] == "full":
            for g, m in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
                out[b + f"attn_{g}.weight"] = sd[a + f"{m}.weight"]
            out[b + "attn_q_norm.weight"] = 1 + sd[a + "q_norm.weight"]
            out[b + "attn_k_norm.weight"] = 1 + sd[a + "k_norm.weight"]
        else:
            conv = sd[a + "conv1d.weight"].squeeze(1)
            if fused:
                out[b + "ssm_in.weight"] = sd[a + "in_proj_qkvz.weight"]
                out[b + "ssm_ba.weight"] = sd[a + "in_proj_ba.weight"]
            else:
                qkv = sd[a + "in_proj_qkv.weight"]
                out[b + "attn_qkv.weight"] = torch.cat([qkv[:qk], heads(qkv[qk:])])
                out[b + "attn_gate.weight"] = heads(sd[a + "in_proj_z.weight"])
                out[b + "ssm_beta.weight"] = heads(sd[a + "in_proj_b.weight"])
                out[b + "ssm_alpha.weight"] = heads(sd[a + "in_proj_a.weight"])
                conv = torch.cat([conv[:qk], heads(conv[qk:])])
            out[b + "ssm_conv1d.weight"] = conv
            out[b + "ssm_dt.bias"] = heads(sd[a + "dt_bias"])
            out[b + "ssm_a"] = heads(-torch.exp(sd[a + "A_log"]))
            out[b + "ssm_norm.weight"] = sd[a + "norm.weight"]
            out[b + "ssm_out.weight"] = heads(sd[a + "out_proj.weight"], 1)
        f = p + "ffn."
        out[b + "ffn_gate_inp.weight"] = sd[f + "router.weight"]
        w13 = sd[f + "experts.w13"]
        out[b + "ffn_gate_exps.weight"], out[b + "ffn_up_exps.weight"] = w13[:, :F], w13[:, F:]
        out[b + "ffn_down_exps.weight"] = sd[f + "experts.w2"]
        s13, S = sd[f + "shared.w13"], cfg.moe.shared_dim
        out[b + "ffn_gate_shexp.weight"], out[b + "ffn_up_shexp.weight"] = s13[:S], s13[S:]
        out[b + "ffn_down_shexp.weight"] = sd[f + "shared.w2"]
        out[b + "ffn_gate_inp_shexp.weight"] = sd[f + "shared_gate.weight"][0]
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_every_tensor_and_the_metadata_read_back(tmp_path, tokenizer, arch):
    model = hybrid_model(tokenizer, **ARCHS[arch])
    assert export_gguf(model, tmp_path / "m.gguf", "f32") == arch
    reader, tensors = read(tmp_path / "m.gguf")
    expected = source_tensors(model, arch == "qwen3next")
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.F32, name
        assert np.array_equal(np.asarray(tensors[name].data).reshape(w.shape), w.numpy()), name
    want = {"general.architecture": arch, f"{arch}.full_attention_interval": 4, f"{arch}.ssm.conv_kernel": 4,
            f"{arch}.ssm.state_size": 16, f"{arch}.ssm.group_count": 2, f"{arch}.ssm.time_step_rank": 4,
            f"{arch}.ssm.inner_size": 64, f"{arch}.expert_shared_feed_forward_length": 32,
            f"{arch}.expert_feed_forward_length": 32, f"{arch}.rope.dimension_count": 8,
            f"{arch}.attention.key_length": 16, f"{arch}.expert_count": 8, f"{arch}.expert_used_count": 2}
    for key, value in want.items():
        assert field(reader, key) == value, key
    if arch == "qwen35moe":  # M-RoPE sections covering the 4 rotated frequencies, the time section unused
        sections = field(reader, f"{arch}.rope.dimension_sections")
        assert sum(sections) == 4 and sections[3] == 0


def test_q8_0_keeps_the_conv_kernel_f32(tmp_path, tokenizer):
    export_gguf(hybrid_model(tokenizer, linear_fused_proj=True), tmp_path / "m.gguf", "q8_0")
    _, tensors = read(tmp_path / "m.gguf")
    assert tensors["blk.0.ssm_conv1d.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert tensors["blk.0.ssm_in.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize("changes, message", [
    (dict(layer_types=("linear", "full", "linear", "linear")), "full attention every n-th layer"),
    (dict(attn_output_gate=False), "attn_output_gate"),
    (dict(linear_value_head_dim=32), "linear_value_head_dim=32"),
    (dict(first_k_dense=1), "MoE in every layer"),
    (dict(moe={**HYBRID["moe"], "shared_gate": False}), "sigmoid-gated shared expert"),
    (dict(moe={**HYBRID["moe"], "norm_topk_prob": False}), "norm_topk_prob=False"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling 'yarn'"),
])
def test_unexportable_hybrid_refused(tmp_path, tokenizer, changes, message):
    model = hybrid_model(tokenizer, **changes)
    with pytest.raises(ValueError, match=message):
        export_gguf(model, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_zero_centred_norm_without_the_gated_layout_refused(tmp_path, tokenizer):
    cfg = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=64,
               qk_norm="head", zero_centred_norm=True, moe=dict(d_model=64, d_expert=32, num_experts=4, top_k=2))
    model = Transformer(ModelConfig(**cfg))
    model.tokenizer = tokenizer
    with pytest.raises(ValueError, match="zero_centred_norm.*attn_output_gate"):
        export_gguf(model, tmp_path / "m.gguf", "f16")


def test_cli_exports_a_hybrid_checkpoint_and_refuses_in_one_line(tmp_path, tokenizer):
    save_model(hybrid_model(tokenizer), tmp_path / "ok")
    save_model(hybrid_model(tokenizer, first_k_dense=1), tmp_path / "dense")
    moekit = [sys.executable, "-m", "moekit.cli", "export"]
    ok = subprocess.run(moekit + [str(tmp_path / "ok"), str(tmp_path / "m.gguf")], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0 and "llama.cpp architecture qwen35moe, f16" in ok.stdout, ok.stderr
    assert field(read(tmp_path / "m.gguf")[0], "general.architecture") == "qwen35moe"
    bad = subprocess.run(moekit + [str(tmp_path / "dense"), str(tmp_path / "x.gguf")], capture_output=True, text=True,
                         timeout=120)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr
    assert lines[0].startswith("moekit export: error: dense layers") and not (tmp_path / "x.gguf").exists()


def llama_cpp_logits(path, prompt):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    try:
        llm.eval(prompt)
        return np.array(llm.scores[: len(prompt)])
    finally:
        llm.close()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_greedy_equals_moekit(tmp_path, tokenizer, arch):
    """Greedy tokens equal, and the prompt's logits within float rounding (scale ~10): a wrong value-head
    order, a missing 1 + w or a swapped b / a changes them by whole units."""
    model = hybrid_model(tokenizer, **ARCHS[arch])
    export_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = tokenizer.encode("def f(x):\n    return x + 1\nthe quick").ids
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0].numpy()
    assert np.abs(llama_cpp_logits(tmp_path / "m.gguf", prompt) - ours).max() < 0.02
    assert llama_cpp_greedy(tmp_path / "m.gguf", prompt) == moekit_greedy(model, prompt)
