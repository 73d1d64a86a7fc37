"""The analyzer on hybrid linear-attention models (Qwen3-Next, Qwen3.5/3.6-MoE; docs/formulas.md#hybrid-
linear-attention): parameters equal transformers' meta-device counts, KV only on the attention layers plus
the fixed recurrent state (against a real model's cache), the delta rule's FLOPs (by hand and against
FlopCounterMode), training activations against what autograd keeps, and the CLI rows."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.analyze import analyze
from moekit.analyze.arch import from_hf_config, from_model_config
from moekit.analyze.estimate import forward_flops_per_token, linear_mixer_flops, matmul_params_by_component
from moekit.analyze.memory import activation_bytes_per_token
from moekit.attention.delta_rule import CHUNK
from moekit.analyze.formulas import DELTA_RULE_CHUNK
from moekit.bench.memory import saved_bytes
from moekit.hf import config_to_hf
from moekit.plan import ForwardPlan

transformers = pytest.importorskip("transformers")

# hybrid-tiny, worked by hand: d 64, 3 linear + 1 attention layers, Hk 2, Hv 4, Dk = Dv = 16, K 4, C = 128
TINY_STATE_BF16 = 3 * (128 * 3 * 2 + 4 * 16 * 16 * 4)  # conv inputs C·(K−1) in bf16 + fp32 state Hv·Dk·Dv
TINY_KV_BF16 = 1 * 2 * 2 * 16 * 2  # one attention layer: k and v, 2 KV heads of 16, bf16
QWEN3_NEXT_STATE = 36 * (8192 * 3 * 2 + 32 * 128 * 128 * 4)  # C = 2·16·128 + 32·128


def meta_params(hf: dict) -> int:
    config = transformers.AutoConfig.for_model(**hf)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,model_type", [("hybrid-tiny", "qwen3_next"), ("hybrid-tiny", "qwen3_5_moe_text"),
                                             ("qwen3-next-80b-a3b", "qwen3_next"),
                                             ("qwen3.5-397b-a17b", "qwen3_5_moe_text"),
                                             ("qwen3.6-35b-a3b", "qwen3_5_moe_text")])
def test_params_equal_transformers_meta_model(name, model_type):
    cfg = ModelConfig.preset(name)
    if model_type == "qwen3_next":
        cfg = cfg.replace(linear_fused_proj=True)
    hf = config_to_hf(cfg, model_type, "bfloat16")
    total = meta_params(hf)
    r = analyze(from_model_config(cfg))
    assert r["params_total"] == total
    assert analyze(from_hf_config(hf))["params_total"] == total
    moe = cfg.moe
    inactive = (moe.num_experts - moe.top_k) * cfg.n_layers * 3 * cfg.d_model * moe.d_expert
    assert r["params_active"] == total - inactive
    if name == "hybrid-tiny":
        assert total == 358_312  # docs/formulas.md#hybrid-linear-attention
    if model_type == "qwen3_5_moe_text":  # the released multimodal config.json: its text_config
        wrapped = {"model_type": "qwen3_5_moe", "text_config": {**hf, "model_type": "qwen3_5_moe_text"}}
        assert analyze(from_hf_config(wrapped))["params_total"] == total


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_kv_and_state_bytes_equal_a_real_cache(dtype, kv_dtype):
    """KV only on the attention layer, the recurrent state per sequence: what model.new_cache allocates."""
    cfg = ModelConfig.preset("hybrid-tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    B, S = 3, 40
    cache = model.new_cache(B, S, dtype=dtype, device="meta")
    allocated = sum(t.nbytes for layer in cache.layers for t in vars(layer).values() if isinstance(t, torch.Tensor))
    r = analyze(from_model_config(cfg), weights=kv_dtype, batch=B, context=S)
    inf = r["memory"]["inference"]
    assert inf["kv_cache"] + inf["recurrent_state"] == allocated
    assert inf["recurrent_state"] == B * r["recurrent_state_bytes_per_sequence"]
    if kv_dtype == "bf16":
        assert r["recurrent_state_bytes_per_sequence"] == TINY_STATE_BF16 == 14_592
        assert r["kv_bytes_per_token"] == TINY_KV_BF16 == 128


def test_fit_and_decode_bytes_count_the_state():
    """Max batch per sequence C·KV + state; a decode step reads the KV and reads and writes the state."""
    arch = from_model_config(ModelConfig.preset("hybrid-tiny"))
    C, B = 100, 4
    r = analyze(arch, weights="bf16", batch=B, context=C, memory_gib=0.01)
    m = r["memory"]
    per_sequence = C * TINY_KV_BF16 + TINY_STATE_BF16
    assert m["inference"]["total"] == m["inference"]["weights"] + B * per_sequence
    assert m["inference"]["max_batch"] == math.floor((m["usable"] - m["inference"]["weights"]) / per_sequence)
    r1 = analyze(arch, weights="bf16", batch=1, context=C)
    # experts touched differ with B; subtract them and compare what scales with B
    expert_bytes = r["weight_bytes_by_component"]["experts"]
    touched = r["experts_touched_per_layer"] / 8 * expert_bytes
    touched1 = r1["experts_touched_per_layer"] / 8 * expert_bytes
    growth = (r["decode_bytes_per_step"] - touched) - (r1["decode_bytes_per_step"] - touched1)
    assert growth == pytest.approx((B - 1) * (C * TINY_KV_BF16 + 2 * TINY_STATE_BF16))


def test_delta_rule_flops_by_hand():
    """Per linear layer: step 7·Hv·Dk·Dv + conv 2·C·K; chunked Hv·(c·(5·Dk + 3·Dv) + 6·Dk·Dv) + conv."""
    assert DELTA_RULE_CHUNK == CHUNK
    arch = from_model_config(ModelConfig.preset("hybrid-tiny"))
    conv = 2 * 128 * 4
    assert linear_mixer_flops(arch, 1) == 7 * 4 * 16 * 16 + conv == 8_192
    assert linear_mixer_flops(arch, 64) == 4 * (64 * (5 * 16 + 3 * 16) + 6 * 16 * 16) + conv == 39_936
    assert linear_mixer_flops(arch, 4096) == linear_mixer_flops(arch, 64)  # chunks of 64 whatever the span
    ctx = 1000
    matmul = 2 * sum(matmul_params_by_component(arch).values())
    attention = 4 * 4 * 16 * ctx  # the one attention layer's QKᵀ and AV
    assert forward_flops_per_token(arch, ctx, span=1) == matmul + attention + 3 * 8_192
    r = analyze(arch, weights="bf16", context=ctx)
    assert r["flops_per_token_decode"] == matmul + attention + 3 * 8_192
    padded = 1024 / 1000  # 16 chunks of 64 for 1000 tokens
    assert r["delta_rule_flops_per_token"] == {"chunked": pytest.approx((39_936 - conv) * padded + conv), "step": 8_192}
    assert r["decode_tokens_per_s"] == pytest.approx(1 / max(r["flops_per_token_decode"] / r["hardware"]["flops_used"],
                                                             r["decode_bytes_per_step"] / r["hardware"]["bw"]))


def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    b, h, t, dq = q
    return 2 * b * h * t * k[2] * dq + 2 * b * h * t * k[2] * v[3]


def _solve_flops(a, b, *args, out_shape=None, **kwargs):
    """The unit triangular solve counted as c² per right-hand column (the analyzer's convention)."""
    return a[-1] * a[-1] * math.prod(b[:-2]) * b[-1]


@pytest.mark.parametrize("T", [24, 100])  # one chunk of 24; two chunks of 64 with the last padded
def test_chunked_forward_flops_match_flop_counter(T):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig.preset("hybrid-tiny")
    cfg = cfg.replace(moe=cfg.moe.replace(experts_impl="reference"))
    model = Transformer(cfg).eval()
    B = 2
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
               torch.ops.aten.linalg_solve_triangular: _solve_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(tokens)
    assert counter.get_total_flops() / (B * T) == pytest.approx(forward_flops_per_token(from_model_config(cfg), T),
                                                                rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Hk,Hv,Dk,Dv", [(2, 4, 16, 16), (1, 2, 64, 32)])
def test_linear_layer_activation_bytes_near_saved_tensors(dtype, Hk, Hv, Dk, Dv):
    """A Gated DeltaNet layer's activations for backward: the estimate within 5% of autograd's saved bytes."""
    cfg = ModelConfig.preset("hybrid-tiny", linear_num_key_heads=Hk, linear_num_value_heads=Hv,
                             linear_key_head_dim=Dk, linear_value_head_dim=Dv)
    torch.manual_seed(0)
    model = Transformer(cfg).to(dtype)
    block, B, T = model.layers[0], 2, 256
    assert cfg.layer_type(0) == "linear"
    x = torch.randn(B, T, cfg.d_model, dtype=dtype, requires_grad=True)
    plan = ForwardPlan.dense(torch.zeros(B, T, dtype=torch.long), None, None, 0, None)
    nbytes, _ = saved_bytes(lambda: block.attn(block.attn_norm(x), plan, None), params=list(model.parameters()))
    arch = from_model_config(cfg)
    act = 4 if dtype == torch.float32 else 2
    a = arch.attention
    full = 2 * 64 + 3 * 4 * 16 + 2 * 2 * 16  # the attention layer: norm in/out, Q and gate, output, K, V
    linear_pred = (activation_bytes_per_token(arch, act)["attention"] - full * act) / a.linear_layers
    assert linear_pred == pytest.approx(nbytes / (B * T), rel=0.05)


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "moekit.cli", "analyze", *argv], capture_output=True, text=True)


def test_cli_rows_and_json(tmp_path):
    out = run_cli("qwen3-next-80b-a3b", "--context", "4096")
    assert out.returncode == 0, out.stderr
    assert "| layers | 12 attention + 36 Gated DeltaNet |" in out.stdout
    assert "| recurrent state (B=1, 36 Gated DeltaNet layers) | 73.69 MiB |" in out.stdout
    assert "| KV cache (B=1, C=4096, bf16) | 96.00 MiB |" in out.stdout
    assert "recurrent state 73.69 MiB" in out.stdout.splitlines()[0]  # the fit warning names it
    hf = config_to_hf(ModelConfig.preset("qwen3-next-80b-a3b"), "qwen3_next", "bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    js = run_cli(str(tmp_path / "config.json"), "--context", "4096", "--batch", "2", "--json")
    assert js.returncode == 0, js.stderr
    r = json.loads(js.stdout)
    assert r["params_total"] == 79_674_391_296 and r["n_linear_layers"] == 36
    assert r["kv_bytes_per_token"] == 12 * 2 * 2 * 256 * 2
    assert r["recurrent_state_bytes_per_sequence"] == QWEN3_NEXT_STATE
    inf = r["memory"]["inference"]
    assert inf["kv_cache"] == 2 * 4096 * 12 * 2 * 2 * 256 * 2 and inf["recurrent_state"] == 2 * QWEN3_NEXT_STATE
