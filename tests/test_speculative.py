"""Speculative decoding (moekit.speculative): greedy equals plain `generate`; sampled tokens follow
the target's sampling distribution exactly (chi-square tests against the exact distribution, with
a draft that differs from the target); stops, stats, errors, the CLI."""

import math

import pytest
import torch

from moekit import ModelConfig, MoEConfig, Transformer, save_model
from moekit.generate import generate
from moekit.quantize import quantize_model
from moekit.speculative import filtered_probs, ngram_proposal, speculative_generate, verify

PROMPTS = [[5, 17, 300, 42, 7, 99, 1], [8, 3], [250, 251, 252, 253], [11],
           [9, 10, 11, 12, 13, 9, 10, 11, 12, 13, 9, 10]]  # the last repeats: n-gram proposals find matches


def tiny_model(seed=1234, **overrides) -> Transformer:
    """Random model with well-separated logits (greedy tokens do not flip on float rounding)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny", **overrides))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Many tiny forwards: one thread avoids OpenMP overhead (large on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    return tiny_model()


@pytest.fixture(scope="module")
def drafts(target):
    other = tiny_model(seed=99, n_layers=1)  # unrelated: few acceptances
    quantized = quantize_model(tiny_model(), "int4-g32")  # close to the target: many acceptances
    return {"other": other, "int4": quantized, "self": target}


# ---------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("proposer", ["other", "int4", "self", "ngram1", "ngram3"])
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_equals_plain_generate(target, drafts, proposer, gamma):
    kwargs = {"ngram": int(proposer[-1])} if proposer.startswith("ngram") else {"draft": drafts[proposer]}
    for prompt in PROMPTS:
        expected = generate(target, [prompt], max_new_tokens=20)[0]
        out, stats = speculative_generate(target, prompt, 20, gamma=gamma, **kwargs)
        assert out == expected
        assert stats.new_tokens == 20 and stats.accepted <= stats.proposed
        assert stats.target_forward_passes == 20 - stats.accepted  # each pass: accepted + 1 tokens
        assert stats.tokens_per_pass == pytest.approx(20 / stats.target_forward_passes)
    if proposer == "self":
        assert stats.acceptance_rate == 1.0 and stats.proposed > 0


def test_acceptance_reflects_draft_quality(target, drafts):
    rates = {}
    for name in ("other", "int4", "self"):
        accepted = proposed = 0
        for prompt in PROMPTS:
            _, stats = speculative_generate(target, prompt, 20, draft=drafts[name])
            accepted, proposed = accepted + stats.accepted, proposed + stats.proposed
        rates[name] = accepted / proposed
    assert rates["other"] < rates["int4"] <= rates["self"] == 1.0


def test_stops_and_streaming(target):
    prompt = PROMPTS[0]
    full = generate(target, [prompt], max_new_tokens=20)[0]
    for stop in ([full[6]], [[full[3], full[4]]], [full[0]]):
        expected = generate(target, [prompt], max_new_tokens=20, stop=stop)[0]
        for kwargs in ({"draft": target}, {"ngram": 2}):
            out, stats = speculative_generate(target, prompt, 20, stop=stop, **kwargs)
            assert out == expected and stats.new_tokens == len(expected)
    streamed = []
    out, _ = speculative_generate(target, prompt, 12, draft=target, stream=lambda toks: streamed.extend(toks))
    assert streamed == out == full[:12]


def test_edge_lengths(target):
    assert speculative_generate(target, [3], 0, ngram=2) == ([], speculative_generate(target, [3], 0, ngram=2)[1])
    assert speculative_generate(target, [3], 1, draft=target)[0] == generate(target, [[3]], 1)[0]
    out, stats = speculative_generate(target, [1] * 250, 6, draft=target, gamma=8)  # exactly max_seq_len
    assert out == generate(target, [[1] * 250], 6)[0] and stats.draft_forward_passes > 0


# ---------------------------------------------------------------------------- the acceptance rule
def chi_square_ok(counts, probs, alpha_z=3.09):
    """Pearson chi-square of counts vs probs (cells with expectation < 5 merged) below the
    1e-3-level critical value (Wilson-Hilferty). A count in a cell of probability 0 fails outright."""
    counts, probs = torch.as_tensor(counts, dtype=torch.float64), torch.as_tensor(probs, dtype=torch.float64)
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return False, math.inf, 0.0
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(exp) - 1
    crit = dof * (1 - 2 / (9 * dof) + alpha_z * math.sqrt(2 / (9 * dof))) ** 3 if dof > 0 else 0.0
    return chi2 < crit, chi2, crit


@pytest.mark.parametrize("point_mass", [False, True])
def test_verify_emits_target_distribution_at_every_position(point_mass):
    """Fixed p and q rows over 6 tokens: the i-th emitted token (when there is one) follows p_i."""
    g = torch.Generator().manual_seed(0)
    V, G, N = 6, 3, 12000
    p = torch.softmax(torch.randn(G + 1, V, generator=g) * 1.5, -1)
    p[1, 4] = 0.0  # a filtered-out token
    p[1] /= p[1].sum()
    q = torch.softmax(torch.randn(G, V, generator=g) * 1.5, -1)
    counts = torch.zeros(G + 1, V)
    for _ in range(N):
        if point_mass:
            proposal = [int(torch.randint(0, V, (), generator=g)) for _ in range(G)]
            emitted, n = verify(p, proposal, None, g)
        else:
            proposal = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(G)]
            emitted, n = verify(p, proposal, q, g)
        assert emitted[:n] == proposal[:n] and len(emitted) == n + 1
        for i, tok in enumerate(emitted):
            counts[i, tok] += 1
    for i in range(G + 1):
        ok, chi2, crit = chi_square_ok(counts[i], p[i])
        assert ok, (i, chi2, crit)
    assert not chi_square_ok(counts[0], q[0] if not point_mass else torch.full((V,), 1 / V))[0]  # the test has power


def test_verify_greedy_and_shapes():
    p = torch.eye(5)[[2, 3, 1]]
    assert verify(p, [2, 3], None, None, greedy=True) == ([2, 3, 1], 2)
    assert verify(p, [2, 0], None, None, greedy=True) == ([2, 3], 1)
    with pytest.raises(ValueError, match="proposals"):
        verify(p, [1], None, None)


def test_ngram_proposal():
    ctx = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert ngram_proposal(ctx, 3, 4) == [7, 5, 1, 2]  # latest earlier "1 2 3" is followed by 7
    assert ngram_proposal(ctx, 3, 1) == [7]
    assert ngram_proposal([4, 5, 6, 5], 3, 3) == [6, 5]  # falls back to n = 1
    assert ngram_proposal([4, 5, 6], 3, 3) == []
    assert ngram_proposal(ctx, 3, 0) == []


# ---------------------------------------------------------------------------- sampling distribution, end to end
def small_vocab_model(seed: int) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=12, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=32,
                      moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2))
    model = Transformer(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(10.0)  # model-specific distributions (target vs draft: total variation ~0.6)
    return model.eval()


def exact_two_token_distribution(model, prompt, temperature, top_k, top_p) -> torch.Tensor:
    """P(t1, t2 | prompt) of plain sampling, computed from the model's filtered distributions: (V*V,)."""
    V = model.cfg.vocab_size
    with torch.no_grad():
        p1 = filtered_probs(model(torch.tensor([prompt]))[0, -1:], temperature, top_k, top_p)[0]
        ctx = torch.tensor([prompt + [t] for t in range(V)])
        p2 = filtered_probs(model(ctx)[:, -1], temperature, top_k, top_p)
    return (p1[:, None] * p2).reshape(-1).double()


@pytest.mark.parametrize("proposer,temperature,top_k,top_p", [
    ("draft", 1.0, None, None),
    pytest.param("draft", 0.8, 8, 0.9, marks=pytest.mark.slow),  # (22 s: the filtered case, slow tier)
    ("ngram", 1.0, None, None),
])
def test_sampled_tokens_follow_the_target_distribution(proposer, temperature, top_k, top_p):
    target, draft = small_vocab_model(0), small_vocab_model(1)
    prompt = [1, 2, 3, 4, 1, 2, 3, 4, 1, 2]
    V, N = 12, 2000
    exact = exact_two_token_distribution(target, prompt, temperature, top_k, top_p)
    wrong = exact_two_token_distribution(draft, prompt, temperature, top_k, top_p)
    counts = torch.zeros(V * V)
    proposed = accepted = 0
    kwargs = {"draft": draft} if proposer == "draft" else {"ngram": 2}
    for seed in range(N):
        out, stats = speculative_generate(target, prompt, 3, gamma=2, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, **kwargs)
        counts[out[0] * V + out[1]] += 1
        proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    ok, chi2, crit = chi_square_ok(counts, exact)
    assert ok, (chi2, crit)
    assert 0.05 < accepted / proposed < 0.95  # both accept and reject paths ran many times
    if proposer == "draft":
        assert 0.5 * (exact - wrong).abs().sum() > 0.3  # the draft really differs from the target ...
        assert not chi_square_ok(counts, wrong)[0]  # ... and the test would notice its distribution


# ---------------------------------------------------------------------------- errors and CLI
def test_errors(target):
    with pytest.raises(ValueError, match="exactly one proposer"):
        speculative_generate(target, [1, 2], 4)
    with pytest.raises(ValueError, match="exactly one proposer"):
        speculative_generate(target, [1, 2], 4, draft=target, ngram=2)
    with pytest.raises(ValueError, match="vocab_size"):
        speculative_generate(target, [1, 2], 4, draft=small_vocab_model(0))
    with pytest.raises(ValueError, match="gamma"):
        speculative_generate(target, [1, 2], 4, ngram=2, gamma=0)
    with pytest.raises(ValueError, match="ngram"):
        speculative_generate(target, [1, 2], 4, ngram=0)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(target, [[1, 2], [3]], 4, ngram=2)
    with pytest.raises(ValueError, match="max_seq_len"):
        speculative_generate(target, [1] * 250, 7, ngram=2)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, [1], 4, ngram=2, temperature=-1.0)


def test_cli_speculative(tmp_path, capsys, target, drafts):
    from moekit.cli import main

    save_model(target, tmp_path / "target")
    save_model(drafts["other"], tmp_path / "draft")
    prompt = PROMPTS[4]
    expected = [str(t) for t in generate(target, [prompt], 10)[0]]
    ids = ",".join(map(str, prompt))
    base = ["generate", "--checkpoint", str(tmp_path / "target"), "--prompt-ids", ids, "--max-new-tokens", "10"]
    for extra in (["--draft", str(tmp_path / "draft"), "--gamma", "3"], ["--speculative", "ngram", "--ngram", "2"]):
        assert main(base + extra) == 0
        captured = capsys.readouterr()
        assert captured.out.split() == expected
        assert "accepted" in captured.err and "tokens/pass" in captured.err
    assert main(base + ["--draft", str(tmp_path / "draft"), "--speculative", "ngram"]) == 2
    assert "not both" in capsys.readouterr().err
