"""`moekit export` to GGUF: every tensor read back by gguf.GGUFReader equals the moekit source (f32
exactly, f16 as the f16 cast, q8_0 / q4_0 byte-equal to moekit's packed blocks and dequantized by
gguf's own numpy code to moekit's dequantization), the metadata llama.cpp needs, the llama-arch q/k
permutation against an interleaved-pair RoPE written here, and the CLI's one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")

from moekit import ModelConfig, Transformer  # noqa: E402
from moekit.checkpoint import save_model  # noqa: E402
from moekit.data import EOT, train_tokenizer  # noqa: E402
from moekit.gguf_export import TYPES, export_gguf, permute_rotary  # noqa: E402
from moekit.quantize import get_format  # noqa: E402
from moekit.rope import apply_rope, rope_cos_sin, rope_inv_freq  # noqa: E402

# d_model and d_expert multiples of 32 so that every matrix quantizes; vocab padded beyond the tokenizer
MOE = dict(d_model=64, d_expert=32, num_experts=4, top_k=2)
BASE = dict(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128)
CONFIGS = {
    "qwen3moe": dict(qk_norm="head", moe=MOE),
    "llama": dict(moe={**MOE, "d_expert": 48}),  # Mixtral layout; ffn_down_exps rows of 48: f16 under q8_0/q4_0
    "olmoe": dict(qk_norm="full", n_kv_heads=4, moe={**MOE, "norm_topk_prob": False}),
    "glm4moe": dict(qk_norm="head", first_k_dense=1, tie_embeddings=True,
                    moe={**MOE, "router": "sigmoid_topk", "num_shared_experts": 1, "routed_scaling_factor": 2.0}),
}


@pytest.fixture(scope="module")
def tokenizer():
    docs = ["def f(x):\n    return x + 1\n", "the quick brown fox jumps over the lazy dog\n"] * 20
    return train_tokenizer(docs, 300, progress=False)


def tiny_model(arch, tokenizer):
    model = Transformer(ModelConfig(**{**BASE, **CONFIGS[arch]})).eval()
    with torch.no_grad():  # norms away from 1 and a selection bias, so that a mix-up shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
        for layer in model.layers:
            if layer.is_moe and layer.ffn.cfg.router == "sigmoid_topk":
                layer.ffn.router.expert_bias.uniform_(-0.1, 0.1)
    model.tokenizer = tokenizer
    return model


def read(path):
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    return reader, tensors


def field(reader, key):
    return reader.fields[key].contents()


def source_tensors(model, arch):
    """What each GGUF tensor must hold, from moekit's state dict (names mapped by hand here)."""
    cfg, sd = model.cfg, {k: v.float() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": sd["embed.weight"], "output_norm.weight": sd["norm.weight"]}
    if not cfg.tie_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i, layer in enumerate(model.layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k = sd[p + "attn.q_proj.weight"], sd[p + "attn.k_proj.weight"]
        if arch == "llama":
            q, k = permute_rotary(q, cfg.n_heads), permute_rotary(k, cfg.n_kv_heads)
        out.update({b + "attn_norm.weight": sd[p + "attn_norm.weight"], b + "attn_q.weight": q, b + "attn_k.weight": k,
                    b + "attn_v.weight": sd[p + "attn.v_proj.weight"], b + "attn_output.weight": sd[p + "attn.o_proj.weight"]})
        if cfg.qk_norm:
            out[b + "attn_q_norm.weight"] = sd[p + "attn.q_norm.weight"]
            out[b + "attn_k_norm.weight"] = sd[p + "attn.k_norm.weight"]
        if arch == "glm4moe":
            out[b + "attn_q.bias"] = torch.zeros(q.shape[0])
            out[b + "attn_k.bias"] = torch.zeros(k.shape[0])
            out[b + "attn_v.bias"] = torch.zeros(k.shape[0])
        out[b + ("post_attention_norm" if arch == "glm4moe" else "ffn_norm") + ".weight"] = sd[p + "ffn_norm.weight"]
        groups = [("", p + "ffn.")] if not layer.is_moe else [("_exps", p + "ffn.experts.")]
        if layer.is_moe:
            out[b + "ffn_gate_inp.weight"] = sd[p + "ffn.router.weight"]
            if arch == "glm4moe":
                out[b + "exp_probs_b.bias"] = sd[p + "ffn.router.expert_bias"]
                groups.append(("_shexp", p + "ffn.shared."))
        for suffix, src in groups:
            w13 = sd[src + "w13"]
            F = w13.shape[-2] // 2
            out[b + f"ffn_gate{suffix}.weight"] = w13[..., :F, :]
            out[b + f"ffn_up{suffix}.weight"] = w13[..., F:, :]
            out[b + f"ffn_down{suffix}.weight"] = sd[src + "w2"]
    return out


def expected_type(name, w, file_type):
    if w.dim() < 2 or name.endswith("ffn_gate_inp.weight") or file_type == "f32":
        return "f32"
    if file_type == "f16" or w.shape[-1] % 32:
        return "f16"
    if file_type == "q4_0" and name == "output.weight":
        return "q8_0"
    return file_type


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("file_type", TYPES)
def test_every_tensor_reads_back_equal(tmp_path, tokenizer, arch, file_type):
    model = tiny_model(arch, tokenizer)
    path = tmp_path / "m.gguf"
    assert export_gguf(model, path, file_type) == arch
    reader, tensors = read(path)
    expected = source_tensors(model, arch)
    assert set(tensors) == set(expected)
    for name, w in expected.items():
        t, kind = tensors[name], expected_type(name, w, file_type)
        assert t.tensor_type == gguf.GGMLQuantizationType[kind.upper()], name
        assert tuple(int(n) for n in t.shape[::-1]) == tuple(w.shape), name  # ggml ne is reversed
        if kind == "f32":
            assert np.array_equal(t.data.reshape(w.shape), w.numpy()), name
        elif kind == "f16":
            assert np.array_equal(t.data.reshape(w.shape), w.to(torch.float16).numpy()), name
        else:
            fmt = get_format(kind)
            packed = fmt.quantize(w)
            data = np.asarray(t.data)
            NB = w.shape[-1] // 32
            blocks = data.reshape(*w.shape[:-1], NB, -1)
            assert np.array_equal(blocks[..., :2].view(np.int16)[..., 0], packed["scale"].numpy()), name
            codes = blocks[..., 2:].reshape(*w.shape[:-1], -1)
            assert np.array_equal(codes, packed["qweight"].numpy().view(np.uint8)), name
            theirs = gguf.quants.dequantize(data, t.tensor_type).reshape(w.shape)
            assert np.array_equal(theirs, fmt.dequantize(packed, w.shape[-1]).numpy()), name


def test_metadata_llama_cpp_needs(tmp_path, tokenizer):
    model = tiny_model("glm4moe", tokenizer)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, "q8_0", chat_template="{{ messages[0]['content'] }}")
    reader, _ = read(path)
    a, cfg = "glm4moe", model.cfg
    want = {
        "general.architecture": a, f"{a}.block_count": 2, f"{a}.context_length": 128, f"{a}.embedding_length": 64,
        f"{a}.feed_forward_length": 96, f"{a}.attention.head_count": 4, f"{a}.attention.head_count_kv": 2,
        f"{a}.attention.key_length": 16, f"{a}.attention.value_length": 16, f"{a}.rope.dimension_count": 16,
        f"{a}.expert_count": 4, f"{a}.expert_used_count": 2, f"{a}.expert_feed_forward_length": 32,
        f"{a}.expert_shared_count": 1, f"{a}.leading_dense_block_count": 1, f"{a}.expert_gating_func": 2,
        f"{a}.expert_weights_norm": True, f"{a}.vocab_size": 320, "general.file_type": 7,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": tokenizer.token_to_id(EOT), "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": "{{ messages[0]['content'] }}",
    }
    for key, value in want.items():
        assert field(reader, key) == value, key
    assert field(reader, f"{a}.expert_weights_scale") == pytest.approx(2.0)
    assert field(reader, f"{a}.attention.layer_norm_rms_epsilon") == pytest.approx(cfg.norm_eps)
    assert field(reader, f"{a}.rope.freq_base") == pytest.approx(cfg.rope_theta)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size  # the embedding rows
    vocab = tokenizer.get_vocab()
    assert all(tokens[i] == text for text, i in vocab.items())
    assert types[0] == gguf.TokenType.CONTROL and types[vocab["a"]] == gguf.TokenType.NORMAL
    assert all(t == gguf.TokenType.UNUSED for t in types[len(vocab):])
    merges = field(reader, "tokenizer.ggml.merges")
    assert merges == [" ".join(m) if not isinstance(m, str) else m
                      for m in json.loads(tokenizer.to_str())["model"]["merges"]]


def interleaved_rope(x_BHTDh, cos_BTDh, sin_BTDh):
    """llama.cpp's llama-arch RoPE (GGML_ROPE_TYPE_NORM): rotates pairs (2i, 2i + 1) by angle i."""
    half = x_BHTDh.shape[-1] // 2
    cos, sin = cos_BTDh[..., :half].unsqueeze(1), sin_BTDh[..., :half].unsqueeze(1)
    x0, x1 = x_BHTDh[..., 0::2], x_BHTDh[..., 1::2]
    return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)


def test_llama_permutation_matches_interleaved_rope():
    """Scores q.k after moekit's rotate-half RoPE equal those after llama.cpp's pair RoPE on the permuted rows."""
    H, Dh, D, T = 2, 8, 16, 5
    wq = torch.randn(H * Dh, D, dtype=torch.float64)
    x = torch.randn(1, T, D, dtype=torch.float64)
    cos, sin = rope_cos_sin(rope_inv_freq(Dh, 10000.0, None).double(), torch.arange(T)[None], torch.float64)
    ours = apply_rope((x @ wq.T).view(1, T, H, Dh).transpose(1, 2), cos, sin)
    theirs = interleaved_rope((x @ permute_rotary(wq, H).T).view(1, T, H, Dh).transpose(1, 2), cos, sin)
    torch.testing.assert_close(ours @ ours.transpose(-1, -2), theirs @ theirs.transpose(-1, -2))


@pytest.mark.parametrize("change, message", [
    (dict(moe={**MOE, "norm_topk_prob": False}), "norm_topk_prob=False"),
    (dict(qk_norm="head", dense_layers=(0,), moe=MOE), "dense layers [0]"),
    (dict(clip_qkv=8.0, moe=MOE), "clip_qkv"),
    (dict(qk_norm="full", n_kv_heads=4, moe=MOE), "olmoe never renormalises"),
    (dict(moe={**MOE, "router": "sigmoid_topk", "num_groups": 2, "topk_groups": 1}), "group-limited"),
    (dict(moe={**MOE, "router": "sigmoid_topk"}), "shared experts"),
    (dict(qk_norm="head", moe={**MOE, "expert_bias": True, "activation": "swiglu_oai"}), "no attention sinks"),
    (dict(qk_norm="head", moe={**MOE, "router": "topk_softmax", "router_bias": True}), "a router bias"),
    (dict(qk_norm="head", attn_output_gate=True, moe=MOE), "attn_output_gate"),
    (dict(qk_norm="head", zero_centred_norm=True, moe=MOE), "zero_centred_norm"),
])
def test_unexportable_models_refused(tokenizer, tmp_path, change, message):
    model = Transformer(ModelConfig(**{**BASE, **change}))
    model.tokenizer = tokenizer
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        export_gguf(model, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()


def test_checkpoint_without_tokenizer_refused(tmp_path):
    model = Transformer(ModelConfig(**{**BASE, **CONFIGS["qwen3moe"]}))
    with pytest.raises(ValueError, match="no tokenizer.json"):
        export_gguf(model, tmp_path / "m.gguf", "f16")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "moekit.cli", "export", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_a_gguf_and_errors_in_one_line(tmp_path, tokenizer):
    model = tiny_model("qwen3moe", tokenizer)
    save_model(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    result = run_cli(tmp_path / "ckpt", tmp_path / "m.gguf", "--type", "q4_0")
    assert result.returncode == 0, result.stderr
    assert "qwen3moe" in result.stdout
    reader, tensors = read(tmp_path / "m.gguf")
    assert field(reader, "tokenizer.chat_template") == "{{ messages[0]['content'] }}"
    assert tensors["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q4_0

    bad_type = run_cli(tmp_path / "ckpt", tmp_path / "x.gguf", "--type", "q5_k")
    mixed = Transformer(ModelConfig(**{**BASE, "moe": {**MOE, "norm_topk_prob": False}}))
    mixed.tokenizer = tokenizer
    save_model(mixed, tmp_path / "mixed")
    unexportable = run_cli(tmp_path / "mixed", tmp_path / "y.gguf")
    for result, text in ((bad_type, "invalid choice: 'q5_k'"), (unexportable, "norm_topk_prob=False")):
        assert result.returncode == 2 and "Traceback" not in result.stderr
        lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("usage:")]
        assert len(lines) == 1 and lines[0].startswith("moekit export: error:") and text in lines[0], result.stderr
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "y.gguf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_llama_cpp_greedy_tokens_equal_moekit(tmp_path, tokenizer, arch):
    """llama.cpp (llama-cpp-python, built from source: no prebuilt wheel on PyPI) loads the f32 GGUF
    and its greedy continuation equals moekit's."""
    model = Transformer(ModelConfig(**{**BASE, **CONFIGS[arch], "init_std": 0.3})).eval()
    model.tokenizer = tokenizer
    export_gguf(model, tmp_path / "m.gguf", "f32")
    prompt = tokenizer.encode("def f(x):\n").ids
    assert llama_cpp_greedy(tmp_path / "m.gguf", prompt) == moekit_greedy(model, prompt)


def moekit_greedy(model, prompt, n=12):
    """moekit's greedy continuation: argmax of the full forward, one token at a time."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def llama_cpp_greedy(path, prompt, n=12, **llama_kwargs):
    """llama.cpp's greedy continuation of `prompt` from the GGUF at `path` (skips without llama-cpp-python);
    `llama_kwargs` go to `llama_cpp.Llama` (default n_ctx=64). With logits_all=True: (its logits over the
    prompt, the tokens)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), **{"n_ctx": 64, **llama_kwargs}, verbose=False)
    theirs = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
        theirs.append(token)
        if len(theirs) == n:
            break
    if llama_kwargs.get("logits_all"):
        return np.array(llm.scores[:len(prompt)]), theirs
    return theirs
