"""Weight-only quantization (moekit.quantize): formats against a plain per-block reference written
here, bits per weight from real byte counts, quantized models (prefill, generate, static decode
step, save/load), memory reduction, errors and the CLI."""

import copy
import math
import struct

import numpy as np
import pytest
import torch

from moekit import ModelConfig, MoEConfig, Transformer, load_model, save_model
from moekit import cpu_matvec
from moekit import generate as gen_mod
from moekit.generate import generate
from moekit.quantize import METHODS, formats, model_bytes, quantize_model, quantized_bytes, size_report
from moekit.moe import MoE
from moekit.moe.experts import Experts
from moekit.moe.ffn import SwiGLU
from moekit.moe.router import topk_routing
from moekit.quantize.modules import QuantizedLinear, QuantizedWeight

F32 = np.float32


@pytest.fixture(autouse=True)
def one_thread():
    """Small ops: one thread avoids OpenMP overhead (large on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------- the plain reference
def _roundf(v: float) -> int:  # C roundf: half away from zero
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]  # code -> value


def ref_group(method: str, values) -> bytes:
    """One group (int8: a whole row) quantized value by value in float32, as the documented bytes."""
    x = [F32(v) for v in values]
    if method == "mxfp4":  # OCP MX: scale 2**(floor(log2 amax) - 2), E2M1 nearest (ties: even code), saturating
        amax = max(abs(float(v)) for v in x)
        e = max(-127, math.floor(math.log2(amax)) - 2) if amax else -127
        q = []
        for v in x:
            y = min(abs(float(v)) / 2.0 ** e, 6.0)
            code = min(range(8), key=lambda c: (abs(y - E2M1[c]), c & 1))
            q.append(code | (8 if math.copysign(1, v) < 0 else 0))
        return bytes([e + 127]) + bytes(q[2 * j] | (q[2 * j + 1] << 4) for j in range(16))  # element 2j: low nibble
    if method in ("int8", "q8_0"):
        d = F32(max(abs(v) for v in x) / F32(127))
        inv = F32(1) / d if d != 0 else F32(0)
        qs = [max(-127, min(127, _roundf(float(v * inv)))) for v in x]
        head = np.float16(d).tobytes() if method == "q8_0" else F32(d).tobytes()
        return head + np.array(qs, dtype=np.int8).tobytes()
    if method == "q4_0":  # llama.cpp quantize_row_q4_0_ref
        amax, vmax = F32(0), F32(0)
        for v in x:
            if amax < abs(v):
                amax, vmax = abs(v), v
        d = F32(vmax / F32(-8))
        inv = F32(1) / d if d != 0 else F32(0)
        q = [min(15, int(F32(v * inv) + F32(8.5))) for v in x]
        return np.float16(d).tobytes() + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    s16, m16 = np.float16(F32(max(x) - min(x)) / F32(15)), np.float16(min(x))  # int4-gG
    inv = F32(1) / F32(s16) if s16 != 0 else F32(0)
    q = [max(0, min(15, math.floor(F32(F32(v - F32(m16)) * inv) + F32(0.5)))) for v in x]
    half = len(x) // 2  # byte j: element j (low nibble), element j + G/2 (high nibble)
    return s16.tobytes() + m16.tobytes() + bytes(q[j] | (q[j + half] << 4) for j in range(half))


def ref_dequant_group(method: str, data: bytes):
    if method == "mxfp4":
        return [F32(E2M1[c] * 2.0 ** (data[0] - 127)) for b in data[1:] for c in (b & 15, b >> 4)]
    if method == "int8":
        s = F32(np.frombuffer(data[:4], np.float32)[0])
        return [F32(F32(q) * s) for q in np.frombuffer(data[4:], np.int8)]
    d = F32(np.frombuffer(data[:2], np.float16)[0])
    if method == "q8_0":
        return [F32(F32(q) * d) for q in np.frombuffer(data[2:], np.int8)]
    if method == "q4_0":
        q = [b & 15 for b in data[2:]] + [b >> 4 for b in data[2:]]
        return [F32(F32(v - 8) * d) for v in q]
    m = F32(np.frombuffer(data[2:4], np.float16)[0])
    q = [b & 15 for b in data[4:]] + [b >> 4 for b in data[4:]]
    return [F32(F32(F32(v) * d) + m) for v in q]


def stored_group(method: str, packed, row: int, group: int) -> bytes:
    """The same group read out of the vectorised storage (struct of arrays)."""
    fmt = formats.get_format(method)
    qw = packed["qweight"].reshape(-1, packed["qweight"].shape[-1])[row].numpy()
    if method == "int8":
        return packed["scale"].reshape(-1)[row:row + 1].numpy().tobytes() + qw.tobytes()
    per = fmt.group if fmt.bits == 8 else fmt.group // 2
    out = packed["scale"].reshape(-1, packed["scale"].shape[-1])[row, group:group + 1].numpy().tobytes()
    if "offset" in packed:
        out += packed["offset"].reshape(-1, packed["offset"].shape[-1])[row, group:group + 1].numpy().tobytes()
    return out + qw[group * per:(group + 1) * per].tobytes()


# ---------------------------------------------------------------------------- formats
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", [(3, 128), (2, 3, 96), (2, 40)])  # 96 and 40: padded for groups > K
def test_pack_matches_plain_reference_and_round_trips(method, shape):
    w = torch.randn(shape) * 0.05
    w.view(-1)[7] = 0.31  # a lone large value (q4_0 keeps its sign in d)
    w.view(-1)[9] = -0.0
    fmt = formats.get_format(method)
    packed = formats.quantize(method, w)
    K = shape[-1]
    Kp, G = fmt.padded(K), fmt.group_size(K)
    rows = torch.nn.functional.pad(w, (0, Kp - K)).reshape(-1, Kp)
    expected = []
    for r in range(rows.shape[0]):
        row_values = []
        for g in range(Kp // G):
            ref = ref_group(method, rows[r, g * G:(g + 1) * G].tolist())
            assert stored_group(method, packed, r, g) == ref, (r, g)
            row_values += ref_dequant_group(method, ref)
        expected.append(row_values[:K])
    deq = formats.dequantize(method, packed, K)
    assert deq.shape == w.shape and deq.dtype == torch.float32
    assert torch.equal(deq.reshape(-1, K), torch.tensor(np.array(expected, dtype=np.float32)))
    # the library's own reference agrees too
    assert formats.reference_quantize_group(method, rows[0, :G].tolist()) == stored_group(method, packed, 0, 0)
    # quantization error: at most half a step (int8/q8_0), one step for the 4-bit formats (clipping at the edges)
    step = w.abs().max() / (127 if fmt.bits == 8 else 7)
    if method == "mxfp4":  # a group's amax in [4, 8) * 2**e: a half step 2**e, clipping at 6 * 2**e below 2 * 2**e
        step = w.abs().max() / 2
    assert (deq - w).abs().max() <= step * (0.5 if fmt.bits == 8 else 1.0) + 1e-6


@pytest.mark.parametrize("method,bits", [
    ("int8", 8 + 32 / 256), ("int4-g32", 4 + 32 / 32), ("int4-g64", 4 + 32 / 64), ("int4-g128", 4 + 32 / 128),
    ("q8_0", 8.5), ("q4_0", 4.5), ("mxfp4", 4.25),
])
def test_bits_per_weight_from_real_bytes(method, bits):
    w = torch.randn(64, 256)
    packed = formats.quantize(method, w)
    assert 8 * formats.packed_nbytes(packed) / w.numel() == pytest.approx(bits)
    assert formats.get_format(method).bits_per_weight(256) == pytest.approx(bits)
    qw = QuantizedWeight.from_float(w, method)
    assert qw.bits_per_weight() == pytest.approx(bits)
    assert qw.qweight.dtype in (torch.int8, torch.uint8)
    assert qw.qweight.numel() == w.numel() // (1 if formats.get_format(method).bits == 8 else 2)


@pytest.mark.parametrize("method", METHODS)
def test_fused_matvec_equals_dequantize_then_matmul(method):
    """The compiled decode path's per-group reduction against its reference (run eagerly here)."""
    for w_shape, x_shape in (((48, 96), (3, 1, 96)), ((5, 40, 64), (5, 1, 64)), ((7, 40), (2, 1, 40))):
        w = torch.randn(w_shape) * 0.1
        packed = formats.quantize(method, w)
        x = torch.randn(x_shape)
        ref = x @ formats.dequantize(method, packed, w_shape[-1]).transpose(-1, -2)
        torch.testing.assert_close(formats.fused_matvec(method, packed, x), ref.squeeze(-2), rtol=1e-5, atol=1e-5)
        # as QuantizedWeight runs it: with the float32 mirrors of the fp16 group tensors
        inputs = QuantizedWeight.from_float(w, method).fused_inputs()
        assert set(inputs) == set(packed) | {name + "_f32" for name in formats.get_format(method).float_copies}
        torch.testing.assert_close(formats.fused_matvec(method, inputs, x), ref.squeeze(-2), rtol=1e-5, atol=1e-5)


def stored_values(w, name):
    """A per-group tensor's value from its stored fp16 bits."""
    return getattr(w, name).view(torch.float16).float()


@pytest.mark.parametrize("method", ["q8_0", "q4_0", "int4-g32"])
def test_float_mirrors_follow_the_stored_bits(method):
    """The float32 scale/offset mirrors are not saved, stay float32 under model.to(dtype) and are rebuilt
    by load_state_dict (a stale mirror would silently give another weight's outputs)."""
    qw = QuantizedWeight.from_float(torch.randn(8, 64), method)
    names = formats.get_format(method).float_copies
    assert not any(key.endswith("_f32") for key in qw.state_dict())

    def mirrors_match(w):
        return all(getattr(w, n + "_f32").dtype == torch.float32 and
                   torch.equal(getattr(w, n + "_f32"), stored_values(w, n)) for n in names)

    qw.to(torch.bfloat16)
    assert mirrors_match(qw)
    other = QuantizedWeight.from_float(torch.randn(8, 64) * 3, method)
    qw.load_state_dict(other.state_dict())
    assert mirrors_match(qw) and torch.equal(qw.scale_f32, other.scale_f32)
    x = torch.randn(2, 64)
    torch.testing.assert_close(formats.fused_matvec(method, qw.fused_inputs(), x[:, None]),
                               x @ other.dense(dtype=torch.float32).t(), rtol=1e-5, atol=1e-5)


def test_mxfp4_scale_values_at_the_ends_of_the_exponent_range():
    s = torch.tensor([0, 1, 2, 126, 127, 128, 254, 255], dtype=torch.uint8)
    mirror = formats.get_format("mxfp4").float_copy("scale", s)
    expected = [2.0 ** (int(e) - 127) for e in s[:-1]]  # 2**-127 (subnormal in float32) .. 2**127
    assert mirror[:-1].tolist() == expected and torch.isnan(mirror[-1])  # 255: NaN, as mx_dequantize


def test_scales_keep_their_bits_under_model_to():
    qw = QuantizedWeight.from_float(torch.randn(8, 64), "q4_0")
    scale, q = qw.scale.clone(), qw.qweight.clone()
    qw.to(torch.bfloat16)
    assert qw.dtype == torch.bfloat16 and torch.equal(qw.scale, scale) and torch.equal(qw.qweight, q)
    assert qw.dense().dtype == torch.bfloat16


def test_quantize_runs_on_meta():
    with torch.device("meta"):
        packed = formats.quantize("int4-g32", torch.empty(4, 3, 64))
    assert packed["qweight"].shape == (4, 3, 32) and packed["scale"].shape == (4, 3, 2)


# ---------------------------------------------------------------------------- models
def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.preset("tiny", **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # well-separated logits: greedy tokens do not flip on rounding
    return model.eval()


TOKENS = torch.tensor([[5, 17, 300, 42, 7, 99, 1, 3, 250, 11, 8, 64], [8, 3, 2, 1, 400, 500, 12, 9, 77, 76, 75, 74]])


def logits_error(model, qmodel) -> float:
    """RMS logit error relative to the float logits' standard deviation."""
    with torch.no_grad():
        ref, out = model(TOKENS), qmodel(TOKENS)
    return float((out - ref).pow(2).mean().sqrt() / ref.std())


@pytest.mark.parametrize("method,tol", [("int8", 0.03), ("q8_0", 0.03), ("int4-g32", 0.2), ("int4-g64", 0.2),
                                        ("int4-g128", 0.2), ("q4_0", 0.2), ("mxfp4", 0.25)])
def test_quantized_logits_close_to_float(method, tol):
    # measured: ~0.01 (8-bit), ~0.10-0.12 (4-bit integer) and ~0.17 (mxfp4) of the logit std on this random model
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", moe=MoEConfig(d_model=64, d_expert=32, num_experts=8, top_k=2,
                                                                 num_shared_experts=1))).eval()
    qmodel = quantize_model(copy.deepcopy(model), method)
    assert logits_error(model, qmodel) < tol


def test_what_is_quantized_and_what_stays_float():
    model = quantize_model(tiny_model(n_layers=3, first_k_dense=1), "int8")
    dense, moe = model.layers[0], model.layers[1]
    assert isinstance(dense.ffn, SwiGLU) and isinstance(dense.ffn.w13, QuantizedWeight)  # weights transformed,
    assert isinstance(moe.ffn, MoE) and isinstance(moe.ffn.experts, Experts)  # modules kept
    assert isinstance(moe.ffn.experts.w13, QuantizedWeight) and isinstance(moe.ffn.experts.w2, QuantizedWeight)
    assert moe.ffn.experts.w13.shape == (8, 64, 64) and moe.ffn in model.moe_layers()
    for block in model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(block.attn, name), QuantizedLinear)
        assert block.attn_norm.weight.dtype == torch.float32
    assert isinstance(model.lm_head, torch.nn.Linear) and isinstance(model.embed, torch.nn.Embedding)
    assert isinstance(moe.ffn.router.weight, torch.nn.Parameter)
    assert model.quantization == {"method": "int8", "quantize_head": False}
    head = quantize_model(tiny_model(), "q8_0", quantize_head=True)
    assert isinstance(head.lm_head, QuantizedLinear)


@pytest.mark.parametrize("method", ["int8", "q8_0"])
def test_quantized_greedy_generate_matches_float(method):
    """Greedy tokens agree until a step where the float model's top-2 margin is within the quantization's
    logit error there: a near tie may flip, nothing else may."""
    model = tiny_model()
    qmodel = quantize_model(tiny_model(), method)
    prompts = [[5, 17, 300, 42], [8, 3], [11], [7, 99, 1], [250, 11, 8, 64]]
    ref, out = generate(model, prompts, max_new_tokens=8), generate(qmodel, prompts, max_new_tokens=8)
    for prompt, ref_ids, out_ids in zip(prompts, ref, out):
        k = next((i for i, (a, b) in enumerate(zip(ref_ids, out_ids)) if a != b), None)
        if k is None:
            continue
        tokens = torch.tensor([prompt + ref_ids[:k]])
        with torch.no_grad():
            float_V, quant_V = model(tokens)[0, -1], qmodel(tokens)[0, -1]
        top2 = float_V.topk(2).values
        assert top2[0] - top2[1] <= 2 * (quant_V - float_V).abs().max(), (prompt, k)


@pytest.mark.parametrize("method", METHODS)
def test_quantized_generate_eager_and_static_step_agree(method, monkeypatch):
    qmodel = quantize_model(tiny_model(), method)
    prompts = [[5, 17, 300, 42], [8, 3], [11]]
    eager = generate(qmodel, prompts, max_new_tokens=8)
    assert all(len(o) == 8 for o in eager)
    monkeypatch.setattr(gen_mod, "compiled_decode_step", lambda model: model.decode_step)  # static step, eagerly
    assert generate(qmodel, prompts, max_new_tokens=8, compile=True) == eager


def test_static_step_dense_expert_path():
    """T*K > E in the static step: every expert dequantized (the dense expert path)."""
    moe = MoEConfig(d_model=64, d_expert=32, num_experts=4, top_k=3)
    qmodel = quantize_model(tiny_model(moe=moe), "int4-g32")
    eager = generate(qmodel, [[1, 2, 3], [4, 5]], max_new_tokens=5)
    step = qmodel.decode_step
    qmodel.__dict__["_compiled_decode_step"] = step  # run the static step eagerly
    assert generate(qmodel, [[1, 2, 3], [4, 5]], max_new_tokens=5, compile=True) == eager


@pytest.mark.parametrize("method", ["int4-g32", "q4_0"])
def test_few_tokens_dequantize_only_the_touched_experts(method):
    """Eager, few tokens: the pairs' experts only are dequantized, or none where moekit's C kernel reads
    the packed bytes itself (q4_0 on CPU)."""
    qmodel = quantize_model(tiny_model(), method)
    experts = qmodel.layers[0].ffn.experts
    seen = []
    original = experts.w13.dense

    def spy(index=None, dtype=None):
        seen.append(None if index is None else index.tolist())
        return original(index, dtype)

    experts.w13.dense = spy
    x = torch.randn(1, 64)
    gates, exp = torch.tensor([[0.7, 0.3]]), torch.tensor([[5, 2]])
    with torch.no_grad():
        y_fast = experts(x, topk_routing(None, exp, gates, None))
    assert seen == ([] if cpu_matvec.usable(method, x) else [[5, 2]])
    w13, w2 = original(), experts.w2.dense()
    n = 32
    y_ref = torch.zeros_like(x)
    for g, e in zip(gates[0].tolist(), exp[0].tolist()):
        h = w13[e] @ x[0]
        y_ref[0] += g * (w2[e] @ (torch.nn.functional.silu(h[:n]) * h[n:]))
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # many tokens: all experts once, through the grouped backend
        seen.clear()
        x = torch.randn(12, 64)
        experts(x, topk_routing(None, torch.randint(0, 8, (12, 2)), torch.rand(12, 2), None))
    assert seen == [None]


def test_padding_when_the_group_does_not_divide_the_dim():
    model = tiny_model()  # d_expert = 32: w2's rows are padded to 64 / 128
    for method in ("int4-g64", "int4-g128"):
        qmodel = quantize_model(copy.deepcopy(model), method)
        w2 = qmodel.layers[0].ffn.experts.w2
        assert w2.shape == (8, 64, 32) and w2.qweight.shape == (8, 64, formats.get_format(method).group // 2)
        assert w2.dense().shape == (8, 64, 32)
        assert logits_error(model, qmodel) < 0.2


def test_memory_reduction_measured():
    moe = MoEConfig(d_model=128, d_expert=128, num_experts=8, top_k=2, num_shared_experts=1)
    cfg = ModelConfig.preset("tiny", vocab_size=64, d_model=128, d_ff=256, n_layers=2, first_k_dense=1, moe=moe)
    model = Transformer(cfg).eval()
    state = model.state_dict()
    float_bytes = model_bytes(model)
    assert float_bytes == sum(t.numel() * t.element_size() for t in state.values())
    quantized_names = [k for k in state if k.endswith(("_proj.weight", "ffn.w13", "ffn.w2", "experts.w13",
                                                      "experts.w2", "shared.w13", "shared.w2"))
                       and not k.startswith("lm_head")]
    assert len(quantized_names) == 2 * 4 + 2 + 2 + 2
    float_kept = sum(t.numel() * t.element_size() for k, t in state.items() if k not in quantized_names)
    sizes = {}
    for method in METHODS:
        qmodel = quantize_model(copy.deepcopy(model), method)
        sizes[method] = model_bytes(qmodel)
        report = size_report(qmodel)
        assert report["total_bytes"] == sizes[method] and report["quantized_bytes"] == quantized_bytes(qmodel)
        fmt = formats.get_format(method)
        qws = [m for m in qmodel.modules() if isinstance(m, QuantizedWeight)]
        assert report["quantized_bytes"] == sum(w.numel() * fmt.bits_per_weight(w.shape[-1]) / 8 for w in qws)
        assert report["float_bytes"] == float_kept  # embedding, head, norms, router (+ its buffers)
        assert report["quantized_weights"] == sum(state[k].numel() for k in quantized_names)
    assert float_bytes / sizes["int8"] > 3.3
    assert float_bytes / sizes["q8_0"] > 3.2
    assert float_bytes / sizes["int4-g128"] > 5.5
    assert float_bytes / sizes["q4_0"] > 5.5
    assert sizes["int4-g128"] < sizes["int4-g64"] < sizes["int4-g32"]


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    for method in ("int4-g32", "q8_0"):
        qmodel = quantize_model(tiny_model(), method, quantize_head=method == "q8_0")
        save_model(qmodel, tmp_path / method)
        loaded = load_model(tmp_path / method)
        assert loaded.quantization == qmodel.quantization
        with torch.no_grad():
            assert torch.equal(loaded(TOKENS), qmodel(TOKENS))
        assert model_bytes(loaded) == model_bytes(qmodel)
        bf16 = load_model(tmp_path / method, dtype="bfloat16")
        assert bf16.layers[0].ffn.experts.w13.dtype == torch.bfloat16
        assert generate(bf16, [[1, 2, 3]], max_new_tokens=3)[0].__len__() == 3


@pytest.mark.parametrize("method", ["int5", "int4-g48", "Q4_0", ""])
def test_unknown_method_lists_the_valid_ones(method):
    with pytest.raises(ValueError, match="int4-g64"):
        quantize_model(tiny_model(), method)


def test_errors():
    model = quantize_model(tiny_model(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="tie_embeddings"):
        quantize_model(tiny_model(tie_embeddings=True), "int8", quantize_head=True)
    with pytest.raises(ValueError, match="Transformer"):
        quantize_model(torch.nn.Linear(4, 4), "int8")
    with pytest.raises(ValueError, match="last dim"):
        formats.quantize("q8_0", torch.empty(3, 0))


# ---------------------------------------------------------------------------- command line
def test_cli_quantize_and_generate(tmp_path, capsys):
    from moekit.cli import main

    save_model(tiny_model(), tmp_path / "float")
    assert main(["quantize", "--checkpoint", str(tmp_path / "float"), "--method", "q4_0",
                 "--out", str(tmp_path / "q")]) == 0
    report = capsys.readouterr().out
    assert "q4_0" in report and "reduction" in report
    loaded = load_model(tmp_path / "q")
    assert loaded.quantization["method"] == "q4_0"
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "4"]) == 0
    from_ckpt = capsys.readouterr().out.split()
    assert main(["generate", "--checkpoint", str(tmp_path / "float"), "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "4", "--quantize", "q4_0"]) == 0
    assert capsys.readouterr().out.split() == from_ckpt == [str(t) for t in generate(loaded, [[1, 2, 3]], 4)[0]]
    assert main(["quantize", "--checkpoint", str(tmp_path / "float"), "--method", "int3",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "int4-g32" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["int8", "q4_0", "int4-g32"])
def test_compiled_quantized_generate_equals_eager(method):
    qmodel = quantize_model(tiny_model(), method)
    prompts = [[5, 17, 300, 42], [8, 3], [11]]
    expected = generate(qmodel, prompts, max_new_tokens=8)
    assert generate(qmodel, prompts, max_new_tokens=8, compile=True) == expected
