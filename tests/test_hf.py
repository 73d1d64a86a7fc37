"""HF checkpoint import/export (moekit.hf) against transformers itself.

Tiny random transformers models of each supported architecture are saved with
`save_pretrained`, loaded with `load_hf`, and must give the same float32 logits; `save_hf`
output must load back in transformers with the same logits, in both expert layouts.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from moekit import ModelConfig, MoEConfig, Transformer  # noqa: E402
from moekit.hf import cli, config_from_hf, infer_model_type, load_hf, save_hf  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
ATOL = 1e-4
VOCAB = 61
COMMON = dict(vocab_size=VOCAB, hidden_size=40, intermediate_size=28, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)

# name -> (model_type, config overrides, the model_type save_hf infers back)
CASES = {
    "qwen3_moe": ("qwen3_moe", dict(num_experts=6, moe_intermediate_size=10, head_dim=12, norm_topk_prob=True), "qwen3_moe"),
    "qwen3_moe-sparse-tied": ("qwen3_moe", dict(num_hidden_layers=5, num_experts=5, moe_intermediate_size=14, head_dim=6,
                                                norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[3],
                                                tie_word_embeddings=True), "qwen3_moe"),
    "qwen3_moe-yarn": ("qwen3_moe", dict(num_experts=4, moe_intermediate_size=10, head_dim=10, norm_topk_prob=True,
                                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                          "original_max_position_embeddings": 16}), "qwen3_moe"),
    "mixtral": ("mixtral", dict(num_local_experts=5, head_dim=14), "mixtral"),
    "mixtral-llama3": ("mixtral", dict(num_local_experts=4, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 1e6}), "mixtral"),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=6, moe_intermediate_size=10, shared_expert_intermediate_size=22,
                                    norm_topk_prob=False, mlp_only_layers=[0]), "qwen2_moe"),
    "qwen2_moe-noshared": ("qwen2_moe", dict(num_experts=4, moe_intermediate_size=10, shared_expert_intermediate_size=0,
                                             norm_topk_prob=True), "qwen2_moe"),
    "olmoe": ("olmoe", dict(num_experts=6, norm_topk_prob=False, clip_qkv=0.8), "olmoe"),
    "olmoe-norm-linear": ("olmoe", dict(num_experts=5, norm_topk_prob=True, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}), "olmoe"),
    "glm4_moe": ("glm4_moe", dict(n_routed_experts=6, moe_intermediate_size=10, head_dim=12, n_shared_experts=2,
                                  first_k_dense_replace=1, use_qk_norm=True, attention_bias=True, n_group=2,
                                  topk_group=1, routed_scaling_factor=1.5, norm_topk_prob=True,
                                  partial_rotary_factor=1.0), "glm4_moe"),
    "glm4_moe-noshared-yarn": ("glm4_moe", dict(n_routed_experts=4, moe_intermediate_size=10, n_shared_experts=0,
                                                first_k_dense_replace=0, norm_topk_prob=False, rope_parameters={
                                                    "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 16,
                                                    "partial_rotary_factor": 1.0}), "glm4_moe"),
}


def _hf_kwargs():
    return dict(attn_implementation="eager", experts_implementation="eager")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere, including the zero-initialised router and biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * noise)
        elif name.endswith(("mlp.gate.weight", "router.weight")):
            p.copy_(noise)  # decisive routing: no near-ties between HF and moekit
        elif p.dim() >= 2 and p.numel():
            p.copy_(noise * p.shape[-1] ** -0.5)
        else:
            p.copy_(0.1 * noise)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # glm4_moe's router bias (zero when initialised)
            b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _build_hf(name: str):
    model_type, overrides, _ = CASES[name]
    cfg = transformers.AutoConfig.for_model(model_type, **{**COMMON, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, **_hf_kwargs()).eval()
    _randomize(model)
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture(scope="module")
def hf_case(tmp_path_factory):
    """name -> (path of the save_pretrained checkpoint, token ids, transformers' logits)."""
    cache = {}

    def get(name):
        if name not in cache:
            model = _build_hf(name)
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                cache[name] = (path, ids, model(ids).logits, model)
        return cache[name]

    return get


def _hf_logits(path, ids):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **_hf_kwargs())
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    with torch.no_grad():
        return model.eval()(ids).logits


def _keys(path):
    from safetensors import safe_open

    keys = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


# ------------------------------------------------------------------ load and round trip
@pytest.mark.parametrize("name", list(CASES))
def test_load_matches_transformers(hf_case, name):
    path, ids, ref, _ = hf_case(name)
    model = load_hf(path)
    assert model.cfg.dtype == "float32" and not model.training
    with torch.no_grad():
        assert _max_diff(model(ids), ref) <= ATOL


def test_load_maps_config_fields(hf_case):
    cfg = load_hf(hf_case("qwen3_moe-sparse-tied")[0]).cfg
    assert (cfg.sparse_step, cfg.dense_layers, cfg.tie_embeddings, cfg.head_dim, cfg.qk_norm) == (2, (3,), True, 6, "head")
    assert [cfg.is_dense_layer(i) for i in range(5)] == [True, False, True, True, True]
    assert cfg.moe.norm_topk_prob is False and cfg.moe.num_experts == 5 and cfg.moe.d_expert == 14
    cfg = load_hf(hf_case("qwen2_moe")[0]).cfg
    assert (cfg.attention_bias, cfg.moe.num_shared_experts, cfg.moe.d_shared, cfg.moe.shared_gate) == (True, 1, 22, True)
    cfg = load_hf(hf_case("olmoe")[0]).cfg
    assert (cfg.qk_norm, cfg.clip_qkv, cfg.moe.aux_loss_coef) == ("full", 0.8, 0.01)
    cfg = load_hf(hf_case("qwen3_moe-yarn")[0]).cfg
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 4.0


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
@pytest.mark.parametrize("name", list(CASES))
def test_save_round_trip(hf_case, tmp_path, name, layout):
    path, ids, ref, _ = hf_case(name)
    model = load_hf(path)
    out = save_hf(model, tmp_path / "out", layout=layout)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == CASES[name][2]
    keys = _keys(out)
    if layout == "fused":
        assert any(k.endswith("experts.gate_up_proj") for k in keys)
    else:
        assert not any("gate_up_proj" in k for k in keys) and any(".experts.0." in k for k in keys)
    assert _max_diff(_hf_logits(out, ids), ref) <= ATOL
    with torch.no_grad():
        assert _max_diff(load_hf(out)(ids), ref) <= ATOL


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "qwen2_moe", "olmoe", "glm4_moe"])
def test_load_fused_state_dict_of_transformers(hf_case, tmp_path, name):
    """transformers 5 keeps experts fused in memory; a checkpoint of that state dict loads too."""
    path, ids, ref, hf_model = hf_case(name)
    state = {k: v.detach().clone().contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    shutil.copy(path / "config.json", tmp_path / "config.json")
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        assert _max_diff(load_hf(tmp_path)(ids), ref) <= ATOL


def test_sharded_checkpoints(hf_case, tmp_path):
    path, ids, ref, hf_model = hf_case("qwen2_moe")
    model = load_hf(path)
    out = save_hf(model, tmp_path / "ours", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    with torch.no_grad():
        assert _max_diff(load_hf(out)(ids), ref) <= ATOL
    assert _max_diff(_hf_logits(out, ids), ref) <= ATOL
    # re-saving unsharded into the same directory removes the old shards
    save_hf(model, out)
    assert (out / "model.safetensors").exists() and not list(out.glob("model-*-of-*")) and not (out / "model.safetensors.index.json").exists()
    # transformers' own sharding
    hf_model.save_pretrained(tmp_path / "theirs", max_shard_size="30KB")
    assert (tmp_path / "theirs" / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert _max_diff(load_hf(tmp_path / "theirs")(ids), ref) <= ATOL


def test_dtype_and_device_arguments(hf_case, tmp_path):
    path, ids, ref, _ = hf_case("mixtral")
    model = load_hf(path, dtype="bfloat16")
    assert model.cfg.dtype == "bfloat16" and all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = save_hf(model, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with torch.no_grad():
        assert _max_diff(load_hf(out, dtype=torch.float32)(ids), ref) < 0.5  # bf16 weights, fp32 compute


# ------------------------------------------------------------------ native moekit models -> HF
@pytest.mark.parametrize("model_type,cfg", [
    ("qwen3_moe", ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=40,
                              qk_norm="head", first_k_dense=1, tie_embeddings=True,
                              moe=MoEConfig(d_model=32, d_expert=12, num_experts=6, top_k=3, norm_topk_prob=False))),
    ("mixtral", ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=12,
                            moe=MoEConfig(d_model=32, d_expert=12, num_experts=4, top_k=2, router="topk_softmax"))),
    ("qwen2_moe", ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, attention_bias=True, d_ff=20,
                              rope_scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32},
                              moe=MoEConfig(d_model=32, d_expert=12, num_experts=4, top_k=2, num_shared_experts=2,
                                            shared_gate=True))),
])
def test_native_model_saves_for_transformers(tmp_path, model_type, cfg):
    model = Transformer(cfg).eval()
    _randomize(model)
    assert infer_model_type(cfg) == model_type
    out = save_hf(model, tmp_path)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert _max_diff(_hf_logits(out, ids), model(ids)) <= ATOL


# ------------------------------------------------------------------ errors
def _tiny_model(**overrides) -> Transformer:
    moe = dict(d_model=32, d_expert=8, num_experts=4, top_k=2)
    moe.update(overrides.pop("moe", {}))
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ff=16, moe=MoEConfig(**moe), **overrides)
    return Transformer(cfg)


@pytest.mark.parametrize("model_type,model_kwargs,match", [
    ("qwen3_moe", dict(qk_norm="head", moe=dict(router="sigmoid_topk")), "router='sigmoid_topk'"),
    (None, dict(moe=dict(router="hash", hash_vocab_size=VOCAB)), "router='hash'"),
    ("mixtral", dict(moe=dict(norm_topk_prob=False)), "norm_topk_prob=False"),
    ("olmoe", dict(qk_norm="full", first_k_dense=1), r"dense layers \[0\]"),
    ("mixtral", dict(moe=dict(num_shared_experts=1, shared_gate=True)), "shared experts"),
    ("qwen2_moe", dict(moe=dict(num_shared_experts=1)), "shared_gate=False .qwen2_moe always gates"),
    ("glm4_moe", dict(moe=dict(router="sigmoid_topk", num_shared_experts=1, shared_gate=True)),
     "shared_gate=True .glm4_moe never gates"),
    ("glm4_moe", dict(), "router='softmax_topk' .glm4_moe routes with sigmoid scores"),
    ("glm4_moe", dict(dense_layers=(1,), moe=dict(router="sigmoid_topk")),
     r"dense layers \[1\] .glm4_moe has dense layers only first"),
    ("glm4_moe", dict(moe=dict(router="sigmoid_topk", num_shared_experts=1, d_shared=12)), "d_shared=12"),
    ("glm4_moe", dict(qk_norm="full", moe=dict(router="sigmoid_topk")), "qk_norm='full'"),
    ("qwen3_moe", dict(qk_norm=None), "qk_norm=None"),
    ("mixtral", dict(attention_bias=True), "attention_bias"),
    ("mixtral", dict(moe=dict(routed_scaling_factor=2.0)), "routed_scaling_factor"),
    ("llama", dict(), "unsupported model_type 'llama'"),
])
def test_save_refuses_unrepresentable_models(tmp_path, model_type, model_kwargs, match):
    model = _tiny_model(**model_kwargs)
    with pytest.raises(ValueError, match=match):
        save_hf(model, tmp_path, model_type=model_type)
    assert not (tmp_path / "config.json").exists()


def test_save_refuses_expert_bias(tmp_path):
    model = _tiny_model()
    with torch.no_grad():
        model.layers[1].ffn.router.expert_bias[2] = 0.5
    with pytest.raises(ValueError, match=r"expert_bias.*\[1\]; glm4_moe / deepseek_v3 / kimi_k2 / minimax_m2 stores it"):
        save_hf(model, tmp_path)


def _rewrite(src, dst, edit):
    """Copy checkpoint src to dst with its tensors passed through edit(dict)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = safetensors_torch.load_file(str(src / "model.safetensors"))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_unsupported_model_type(hf_case, tmp_path):
    config = json.loads((hf_case("mixtral")[0] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'llama'.*qwen3_moe.*mixtral.*qwen2_moe.*olmoe"):
        load_hf(tmp_path)


def test_missing_files(hf_case, tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_hf(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_hf(tmp_path)
    shutil.copy(hf_case("mixtral")[0] / "config.json", tmp_path / "config.json")
    with pytest.raises(ValueError, match="no weights"):
        load_hf(tmp_path)


def test_missing_tensor_is_named(hf_case, tmp_path):
    src = hf_case("qwen2_moe")[0]
    key = "model.layers.1.self_attn.q_proj.weight"
    with pytest.raises(ValueError, match=f"missing tensors.*'{key}'"):
        load_hf(_rewrite(src, tmp_path / "a", lambda t: t.pop(key)))
    expert_key = "model.layers.2.mlp.experts.3.up_proj.weight"
    with pytest.raises(ValueError, match=f"missing tensors in the checkpoint: '{expert_key}'$"):
        load_hf(_rewrite(src, tmp_path / "b", lambda t: t.pop(expert_key)))
    router_key = "model.layers.1.mlp.gate.weight"
    with pytest.raises(ValueError, match=f"missing tensors.*'{router_key}'"):
        load_hf(_rewrite(src, tmp_path / "c", lambda t: t.pop(router_key)))


def test_wrong_shape_names_key_and_shapes(hf_case, tmp_path):
    src = hf_case("qwen3_moe")[0]
    key = "model.layers.0.mlp.experts.2.down_proj.weight"

    def edit(tensors):
        tensors[key] = torch.zeros(40, 11)

    with pytest.raises(ValueError, match=rf"'{key}' has shape \(40, 11\), expected \(40, 10\)"):
        load_hf(_rewrite(src, tmp_path / "a", edit))


def test_unexpected_tensor_is_named(hf_case, tmp_path):
    src = hf_case("olmoe")[0]

    def edit(tensors):
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(3)

    with pytest.raises(ValueError, match=r"unexpected tensors.*'model\.layers\.0\.mlp\.extra\.weight'"):
        load_hf(_rewrite(src, tmp_path / "a", edit))


def test_tied_checkpoint_with_lm_head(hf_case, tmp_path):
    path, ids, ref, _ = hf_case("qwen3_moe-sparse-tied")

    def same(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()

    def different(tensors):
        tensors["lm_head.weight"] = torch.zeros_like(tensors["model.embed_tokens.weight"])

    model = load_hf(_rewrite(path, tmp_path / "a", same))
    assert model.lm_head.weight is model.embed.weight
    with torch.no_grad():
        assert _max_diff(model(ids), ref) <= ATOL
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        load_hf(_rewrite(path, tmp_path / "b", different))


def test_both_layouts_for_one_tensor_is_an_error(hf_case, tmp_path):
    path, _, _, hf_model = hf_case("qwen3_moe")
    fused = hf_model.state_dict()["model.layers.0.mlp.experts.down_proj"].clone()

    def edit(tensors):
        tensors["model.layers.0.mlp.experts.down_proj"] = fused

    with pytest.raises(ValueError, match="only one of them"):
        load_hf(_rewrite(path, tmp_path / "a", edit))


def test_unsupported_config_values(hf_case, tmp_path):
    config = json.loads((hf_case("qwen3_moe")[0] / "config.json").read_text())
    with pytest.raises(ValueError, match="o_proj has no bias"):
        config_from_hf({**config, "attention_bias": True})
    with pytest.raises(ValueError, match="rope type 'longrope'"):
        config_from_hf({**config, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        config_from_hf({**config, "hidden_act": "gelu"})
    # older config style: rope_theta + rope_scaling at the top level
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}
    cfg = config_from_hf({**legacy, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 3.0}})
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"type": "linear", "factor": 3.0}
    # a sliding window is exact up to its length: max_seq_len is capped there
    cfg = config_from_hf({**config, "use_sliding_window": True, "sliding_window": 48})
    assert cfg.max_seq_len == 48 and "sliding window" in cfg.notes


# ------------------------------------------------------------------ tokenizer and CLI
def _write_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "hello", "world", "moe"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


def test_tokenizer_is_attached_and_saved(hf_case, tmp_path):
    pytest.importorskip("tokenizers")
    src = tmp_path / "src"
    shutil.copytree(hf_case("mixtral")[0], src)
    assert load_hf(src).tokenizer is None
    _write_tokenizer(src)
    model = load_hf(src)
    assert model.tokenizer.encode("hello moe").ids == [1, 3]
    out = save_hf(model, tmp_path / "out")
    assert load_hf(out).tokenizer.encode("world").ids == [2]


def test_cli_convert(hf_case, tmp_path, capsys):
    path, ids, ref, _ = hf_case("qwen2_moe")
    src = tmp_path / "src"
    shutil.copytree(path, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "eos_token_id": 7}))
    dst = tmp_path / "dst"
    assert cli([str(src), str(dst), "--layout", "fused", "--dtype", "bfloat16"]) == 0
    assert json.loads((dst / "config.json").read_text())["eos_token_id"] == 7
    assert (dst / "generation_config.json").exists()
    assert any(k.endswith("gate_up_proj") for k in _keys(dst))
    model = load_hf(dst)
    assert model.cfg.dtype == "bfloat16"
    assert cli([str(dst), str(tmp_path / "back"), "--dtype", "float32"]) == 0
    with torch.no_grad():
        assert _max_diff(load_hf(tmp_path / "back")(ids), ref) < 0.5
    capsys.readouterr()

    assert cli([str(tmp_path / "missing"), str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "moekit convert: error:" in err and "not a directory" in err and "Traceback" not in err
    assert cli([str(src), str(src)]) == 2
    assert "DST must differ from SRC" in capsys.readouterr().err
    assert cli([str(src), str(tmp_path / "olmoe"), "--model-type", "olmoe"]) == 2
    err = capsys.readouterr().err
    assert "cannot save this model as olmoe" in err and "loading tensors" not in err  # checked before loading
    assert cli([str(src), str(dst), "--layout", "diagonal"]) == 2
    assert cli(["--help"]) == 0


# ------------------------------------------------------------------ real model shapes
PUBLISHED = {  # config.json values of the released checkpoints
    "qwen3-30b-a3b": {
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "attention_bias": False, "router_aux_loss_coef": 0.001,
        "use_sliding_window": False, "torch_dtype": "bfloat16",
    },
    "mixtral-8x7b": {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
        "num_experts_per_tok": 2, "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05,
        "sliding_window": None, "tie_word_embeddings": False, "router_aux_loss_coef": 0.02, "torch_dtype": "bfloat16",
    },
    "olmoe-1b-7b": {
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "norm_topk_prob": False, "max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-05, "clip_qkv": None, "attention_bias": False, "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.01, "torch_dtype": "bfloat16",
    },
    "qwen2-57b-a14b": {
        "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 3584, "intermediate_size": 18944,
        "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 8,
        "norm_topk_prob": False, "decoder_sparse_step": 1, "max_position_embeddings": 131072,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "use_sliding_window": False,
        "sliding_window": 131072, "max_window_layers": 28, "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16",
    },
}
# fields compared between config_from_hf(published) and the preset
_MODEL_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "qk_norm", "attention_bias",
                 "clip_qkv", "rope_theta", "rope_scaling", "norm_eps", "tie_embeddings", "is_dense", "dtype")
_MOE_FIELDS = ("d_expert", "num_experts", "top_k", "router", "norm_topk_prob", "num_shared_experts", "shared_dim",
               "shared_gate", "aux_loss_coef")


def _fields(cfg: ModelConfig, preset: str) -> dict:
    out = {f: getattr(cfg, f) for f in _MODEL_FIELDS if f != "is_dense"}
    out["is_dense"] = [cfg.is_dense_layer(i) for i in range(cfg.n_layers)]
    out.update({f"moe.{f}": getattr(cfg.moe, f) for f in _MOE_FIELDS})
    out["max_seq_len"] = cfg.max_seq_len
    return out


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_real_model_parameter_counts_match_transformers(preset):
    published = dict(PUBLISHED[preset])
    model_type = published.pop("model_type")
    hf_config = transformers.AutoConfig.for_model(model_type, **published)
    with torch.device("meta"):
        hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
        ours = Transformer(ModelConfig.preset(preset))
    assert ours.num_params() == sum(p.numel() for p in hf_model.parameters())
    assert _fields(config_from_hf(PUBLISHED[preset]), preset) == _fields(ModelConfig.preset(preset), preset)


GLM_45_AIR = {  # GLM-4.5-Air's config.json (transformers' Glm4MoeConfig defaults are this model)
    "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944,
    "moe_intermediate_size": 1408, "num_hidden_layers": 46, "num_attention_heads": 96, "num_key_value_heads": 8,
    "head_dim": 128, "n_routed_experts": 128, "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1,
    "topk_group": 1, "routed_scaling_factor": 1.0, "norm_topk_prob": True, "first_k_dense_replace": 1,
    "attention_bias": True, "use_qk_norm": False, "partial_rotary_factor": 0.5, "rope_theta": 1000000,
    "rope_scaling": None, "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_glm45_config_reading():
    """A real GLM-4.5 config: RoPE on half of each head (also when config.json leaves
    partial_rotary_factor at transformers' default 0.5); the analyzer reads it; moekit builds it
    with transformers' parameter count."""
    from moekit.analyze import analyze, from_hf_config

    assert config_from_hf(GLM_45_AIR).rotary_dim == 64
    unset = {k: v for k, v in GLM_45_AIR.items() if k != "partial_rotary_factor"}
    assert config_from_hf(unset).rotary_dim == 64
    whole = {**GLM_45_AIR, "partial_rotary_factor": 1.0}
    cfg = config_from_hf(whole)
    assert (cfg.attention_bias, cfg.qk_norm, cfg.moe.router, cfg.moe.num_shared_experts, cfg.moe.shared_dim) == (
        True, None, "sigmoid_topk", 1, 1408)
    assert [cfg.is_dense_layer(i) for i in range(3)] == [True, False, False]
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in whole.items()})
    with torch.device("meta"):
        hf_params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_config(hf_config).parameters())
        assert Transformer(cfg).num_params() == hf_params
    assert analyze(from_hf_config(GLM_45_AIR))["params_total"] == hf_params


def test_analyzer_reads_transformers5_qwen3_and_kimi_k2_configs(tmp_path):
    """`moekit analyze DIR` on a config.json transformers 5 wrote (num_local_experts, rope_parameters);
    kimi_k2 configs have DeepSeek-V3's layout."""
    import subprocess
    import sys

    from moekit.analyze import analyze, from_hf_config
    from moekit.analyze.catalog import HF_CONFIGS

    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=8,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=6,
                 num_experts_per_tok=2)
    transformers.Qwen3MoeConfig(**small).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["num_local_experts"] == 6 and "num_experts" not in written
    with torch.device("meta"):
        hf_params = sum(p.numel() for p in transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**small))
                        .parameters())
    result = subprocess.run([sys.executable, "-m", "moekit.cli", "analyze", str(tmp_path), "--json"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["params_total"] == hf_params
    deepseek = HF_CONFIGS["deepseek-v3"]
    kimi = analyze(from_hf_config({**deepseek, "model_type": "kimi_k2"}))
    assert kimi["params_total"] == analyze(from_hf_config(deepseek))["params_total"]


# ------------------------------------------------------------------ the architecture registry
@pytest.fixture
def toy_spec():
    """A made-up architecture registered for one test: qwen3_moe's config with its own
    model_type and tensor names (Mixtral-style expert names under a "moe." block)."""
    from moekit.hf import SPECS, register
    from moekit.hf.qwen3_moe import Qwen3MoeSpec

    class ToyMoeSpec(Qwen3MoeSpec):
        model_type = "toy_moe"
        architecture = "ToyMoeForCausalLM"
        infer_rank = None  # written only when asked for
        expert_names = ("w1", "w3", "w2")

        def moe_module(self, layout):
            return "moe."

    spec = register(ToyMoeSpec())
    yield spec
    SPECS.pop(spec.model_type)


def test_registered_spec_is_used_by_load_save_convert_and_analyze(toy_spec, tmp_path):
    from moekit.analyze import analyze, from_hf_config

    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=24,
                      qk_norm="head", first_k_dense=1, moe=MoEConfig(d_model=32, d_expert=8, num_experts=4, top_k=2))
    model = Transformer(cfg).eval()
    _randomize(model)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    assert infer_model_type(cfg) == "qwen3_moe"  # infer_rank None: never chosen unasked
    for layout in ("per_expert", "fused"):
        out = save_hf(model, tmp_path / layout, model_type="toy_moe", layout=layout)
        config = json.loads((out / "config.json").read_text())
        assert (config["model_type"], config["architectures"]) == ("toy_moe", ["ToyMoeForCausalLM"])
        keys = _keys(out)
        assert "model.layers.1.moe.gate.weight" in keys and not any(".mlp.experts" in k for k in keys)
        if layout == "per_expert":
            assert "model.layers.1.moe.experts.3.w3.weight" in keys
        loaded = load_hf(out)
        assert loaded.cfg.name == "toy_moe" and [loaded.cfg.is_dense_layer(i) for i in range(2)] == [True, False]
        with torch.no_grad():
            assert _max_diff(loaded(ids), ref) <= ATOL
        assert analyze(from_hf_config(config))["params_total"] == model.num_params()
    # the convert CLI offers it and converts to and from it
    assert cli([str(tmp_path / "per_expert"), str(tmp_path / "qwen"), "--model-type", "qwen3_moe"]) == 0
    assert cli([str(tmp_path / "qwen"), str(tmp_path / "toy"), "--model-type", "toy_moe", "--layout", "fused"]) == 0
    with torch.no_grad():
        assert _max_diff(load_hf(tmp_path / "toy")(ids), ref) <= ATOL
    # what it cannot hold is refused in its own terms
    with pytest.raises(ValueError, match="cannot save this model as toy_moe: .*qk_norm=None"):
        save_hf(_tiny_model(), tmp_path / "bad", model_type="toy_moe")


def test_unregistered_types_list_the_registry(toy_spec, tmp_path):
    with pytest.raises(ValueError, match=r"unsupported model_type 'nope'; moekit reads and writes .*olmoe, glm4_moe, deepseek_v3, kimi_k2, minimax_m2, gpt_oss, .*toy_moe$"):
        save_hf(_tiny_model(), tmp_path, model_type="nope")
    with pytest.raises(ValueError, match=r"unsupported model_type 'gpt2'"):  # analysis only
        config_from_hf({"model_type": "gpt2"})


def test_no_model_type_comparisons_outside_spec_files():
    """Architecture facts live in the spec files: generic code looks specs up, never compares names."""
    import re
    import sys
    from pathlib import Path

    import moekit
    from moekit.hf import SPECS

    src = Path(moekit.__file__).parent
    spec_files = {Path(sys.modules[type(s).__module__].__file__) for s in SPECS.values()} | {src / "hf" / "spec.py"}
    names = "|".join(SPECS)
    pattern = re.compile(rf"\b(model_type|mt)\s*(==|!=)|\b(model_type|mt)\s+(not\s+)?in\s*[(\[{{]"
                         rf"|(==|!=)\s*[\"']({names})[\"']")
    offenders = [f"{path.relative_to(src)}:{n}: {line.strip()}"
                 for path in sorted(src.rglob("*.py")) if path not in spec_files
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
    assert not (src / "hf.py").exists()
