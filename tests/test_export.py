"""A trained moekit model out to HF transformers: the trainable presets export (tiny as qwen3_moe,
small as glm4_moe with its router bias), `export_problems` answers before training, `moekit convert`
reads a training run, and the exported tokenizer and token ids behave the same in transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moekit import ModelConfig, MoEConfig, Transformer  # noqa: E402
from moekit.checkpoint import save_model  # noqa: E402
from moekit.hf import cli, export_problems, infer_model_type, load_hf, save_hf  # noqa: E402
from moekit.moe import update_expert_biases  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
ATOL = 1e-5
TEXTS = [
    "def f(x):\n    if x:\n        return  x + 1\n\n\n    return None\n",
    "\tindented\twith tabs\n\t\tand more\n",
    "two  spaces,   three,    four\n\n\nblank lines above",
    "unicode: héllo wörld — naïve café ✓ 日本語 🙂",
    "   leading and trailing   ",
]


def _small_cfg(**moe) -> ModelConfig:
    """The small preset (sigmoid router with expert_bias, shared expert, first layer dense, per-head
    q/k norm, GQA) at test size."""
    moe = dict(d_model=64, d_expert=16, num_experts=8, top_k=3, num_shared_experts=1, router="sigmoid_topk",
               bias_update_speed=0.001, seq_aux_loss_coef=1e-4, **moe)
    return ModelConfig.preset("small", vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                              max_seq_len=64, moe=moe)


def _tiny_cfg() -> ModelConfig:
    return ModelConfig.preset("tiny", vocab_size=97, max_seq_len=64)


@torch.no_grad()
def _randomize(model: Transformer, seed: int = 0) -> Transformer:
    """Random norms, decisive routers and a non-zero router bias (the buffer training moves)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("router.weight"):
            p.copy_(torch.randn(p.shape, generator=g))
    if model.cfg.moe.router == "sigmoid_topk":
        for block in model.layers:
            if block.is_moe:
                block.ffn.router.expert_bias.copy_(0.3 * torch.randn(model.cfg.moe.num_experts, generator=g))
    return model.eval()


def _hf_model(path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, attn_implementation="eager", experts_implementation="eager")
    assert not {k: v for k, v in info.items() if v}, info
    return model.eval()


def _diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------ presets export
def test_small_preset_with_router_bias_exports_as_glm4_moe(tmp_path):
    cfg = _small_cfg(num_groups=4, topk_groups=2, routed_scaling_factor=2.5)
    torch.manual_seed(0)
    model = _randomize(Transformer(cfg))
    assert infer_model_type(cfg) == "glm4_moe" and export_problems(cfg) == []
    ids = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids)
        unbiased = Transformer(cfg).eval()
        unbiased.load_state_dict(model.state_dict())
        for block in unbiased.layers:
            if block.is_moe:
                block.ffn.router.expert_bias.zero_()
        assert _diff(unbiased(ids), ref) > 1e-3  # the bias changes the routing: it must travel
    for layout in ("per_expert", "fused"):
        out = save_hf(model, tmp_path / layout, layout=layout)
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == "glm4_moe" and config["partial_rotary_factor"] == 1.0
        hf = _hf_model(out)
        assert type(hf).__name__ == "Glm4MoeForCausalLM"
        bias = hf.model.layers[1].mlp.gate.e_score_correction_bias
        assert torch.equal(bias, model.layers[1].ffn.router.expert_bias)
        with torch.no_grad():
            assert _diff(hf(ids).logits, ref) <= ATOL
            back = load_hf(out)
            assert torch.equal(back(ids), ref)
        assert {k: v for k, v in back.state_dict().items()}.keys() == model.state_dict().keys()
        for name, value in model.state_dict().items():
            if "tokens_since_update" not in name:
                assert torch.equal(back.state_dict()[name], value), name


def test_tiny_preset_trains_no_router_bias_and_exports_as_qwen3_moe(tmp_path):
    """aux-loss-free balancing is opt-in: a few tiny training steps leave expert_bias zero."""
    assert MoEConfig().bias_update_speed == 0.0 and ModelConfig.preset("tiny").moe.bias_update_speed == 0.0
    for name in ("small", "deepseek-v3"):  # the presets that use it say so
        assert ModelConfig.preset(name).moe.bias_update_speed > 0
    cfg = _tiny_cfg()
    model = Transformer(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    for _ in range(3):
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_expert_biases(model)
    model.eval()
    assert export_problems(cfg) == []
    out = save_hf(model, tmp_path)
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
    with torch.no_grad():
        assert _diff(_hf_model(out)(ids).logits, model(ids)) <= ATOL


def test_export_problems_before_training():
    assert export_problems(_tiny_cfg()) == [] and export_problems(_small_cfg()) == []
    hashed = ModelConfig.preset("tiny", moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2, router="hash",
                                                 hash_vocab_size=512))
    problems = export_problems(hashed)
    assert problems and all(p.startswith("qwen3_moe: ") for p in problems) and "router='hash'" in problems[0]
    # a bias that training will make non-zero, with an architecture that has no place for it
    biased = ModelConfig.preset("tiny", moe=dict(d_model=64, d_expert=32, num_experts=8, top_k=2,
                                                 bias_update_speed=0.001))
    assert any("bias_update_speed=0.001" in p and "glm4_moe can, with router=sigmoid_topk" in p
               for p in export_problems(biased))
    assert any("router='sigmoid_topk'" in p for p in export_problems(_small_cfg(), model_type="qwen3_moe"))
    assert "unsupported model_type 'llama'" in export_problems(_tiny_cfg(), model_type="llama")[0]
    glm = export_problems(_small_cfg(), model_type="glm4_moe")
    assert glm == []
    assert export_problems(ModelConfig.preset("small", dense_layers=(2,)), "glm4_moe") == [
        "glm4_moe: dense layers [0, 2] (glm4_moe has dense layers only first: first_k_dense_replace)"]


# ------------------------------------------------------------------ moekit convert of a training run
def test_cli_convert_reads_a_training_run(tmp_path, capsys):
    cfg = _small_cfg()
    model = _randomize(Transformer(cfg), seed=2)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"max_steps": 10, "lr": 1e-3}, "model": cfg.to_dict()}))
    save_model(model, run / "checkpoint")
    out = tmp_path / "hf"
    result = subprocess.run([sys.executable, "-m", "moekit.cli", "convert", str(run), str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "glm4_moe" in result.stderr
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert _diff(_hf_model(out)(ids).logits, model(ids)) <= ATOL
    # an unexportable choice is refused in one line, before anything is written
    capsys.readouterr()
    assert cli([str(run), str(tmp_path / "x"), "--model-type", "qwen3_moe"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit convert: error: cannot save this model as qwen3_moe: router='sigmoid_topk'")
    assert not (tmp_path / "x").exists()
    assert cli([str(tmp_path), str(tmp_path / "y")]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert cli([str(run), str(run / "checkpoint")]) == 2  # would overwrite the run's own weights
    assert "DST must differ" in capsys.readouterr().err


def test_cli_convert_help_documents_every_option(capsys):
    result = subprocess.run([sys.executable, "-m", "moekit.cli", "convert", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option, phrase in (("src", "training run directory"), ("dst", "output directory"),
                           ("--dtype", "dtype of the written weights"), ("--model-type", "architecture to write"),
                           ("--layout", "expert tensors"), ("--max-shard-gb", "split the weights")):
        assert option in text and phrase in text, option
    assert cli(["a", "b", "--dty", "float32"]) == 2  # no abbreviations
    assert "unrecognized arguments: --dty" in capsys.readouterr().err


# ------------------------------------------------------------------ tokenizer and token ids
@pytest.fixture(scope="module")
def tokenizer():
    from moekit.data import train_tokenizer

    docs = [t * 3 for t in TEXTS] * 20 + ["The quick brown fox jumps over the lazy dog. " * 4] * 20
    return train_tokenizer(docs, 320, progress=False)


def test_exported_tokenizer_gives_moekit_ids(tmp_path, tokenizer):
    from moekit.data import EOT

    cfg = _tiny_cfg().replace(vocab_size=tokenizer.get_vocab_size())
    model = Transformer(cfg).eval()
    model.tokenizer = tokenizer
    out = save_hf(model, tmp_path)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = tokenizer.encode(text).ids
        assert hf_tok(text)["input_ids"] == ids, text
        assert hf_tok.decode(ids) == text == tokenizer.decode(ids)
    eot = tokenizer.token_to_id(EOT)
    assert (hf_tok.eos_token, hf_tok.eos_token_id, hf_tok.bos_token_id) == (EOT, eot, eot)
    assert hf_tok.model_max_length == cfg.max_seq_len
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == generation["eos_token_id"] == eot


def test_hf_generate_stops_at_end_of_text(tmp_path, tokenizer):
    """Greedy HF generate on the export stops when it produces moekit's end-of-text token."""
    from moekit.tokens import end_of_text_id

    eot = end_of_text_id(tokenizer)
    cfg = _tiny_cfg().replace(vocab_size=tokenizer.get_vocab_size())
    model = _randomize(Transformer(cfg), seed=3)
    prompt = torch.tensor([tokenizer.encode("def f(x):\n").ids])
    with torch.no_grad():  # no tokenizer, no eos: the greedy continuation; then make eos win at its 3rd step
        model.lm_head.weight[eot] = 0  # logit 0: below the winner's
        free = _hf_model(save_hf(model, tmp_path / "free")).generate(prompt, max_new_tokens=6, do_sample=False)
        free = free[0, prompt.shape[1]:]
        assert len(free) == 6 and eot not in free[:3].tolist()
        model.lm_head.weight[eot] = 2 * model.lm_head.weight[free[2]]
    model.tokenizer = tokenizer
    out = save_hf(model, tmp_path / "stop")
    hf = _hf_model(out)
    assert hf.generation_config.eos_token_id == eot
    with torch.no_grad():
        new = hf.generate(prompt, max_new_tokens=6, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert new[-1] == eot and len(new) <= 3 and new[:-1] == free[:len(new) - 1].tolist()
