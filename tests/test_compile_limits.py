"""Many compiled decode steps in one process: each batch size and cache bucket is one more dynamo cache
entry of a step's code object; past dynamo's default of 8, a fullgraph step stopped compiling (the
engine's requests then failed with FailOnRecompileLimitHit). moekit.runtime.compile_fn gives moekit's
steps room for more. And the steps compile without guards on the model's modules
(runtime.compiled_step): each model gets a code object of its own, and a change of mode, dtype or
device compiles again, so several models in one process never run each other's graphs."""

import pytest
import torch

from moekit import ModelConfig, Transformer
from moekit.engine import Engine, SamplingParams
from moekit.generate import generate


def tiny(seed: int) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny"))
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model.eval()


@pytest.mark.slow
def test_many_compiled_batch_sizes_then_a_compiled_engine_still_answers():
    model = tiny(0)
    prompts = [[5, 17, 300, 42], [8, 3], [11], [400, 2, 9]] * 3
    for B in range(1, 11):  # ten batch sizes: ten cache entries of the one decode_step code object
        assert generate(model, prompts[:B], max_new_tokens=3, compile=True) == generate(model, prompts[:B], 3)
    done = Engine(model, max_batch=4, compile=True).generate([prompts[0]], SamplingParams(max_tokens=4,
                                                                                          ignore_eos=True))[0]
    assert done.finish_reason == "length", f"{done.finish_reason}: {done.error}"
    assert done.token_ids == generate(model, [prompts[0]], max_new_tokens=4)[0]


def test_compiling_a_step_raises_the_recompile_limit_only_upwards():
    from moekit.runtime import DECODE_RECOMPILE_LIMIT, compile_fn

    config = torch._dynamo.config
    saved = config.recompile_limit
    try:
        config.recompile_limit = 8
        compile_fn(tiny(0).decode_step, dynamic=False, device="cpu")
        assert config.recompile_limit == DECODE_RECOMPILE_LIMIT
        config.recompile_limit = 10 * DECODE_RECOMPILE_LIMIT
        compile_fn(tiny(0).decode_step, dynamic=False, device="cpu")
        assert config.recompile_limit == 10 * DECODE_RECOMPILE_LIMIT
    finally:
        config.recompile_limit = saved


def test_models_compiled_in_one_process_never_share_a_graph():
    """Module guards are off: two models of the same config (other weights), one of another config and a
    quantized copy of the first (the same config and cache, other modules), compiled and run in turn, each
    equal their own eager tokens; so does a model moved to float64 after its
    first compiled call, and one whose expert backend changed."""
    import copy

    from moekit.quantize import quantize_model

    small = ModelConfig.preset("tiny", n_layers=1, n_heads=2, n_kv_heads=1)
    models = [tiny(0), tiny(1), Transformer(small).eval(), None]
    with torch.no_grad():
        models[2].lm_head.weight.mul_(50.0)
    models[3] = quantize_model(copy.deepcopy(models[0]), "int8", quantize_head=True)  # same config, other modules
    prompts = [[5, 17, 300, 42], [8, 3]]
    eager = [generate(m, prompts, max_new_tokens=4) for m in models]
    assert eager[0] != eager[1]  # other weights, other tokens: a shared graph would show
    for _ in range(2):
        for m, expected in zip(models, eager):
            assert generate(m, prompts, max_new_tokens=4, compile=True) == expected
    double = models[1].double()
    assert generate(double, prompts, max_new_tokens=4, compile=True) == generate(double, prompts, max_new_tokens=4)
    models[0].set_experts_impl("reference")
    assert "_compiled_decode_step" not in models[0].__dict__  # forgotten: compiled again on the next call
    assert generate(models[0], prompts, max_new_tokens=4, compile=True) == eager[0]


def test_materialized_is_the_identity_in_eager_and_keeps_values_compiled():
    """runtime.materialized: x itself in eager; compiled, the same values for a norm output and for an
    expanded (stride-0) input, which it lays out row-major (a stride-0 buffer cannot be written)."""
    from moekit.norm import RMSNorm
    from moekit.runtime import materialized

    x = torch.randn(3, 64)
    assert materialized(x) is x
    norm = RMSNorm(64, 1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    w = torch.randn(48, 64)

    def f(x_MK):
        x_P1K = x_MK[:1, None, :].expand(4, 1, 64)
        return (materialized(x_P1K) * w).sum(-1), norm(x_MK) @ w.t()

    eager = f(x)
    with torch.no_grad():
        compiled = torch.compile(f, fullgraph=True)(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    x.requires_grad_(True)  # with autograd the step leaves x alone (the realizing op has no backward)
    y = torch.compile(f, fullgraph=True)(x)[1]
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.func.grad(lambda x: f(x)[1].sum())(x.detach()), rtol=1e-4, atol=1e-4)
