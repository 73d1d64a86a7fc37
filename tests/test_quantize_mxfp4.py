"""MXFP4 (gpt-oss's expert weight format) as a weight-only format: gpt-oss's packed blocks adopted
bit for bit and decoded exactly as transformers decodes them, the packed (fused) path equal to the
dequantized one, quantized models, the CLI and the analyzer's 4.25 bits per weight.
(The per-group byte reference for mxfp4 is in tests/test_quantize.py, with the other formats.)"""

import copy
import json
import subprocess
import sys

import pytest
import torch

from moekit import ModelConfig, MoEConfig, Transformer, load_model, save_model
from moekit.analyze.precision import get_precision
from moekit.moe import MoE
from moekit.quantize import formats, quantize_model
from moekit.quantize.modules import QuantizedLinear, QuantizedWeight

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]


def random_blocks(*lead, seed=0):
    """gpt-oss-like packed weights: blocks uint8 (..., N, K/32, 16), scales uint8 (..., N, K/32)."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*lead, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(115, 135, lead, generator=g, dtype=torch.uint8)
    return blocks, scales


def test_blocks_decode_as_transformers_and_round_trip_bit_for_bit():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = random_blocks(3, 10, 2)  # E=3 experts, N=10 rows, K=64
    w = QuantizedWeight.from_mxfp4_blocks(blocks, scales, dtype=torch.float32)
    assert w.shape == (3, 10, 64) and w.method == "mxfp4" and w.bits_per_weight() == 4.25
    expected = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # its (E, K, N)
    assert torch.equal(w.dense(), expected)
    assert torch.equal(w.dense(torch.tensor([2, 0])), expected[[2, 0]])
    b2, s2 = w.mxfp4_blocks()
    assert torch.equal(b2, blocks) and torch.equal(s2, scales)
    # and by hand: element 2j is byte j's low nibble
    byte, s = int(blocks[1, 4, 1, 5]), int(scales[1, 4, 1])
    assert w.dense()[1, 4, 32 + 10].item() == E2M1[byte & 15] * 2.0 ** (s - 127)
    assert w.dense()[1, 4, 32 + 11].item() == E2M1[byte >> 4] * 2.0 ** (s - 127)


def test_decode_matches_torch_float4_where_supported():
    blocks, scales = random_blocks(4, 1)
    try:
        pairs = blocks.view(torch.float4_e2m1fn_x2).to(torch.float32)
    except (AttributeError, RuntimeError, NotImplementedError) as err:
        pytest.skip(f"torch cannot convert float4_e2m1fn_x2 here: {err}")
    w = QuantizedWeight.from_mxfp4_blocks(blocks, scales, dtype=torch.float32)
    assert torch.equal(w.dense(), pairs.reshape(4, 32) * torch.exp2(scales.float() - 127))


def test_packed_path_equals_dequantized_path():
    """Experts holding packed MXFP4 blocks (gathered matvec, static decode) equal the same experts
    with the dequantized float weights."""
    cfg = MoEConfig(d_model=64, d_expert=32, num_experts=4, top_k=2, router="topk_softmax", router_bias=True,
                    expert_bias=True, activation="swiglu_oai")
    torch.manual_seed(0)
    packed = MoE(cfg).eval()
    floats = copy.deepcopy(packed)
    with torch.no_grad():
        for b in (packed.experts.b13, packed.experts.b2, packed.router.bias):
            b.normal_(0, 0.1)
        floats.load_state_dict(packed.state_dict())
    for name, n, k in (("w13", 64, 64), ("w2", 64, 32)):
        blocks, scales = random_blocks(4, n, k // 32, seed=n + k)
        scales.sub_(8)  # weights of about 0.01..1
        qw = QuantizedWeight.from_mxfp4_blocks(blocks, scales, dtype=torch.float32)
        delattr(packed.experts, name)
        setattr(packed.experts, name, qw)
        getattr(floats.experts, name).data.copy_(qw.dense())
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref, _ = floats(x)
        assert torch.equal(packed(x)[0], ref)  # eager: dequantize, then the float kernels
        torch.testing.assert_close(packed(x, static=True)[0], ref, rtol=1e-5, atol=1e-5)  # fused matvec
        torch.testing.assert_close(packed(x[:1], static=True)[0], ref[:1], rtol=1e-5, atol=1e-5)


def test_quantize_model_mxfp4_and_experts_only(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", moe=MoEConfig(d_model=64, d_expert=32, num_experts=8, top_k=2,
                                                   num_shared_experts=1, expert_bias=True))
    model = Transformer(cfg).eval()
    tokens = torch.tensor([[5, 17, 300, 42, 7, 99, 1, 3], [8, 3, 2, 1, 400, 500, 12, 9]])
    with torch.no_grad():
        ref = model(tokens)
    for experts_only, tol in ((False, 0.25), (True, 0.03)):  # measured: 0.17 and 0.010 of the logit std
        q = quantize_model(copy.deepcopy(model), "mxfp4", experts_only=experts_only)
        moe = q.layers[-1].ffn
        assert isinstance(moe.experts.w13, QuantizedWeight) and isinstance(moe.experts.b13, torch.nn.Parameter)
        assert isinstance(moe.shared.w13, QuantizedWeight) != experts_only
        assert isinstance(q.layers[0].attn.q_proj, QuantizedLinear) != experts_only
        with torch.no_grad():
            out = q(tokens)
        assert float((out - ref).pow(2).mean().sqrt() / ref.std()) < tol
        save_model(q, tmp_path / str(experts_only))
        loaded = load_model(tmp_path / str(experts_only))
        assert loaded.quantization == q.quantization
        with torch.no_grad():
            assert torch.equal(loaded(tokens), out)
    with pytest.raises(ValueError, match="contradicts experts_only"):
        quantize_model(copy.deepcopy(model), "mxfp4", quantize_head=True, experts_only=True)


def test_from_blocks_errors():
    blocks, scales = random_blocks(3, 2)
    with pytest.raises(ValueError, match="must be uint8"):
        QuantizedWeight.from_mxfp4_blocks(blocks.to(torch.int16), scales)
    with pytest.raises(ValueError, match="do not match"):
        QuantizedWeight.from_mxfp4_blocks(blocks, scales[:, :1])
    with pytest.raises(ValueError, match="needs an mxfp4 weight"):
        QuantizedWeight.from_float(torch.randn(4, 32), "q4_0").mxfp4_blocks()


def test_cli_quantize_format_mxfp4(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    save_model(model, tmp_path / "float")
    moekit = [sys.executable, "-m", "moekit.cli"]
    run = subprocess.run(moekit + ["quantize", str(tmp_path / "float"), str(tmp_path / "q"), "--format", "mxfp4",
                                   "--json"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["method"] == "mxfp4" and report["bits_per_quantized_weight"] == 4.25  # tiny's dims: whole groups
    expected = quantize_model(model, "mxfp4")
    tokens = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "q")(tokens), expected(tokens))
    bad = subprocess.run(moekit + ["quantize", str(tmp_path / "float"), str(tmp_path / "x"), "--format", "fp4"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "mxfp4" in bad.stderr and "Traceback" not in bad.stderr


def test_analyzer_counts_mxfp4_at_4_25_bits():
    p = get_precision("mxfp4")
    assert p.bits_per_weight() == 4.25 and p.matrix_bytes(2, 64) == 2 * (32 + 2)
    run = subprocess.run([sys.executable, "-m", "moekit.cli", "analyze", "tiny", "--weights", "mxfp4", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "mxfp4" in run.stdout
    assert formats.get_format("mxfp4").bits_per_weight(2880) == 4.25  # gpt-oss's hidden size
