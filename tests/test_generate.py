"""Generation (KV cache, left padding, sampling, stopping), the moekit checkpoint format, `moekit generate`."""

import json

import pytest
import torch

from moekit import ModelConfig, Transformer, load_model, save_model
from moekit import generate as gen_mod
from moekit.generate import generate
from moekit.sampling import apply_repetition_penalty, top_k_filter, top_p_filter

PROMPTS = [[5, 17, 300, 42, 7, 99, 1], [8, 3], [250, 251, 252, 253], [11]]


def tiny_model(**overrides) -> Transformer:
    """Tiny random model whose logits are well separated (no near-ties for argmax to flip on)."""
    torch.manual_seed(1234)
    model = Transformer(ModelConfig.preset("tiny", **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model.eval()


def naive_greedy(model, prompt, n):
    """Reference: rerun the full model on the growing sequence at every step, one prompt at a time."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits_V = model(torch.tensor([seq]))[0, -1]
            seq.append(int(logits_V.argmax()))
    return seq[len(prompt):]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---------------------------------------------------------------------------- greedy decoding
def test_cached_batched_greedy_equals_full_recomputation(model):
    out = generate(model, PROMPTS, max_new_tokens=12)
    assert out == [naive_greedy(model, p, 12) for p in PROMPTS]


def test_batched_equals_one_prompt_at_a_time(model):
    batched = generate(model, PROMPTS, max_new_tokens=10)
    assert batched == [generate(model, [p], max_new_tokens=10)[0] for p in PROMPTS]


def test_train_mode_is_restored_and_no_grad_state_leaks(model):
    model.train()
    generate(model, [[1, 2]], max_new_tokens=2)
    assert model.training
    model.eval()
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[]]


def test_max_length_error(model):
    assert generate(model, [[1] * 250], max_new_tokens=6) is not None  # exactly max_seq_len=256
    with pytest.raises(ValueError, match="max_seq_len=256"):
        generate(model, [[1] * 250, [2]], max_new_tokens=7)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(prompts=[[1, 512]]), "outside"),
    (dict(prompts=[[-1]]), "outside"),
    (dict(prompts=[[1.5]]), "non-integer"),
    (dict(prompts=[[1]], max_new_tokens=-1), "max_new_tokens"),
    (dict(prompts=[[1]], temperature=-0.1), "temperature"),
    (dict(prompts=[[1]], top_p=0.0), "top_p"),
    (dict(prompts=[[1]], top_p=1.5), "top_p"),
    (dict(prompts=[[1]], top_k=0), "top_k"),
    (dict(prompts=[[1]], repetition_penalty=0.0), "repetition_penalty"),
    (dict(prompts=[[1]], stop=[[]]), "stop entry"),
])
def test_input_validation(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate(model, **kwargs)


# ---------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed(model):
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=7)
    a, b = generate(model, PROMPTS, **kw), generate(model, PROMPTS, **kw)
    assert a == b
    c = generate(model, PROMPTS, **{**kw, "seed": 8})
    assert c != a  # 48 draws at temperature 1.5: another seed gives another sample


def test_top_k_1_equals_greedy(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=0.7, top_k=1, seed=3) == greedy


def test_min_p_1_equals_greedy_and_min_p_0_changes_nothing(model):
    greedy = generate(model, PROMPTS, max_new_tokens=8)
    assert generate(model, PROMPTS, max_new_tokens=8, temperature=2.0, min_p=1.0, seed=3) == greedy
    kw = dict(max_new_tokens=8, temperature=1.5, seed=5)
    assert generate(model, PROMPTS, min_p=0.0, **kw) == generate(model, PROMPTS, **kw)
    with pytest.raises(ValueError, match="min_p"):
        generate(model, PROMPTS, min_p=1.5)


def test_top_k_and_top_p_filters_by_hand():
    # probabilities of softmax(log p) are p: 0.5, 0.2, 0.15, 0.1, 0.05
    probs = torch.tensor([[0.1, 0.5, 0.05, 0.2, 0.15]])
    logits = probs.log()
    inf = float("-inf")
    assert torch.equal(top_k_filter(logits, 2).isinf(), torch.tensor([[True, False, True, False, True]]))
    assert torch.equal(top_k_filter(logits, 5), logits)
    # top-p keeps the smallest set of most likely tokens whose probability reaches p
    kept = lambda p: (~top_p_filter(logits, p).isinf()).nonzero()[:, 1].tolist()  # noqa: E731
    assert kept(0.6) == [1, 3]
    assert kept(0.5) == [1]  # the top token alone reaches 0.5
    assert kept(0.3) == [1]  # always at least one token
    assert kept(0.8) == [1, 3, 4]  # 0.5 + 0.2 = 0.7 < 0.8 -> add 0.15
    assert kept(1.0) == [0, 1, 2, 3, 4]
    filtered = top_p_filter(logits, 0.6)
    assert filtered[0, 1] == logits[0, 1] and filtered[0, 0] == inf
    # batched rows are filtered independently
    two = torch.cat([logits, logits.flip(-1)])
    assert (~top_p_filter(two, 0.6).isinf()).nonzero().tolist() == [[0, 1], [0, 3], [1, 1], [1, 3]]


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0]]


def test_repetition_penalty_changes_greedy_output(model):
    # a greedy continuation that repeats a token ...
    plain = generate(model, [[1, 2, 3]], max_new_tokens=8)[0]
    assert len(set(plain)) < len(plain)
    # ... repeats nothing under a huge penalty (every seen token's logit is pushed far down)
    penalised = generate(model, [[1, 2, 3]], max_new_tokens=8, repetition_penalty=1e6)[0]
    assert len(set(penalised)) == len(penalised) and not set(penalised) & {1, 2, 3}


def test_repetition_penalty_matches_a_naive_loop(model):
    prompt, penalty = [1, 2, 3], 1.7
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits_V = model(torch.tensor([seq]))[0, -1]
            seen = torch.zeros_like(logits_V, dtype=torch.bool)
            seen[torch.tensor(seq)] = True
            logits_V = torch.where(seen, torch.where(logits_V > 0, logits_V / penalty, logits_V * penalty), logits_V)
            seq.append(int(logits_V.argmax()))
    assert generate(model, [prompt], max_new_tokens=6, repetition_penalty=penalty)[0] == seq[3:]


# ---------------------------------------------------------------------------- stopping and streaming
def test_stop_tokens_end_sequences_and_are_not_returned(model):
    full = generate(model, PROMPTS, max_new_tokens=10)
    stop_tok = full[0][3]
    first = full[0].index(stop_tok)
    out = generate(model, PROMPTS, max_new_tokens=10, stop=[stop_tok])
    assert out[0] == full[0][:first]
    for got, ref in zip(out[1:], full[1:]):  # the others stop at the token too, if they produce it
        assert got == (ref[:ref.index(stop_tok)] if stop_tok in ref else ref)
    # eos_token_id behaves like a single-id stop; a sequence of ids stops on the whole sequence
    assert generate(model, PROMPTS[:1], max_new_tokens=10, eos_token_id=stop_tok) == [out[0]]
    pair = full[1][4:6]
    seq_stop = generate(model, PROMPTS[1:2], max_new_tokens=10, stop=[pair])[0]
    assert seq_stop == full[1][:4]


def test_loop_ends_when_all_sequences_stopped_and_stream_reports_steps(model):
    full = generate(model, PROMPTS[:2], max_new_tokens=10)
    stops = [full[0][1], full[1][2]]
    steps = []
    out = generate(model, PROMPTS[:2], max_new_tokens=10, stop=stops, stream=steps.append)
    ends = [min(r.index(s) for s in stops if s in r) for r in full]
    assert out == [full[0][:ends[0]], full[1][:ends[1]]]
    assert len(steps) == max(ends) + 1  # stopped early, not after 10 steps
    streamed = [[s[b] for s in steps if s[b] is not None] for b in range(2)]
    assert streamed == out


# ---------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip_gives_identical_logits(tmp_path, tied):
    model = tiny_model(tie_embeddings=tied)
    with torch.no_grad():
        model.layers[0].ffn.router.expert_bias.normal_()  # a buffer, not a parameter
    save_model(model, tmp_path / "ckpt")
    meta = json.loads((tmp_path / "ckpt" / "moekit_config.json").read_text())
    assert meta["format"] == "moekit" and meta["version"] == 1 and meta["tie_embeddings"] == tied
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg and loaded.tokenizer is None and not loaded.training
    assert (loaded.lm_head.weight is loaded.embed.weight) == tied
    assert loaded.num_params() == model.num_params()
    tok = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tok), model(tok))
    # a run directory with checkpoint/ inside loads too, and saving again replaces the checkpoint
    save_model(model, tmp_path / "run" / "checkpoint")
    (tmp_path / "run" / "config.json").write_text("{}")
    save_model(model, tmp_path / "run" / "checkpoint")
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "run")(tok), model(tok))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint", "config.json"]


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match="not a directory"):
        load_model(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "moekit_config.json").write_text(json.dumps({"format": "moekit", "version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_model(tmp_path / "x")
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="refusing"):
        save_model(tiny_model(), tmp_path / "keep")


# ---------------------------------------------------------------------------- command line
@pytest.fixture(scope="module")
def saved(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("cli") / "ckpt"
    save_model(model, path)
    return path


def test_cli_with_prompt_ids(saved, model, capsys):
    assert gen_mod.cli(["--checkpoint", str(saved), "--prompt-ids", "5,17,300", "--max-new-tokens", "6"]) == 0
    expected = generate(model, [[5, 17, 300]], max_new_tokens=6)[0]
    assert capsys.readouterr().out.split() == [str(t) for t in expected]


def test_cli_errors(saved, tmp_path, capsys):
    from moekit.cli import main  # the entry point turns ValueError into `moekit generate: error: ...`, exit 2

    assert main(["generate", str(tmp_path / "nope"), "--prompt-ids", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(saved), "--prompt", "hello"]) == 2
    assert "--prompt-ids" in capsys.readouterr().err
    assert main(["generate", str(saved), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["generate", str(saved), "--prompt-ids", "1", "--max-new-tokens", "999"]) == 2
    assert "max_seq_len" in capsys.readouterr().err


def test_cli_with_a_tokenizer_streams_text(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    words = ["<pad>", "the", "cat", "sat", "on", "mat", "a", "dog"] + [f"w{i}" for i in range(504)]
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    model = tiny_model()
    model.tokenizer = tok
    save_model(model, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    loaded = load_model(tmp_path / "ckpt")
    assert loaded.tokenizer.encode("the cat sat").ids == [1, 2, 3]

    assert gen_mod.cli(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "the cat sat", "--max-new-tokens", "5"]) == 0
    expected = generate(model, [[1, 2, 3]], max_new_tokens=5)[0]
    assert capsys.readouterr().out == tok.decode(expected) + "\n"
    # sampling flags pass through and a seed makes the output reproducible
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "a dog", "--temperature", "1.0", "--top-k", "50",
            "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "5", "--max-new-tokens", "6"]
    assert gen_mod.cli(args) == 0
    first = capsys.readouterr().out
    assert gen_mod.cli(args) == 0
    assert capsys.readouterr().out == first and first.strip()
