"""The analyzer against docs/formulas.md's worked examples, transformers' parameter counts,
FlopCounterMode on a real forward, and saved_tensors_hooks on the real grouped backend."""

import json
import math

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.analyze import analyze, from_hf_config, from_model_config, parse_layer, resolve_model
from moekit.analyze import formulas
from moekit.analyze.cli import cli
from moekit.analyze.estimate import activation_bytes_per_moe_layer, flops_by_component, forward_flops_per_token
from moekit.analyze.params import params_by_component
from moekit.analyze.precision import precisions

PRECISIONS = precisions()
from moekit.bench.memory import saved_bytes
from moekit.moe.grouped import experts_grouped

REQUIRED_KEYS = ["params_total", "params_active", "params_by_component", "granularity", "sparsity",
                 "flops_per_token_forward", "flops_per_token_training", "kv_bytes_per_token", "weight_bytes",
                 "moe_arithmetic_intensity", "critical_batch", "decode_tokens_per_s", "decode_bound",
                 "prefill_tokens_per_s", "activation_bytes_per_moe_layer"]


# ------------------------------------------------------------------ docs/formulas.md worked examples
def test_granularity_and_sparsity_worked_examples():
    r = analyze(parse_layer("mixtral-8x22b"))
    assert (r["granularity"], r["sparsity"]) == (0.375, 0.25)
    r = analyze(parse_layer("deepseek-v2"))
    assert round(r["granularity"], 2) == 3.33 and r["sparsity"] == 0.0375


@pytest.mark.parametrize("name", ["deepseek-v3.2", "kimi-k2.5", "qwen3-next-80b-a3b", "glm-5.1", "deepseek-v4-pro"])
def test_published_layers_by_name(name):
    from moekit.analyze.catalog import LAYERS

    d, n, K, E = LAYERS[name]
    r = analyze(parse_layer(name))
    assert r["granularity"] == d / n and r["sparsity"] == K / E
    assert r["params_total"] == E * 3 * d * n + E * d  # experts + router, worked by hand


@pytest.mark.parametrize("T,d,n,K,E", [(4096, 2048, 768, 8, 128), (24576, 1536, 256, 8, 128), (512, 7168, 2048, 8, 256)])
def test_arithmetic_intensity_two_forms_agree(T, d, n, K, E):
    general = formulas.moe_arithmetic_intensity(T, d, n, K, E, 2, 2)
    assert general == pytest.approx(formulas.moe_arithmetic_intensity_closed(T, d, n, K, E), rel=1e-12)
    r = analyze(from_hf_config({"model_type": "mixtral", "vocab_size": 10, "hidden_size": d, "num_hidden_layers": 1,
                                "num_attention_heads": 1, "intermediate_size": n, "num_local_experts": E,
                                "num_experts_per_tok": K}), weights="bf16", tokens=T)
    assert r["moe_arithmetic_intensity"] == pytest.approx(general, rel=1e-12)


def test_finer_granularity_lowers_intensity():
    coarse = formulas.moe_arithmetic_intensity_closed(4096, 4096, 4096, 2, 8)
    fine = formulas.moe_arithmetic_intensity_closed(4096, 4096, 512, 16, 64)  # same FLOPs, G 1 -> 8
    assert fine < 0.6 * coarse  # 768 -> 409.6 FLOP/B


def test_kv_cache_worked_examples():
    gpt3 = analyze(resolve_model("gpt3-175b"), weights="fp16")
    assert formulas.kv_values_per_token(96, 96, 128) == 2_359_296
    assert gpt3["kv_bytes_per_token"] == 2_359_296 * 2
    assert f"{gpt3['kv_bytes_per_token'] / 1e6:.2f}" == "4.72"
    llama = analyze(resolve_model("llama-2-7b"), weights="fp16")
    assert llama["kv_bytes_per_token"] == 524_288


def test_mla_kv_cache_uses_the_latent():
    r = analyze(resolve_model("deepseek-v3"), kv_dtype="bf16")
    assert r["kv_bytes_per_token"] == 61 * (512 + 64) * 2
    mha = analyze(resolve_model("qwen3-30b-a3b"), kv_dtype="bf16")
    assert mha["kv_bytes_per_token"] == 2 * 48 * 4 * 128 * 2


def test_critical_batch_worked_example():
    assert round(formulas.critical_batch(312e12, 2, 1.935e12)) == 161
    r = analyze(resolve_model("llama-2-7b"), hardware="a100", weights="bf16")
    assert round(r["critical_batch"]) == 161
    # the two errors docs/formulas.md corrects: FLOPS/(2·BW) for 2-byte weights, and the T4's peak taken as fp32
    assert round(formulas.critical_batch(312e12, 1, 1.935e12)) == 81 != 161


def test_decode_bound_worked_example():
    assert round(formulas.decode_bound_batch1(1935e9, 14e9)) == 138
    # the model-level path: weights + KV at a short context, all memory-bound on an A100
    r = analyze(resolve_model("llama-2-7b"), hardware="a100", weights="fp16", context=1)
    expected = 1.935e12 / (r["weight_bytes"] - r["weight_bytes_by_component"]["embedding"] + r["kv_bytes_per_token"])
    assert r["decode_bound"] == "memory" and r["decode_tokens_per_s"] == pytest.approx(expected, rel=1e-12)
    # int4 is about 0.5 byte per weight plus scales, not 1 byte
    assert PRECISIONS["int4"].bits_per_weight(4096) == 4.25


def test_quant_formats_bits_per_weight():
    assert PRECISIONS["q8_0"].bits_per_weight() == 8.5 and PRECISIONS["q8_0"].matrix_bytes(1, 32) == 34
    assert PRECISIONS["q4_0"].bits_per_weight() == 4.5 and PRECISIONS["q4_0"].matrix_bytes(1, 32) == 18
    assert PRECISIONS["int8"].bits_per_weight(4096) == 8 + 32 / 4096
    for n in (32, 64, 128):
        assert PRECISIONS[f"int4-g{n}"].bits_per_weight(4096) == 4 + 32 / n
    assert PRECISIONS["fp8"].matrix_bytes(128, 128) == 128 * 128 + 4


def test_dense_formulas_worked_by_hand():
    arch = resolve_model("gpt3-175b")
    d, L, V = 12288, 96, 50257
    f = flops_by_component(arch, ctx=0)
    assert f["attention"] + f["dense_ffn"] == L * formulas.dense_layer_flops(d)  # 24·d² per layer
    exact = sum(params_by_component(arch).values())
    assert exact == pytest.approx(formulas.dense_params(L, d, V), rel=2e-3)  # biases, norms, positions aside
    r = analyze(arch, weights="fp16", context=2048)
    n_matmul = (r["flops_per_token_forward"] - L * 4 * d * 2048) / 2
    assert r["flops_per_token_training"] == formulas.training_flops(n_matmul, L, 96, 128, 2048)


def test_experts_touched_against_simulation():
    E, K, B = 64, 6, 5
    g = torch.Generator().manual_seed(0)
    trials = 4000
    counts = []
    for _ in range(trials):
        chosen = set()
        for _ in range(B):
            chosen.update(torch.randperm(E, generator=g)[:K].tolist())
        counts.append(len(chosen))
    mean = sum(counts) / trials
    assert mean == pytest.approx(formulas.experts_touched(E, K, B), abs=0.15)
    assert formulas.experts_touched(E, K, 1) == pytest.approx(K)


def test_moe_decode_counts_touched_experts_not_all():
    arch = resolve_model("qwen3-30b-a3b")
    r1, r64 = analyze(arch, batch=1, context=128), analyze(arch, batch=64, context=128)
    expert_bytes = r1["weight_bytes_by_component"]["experts"]
    other = r1["decode_bytes_per_step"] - expert_bytes * 8 / 128 - 128 * r1["kv_bytes_per_token"]
    assert other == pytest.approx(r1["weight_bytes"] - expert_bytes - r1["weight_bytes_by_component"]["embedding"])
    touched64 = formulas.experts_touched(128, 8, 64)
    assert r64["decode_bytes_per_step"] == pytest.approx(other + expert_bytes * touched64 / 128 + 64 * 128 * r1["kv_bytes_per_token"])
    assert r64["decode_tokens_per_s"] > 5 * r1["decode_tokens_per_s"]


def test_decode_turns_compute_bound_past_break_even():
    arch = parse_layer("1536,256,128,8")
    r = analyze(arch, hardware="h100")
    B = r["break_even_batch"]
    assert B > 1
    assert analyze(arch, batch=B - 1)["decode_bound"] == "memory"
    assert analyze(arch, batch=B)["decode_bound"] == "compute"


# ------------------------------------------------------------------ parameter counts vs transformers
HF_PUBLISHED = {
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                      moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                      tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                    num_experts_per_tok=2, tie_word_embeddings=False),
    "olmoe": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                  num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                  tie_word_embeddings=False),
    "qwen2_moe": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=3584, intermediate_size=18944,
                      moe_intermediate_size=2560, shared_expert_intermediate_size=20480, num_hidden_layers=28,
                      num_attention_heads=28, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                      decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    "deepseek_v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
                        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, v_head_dim=128, n_group=8, topk_group=4, tie_word_embeddings=False),
    # small dense ones: llama with biases and tied embeddings, a GPT-3-style (gpt2) layout
    "llama": dict(model_type="llama", vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=3,
                  num_attention_heads=8, num_key_value_heads=2, attention_bias=True, mlp_bias=True, tie_word_embeddings=True),
    "gpt2": dict(model_type="gpt2", vocab_size=1000, n_embd=192, n_layer=3, n_head=6, n_positions=128),
}
PUBLISHED_TOTAL_B = {"qwen3_moe": 30.5, "mixtral": 46.7, "olmoe": 6.9, "qwen2_moe": 57.4, "deepseek_v3": 671.0}


def _hf_meta_params(hf_dict):
    transformers = pytest.importorskip("transformers")
    d = dict(hf_dict)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    by_name = {n: p.numel() for n, p in model.named_parameters()}
    return sum(by_name.values()), by_name


@pytest.mark.parametrize("model_type", list(HF_PUBLISHED))
def test_params_equal_transformers_meta_model(model_type):
    total, by_name = _hf_meta_params(HF_PUBLISHED[model_type])
    r = analyze(from_hf_config(HF_PUBLISHED[model_type]))
    assert r["params_total"] == total
    comp = r["params_by_component"]
    experts = sum(n for k, n in by_name.items() if ".experts." in k and "shared" not in k)
    assert comp["experts"] == experts
    if model_type in PUBLISHED_TOTAL_B:
        assert round(total / 1e9, 1) == PUBLISHED_TOTAL_B[model_type]


def test_published_active_params():
    # published "37B activated" and "A3B"/3.3B, truncated as the model cards print them
    assert math.floor(analyze(resolve_model("deepseek-v3"))["params_active"] / 1e9) == 37
    assert math.floor(analyze(from_hf_config(HF_PUBLISHED["qwen3_moe"]))["params_active"] / 1e8) / 10 == 3.3


def test_moekit_preset_counts_equal_the_built_model():
    for name in ("tiny", "small", "olmoe-1b-7b"):
        cfg = ModelConfig.preset(name)
        with torch.device("meta"):
            model = Transformer(cfg)
        r = analyze(from_model_config(cfg))
        assert r["params_total"] == model.num_params()
        assert r["params_active"] == model.num_params(active=True)


# ------------------------------------------------------------------ FLOPs vs FlopCounterMode
def _cpu_sdpa_flops(q, k, v, *args, out_shape=None, **kwargs):
    """FlopCounterMode has no formula for the CPU flash-attention kernel; this is the standard SDPA
    count it uses on GPU (2·B·H·T·S·d for QKᵀ plus 2·B·H·T·S·d_v for AV; no causal halving)."""
    b, h, t, dq = q
    return 2 * b * h * t * k[2] * dq + 2 * b * h * t * k[2] * v[3]


@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("small", {"n_layers": 2}),
                                              ("tiny", {"tie_embeddings": True, "qk_norm": "full"})])
def test_forward_flops_match_flop_counter(preset, overrides):
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig.preset(preset, **overrides)
    cfg = cfg.replace(moe=cfg.moe.replace(experts_impl="reference"))  # the per-expert loop does exactly the routed work
    model = Transformer(cfg).eval()
    B, T = 2, 24
    tokens = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(tokens)
    assert counter.get_total_flops() / (B * T) == forward_flops_per_token(from_model_config(cfg), T)


# ------------------------------------------------------------------ activation bytes vs saved_tensors_hooks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D,F,E,K", [(300, 96, 64, 16, 4), (64, 32, 16, 8, 8), (1, 16, 8, 4, 2)])
def test_moekit_activation_bytes_equal_saved_tensors(dtype, T, D, F, E, K):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, D, dtype=dtype, requires_grad=True)
    w13 = torch.randn(E, 2 * F, D, dtype=dtype, requires_grad=True)
    w2 = torch.randn(E, D, F, dtype=dtype, requires_grad=True)
    gates = torch.rand(T * K, requires_grad=True)
    tok = torch.arange(T).repeat_interleave(K)
    exp = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).reshape(-1)
    nbytes, _ = saved_bytes(lambda: experts_grouped(x, w13, w2, gates, tok, exp, "auto"), params=(w13, w2))
    predicted = activation_bytes_per_moe_layer(D, F, E, K, T, x.element_size())
    assert nbytes == predicted["moekit"]
    assert predicted["moekit"] < predicted["scattermoe"] < predicted["naive"]


# ------------------------------------------------------------------ CLI, JSON and errors
def test_cli_json_has_required_keys(capsys):
    assert cli(["qwen3-30b-a3b", "--hardware", "h200", "--weights", "q4_0", "--batch", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in REQUIRED_KEYS:
        assert key in r, key
    assert set(r["activation_bytes_per_moe_layer"]) == {"naive", "scattermoe", "moekit"}
    assert r["decode_bound"] in ("memory", "compute")
    assert set(r["params_by_component"]) == {"embedding", "attention", "dense_ffn", "experts", "shared_experts",
                                             "router", "norms", "head"}


def test_cli_text_report_names_formulas(capsys):
    assert cli(["--layer", "1536,256,128,8", "--tokens", "24576"]) == 0
    out = capsys.readouterr().out
    assert "3 / (3/(T·rho) + (2 + 2G)/d)" in out and "sonicmoe: 364/405" in out


def test_cli_reads_hf_config_file_and_run_dir(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(HF_PUBLISHED["olmoe"]))
    assert cli([str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == analyze(from_hf_config(HF_PUBLISHED["olmoe"]))["params_total"]
    from moekit.checkpoint import save_model

    model = Transformer(ModelConfig.preset("tiny"))
    save_model(model, tmp_path / "run" / "checkpoint")
    assert cli([str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params_total"] == model.num_params()


@pytest.mark.parametrize("argv,message", [
    (["tiny", "--hardware", "tpu9"], "a100, h100"),
    (["no-such-model"], "qwen3-30b-a3b"),
    (["--layer", "64,32,4,8"], "K=8 exceeds E=4"),
    (["--layer", "64,32"], "d,n,E,K"),
    (["tiny", "--weights", "int3"], "q4_0"),
    (["tiny", "--batch", "0"], "--batch"),
    ([], "exactly one of MODEL or --layer"),
])
def test_cli_errors_list_valid_choices(argv, message, capsys):
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_config_missing_fields_is_a_clear_error(tmp_path):
    bad = dict(HF_PUBLISHED["mixtral"])
    del bad["num_local_experts"], bad["hidden_size"]
    with pytest.raises(ValueError, match="missing required fields: hidden_size, num_local_experts"):
        from_hf_config(bad)
    with pytest.raises(ValueError, match="supported: qwen3_moe"):
        from_hf_config({"model_type": "bert"})


@pytest.mark.slow  # (15 s: it measures the machine)
def test_local_hardware_is_measured():
    from moekit.analyze import local_hardware

    hw = local_hardware()
    assert hw.flops > 1e8 and hw.flops_fp32 > 1e8 and hw.bw > 1e8 and math.isfinite(hw.bw)
    r = analyze(resolve_model("small"), hardware="local", weights="fp32", context=64)
    assert r["hardware"]["flops_used"] == hw.flops_fp32 and r["decode_tokens_per_s"] > 0


def test_cli_plot_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli(["qwen3-30b-a3b", "--batch", "16", "--context", "256", "--plot", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for path in r["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.rsplit("/", 1)[1] for p in r["plots"]) == ["decode_vs_batch.png", "roofline.png"]


@pytest.mark.parametrize("method", ["int8", "int4-g32", "int4-g64", "int4-g128", "q8_0", "q4_0", "mxfp4"])
def test_weight_bytes_equal_what_moekit_quantize_stores(method):
    """The analyzer's bytes for a format equal the bytes moekit.quantize really allocates (padding included)."""
    from moekit.quantize import quantize_model, size_report

    cfg = ModelConfig.preset("tiny", d_ff=96)
    model = quantize_model(Transformer(cfg), method)
    wb = analyze(from_model_config(cfg), weights=method)["weight_bytes_by_component"]
    predicted = sum(wb[c] for c in ("attention", "dense_ffn", "experts", "shared_experts"))
    assert predicted == size_report(model)["quantized_bytes"]
