"""Thread teams in the compiled decode steps (moekit.runtime: `serial_kernels`). Under dynamic shapes inductor
opens an OpenMP parallel region in nearly every CPU kernel, a one-row copy included; in the engine's invariant
step, whose products and attention are moekit's C kernels with their own parallel loops, inductor's kernels
are generated for one thread. Read from the generated C++."""

import pytest
import torch
from torch._inductor.utils import run_and_get_cpp_code

from moekit import ModelConfig, Transformer, cpu_matvec
from moekit.engine import Engine, SamplingParams
from moekit.generate import generate
from moekit.runtime import compile_fn

PARALLEL = "#pragma omp parallel"


def generated(fn, *args) -> str:
    with torch._inductor.config.patch(fx_graph_cache=False):  # (a cached graph logs no code)
        return run_and_get_cpp_code(fn, *args)[1]


def glue(x_RD: torch.Tensor) -> torch.Tensor:
    return (x_RD * torch.rsqrt(x_RD.pow(2).mean(-1, keepdim=True) + 1e-6)).sin()


@pytest.mark.parametrize("serial", [False, True])
def test_serial_kernels_generate_no_parallel_region(serial):
    step = compile_fn(glue, True, "cpu", serial_kernels=serial)
    with torch._inductor.config.patch({"cpp.threads": 2}):  # (as on a 2-core machine; the option overrides it)
        code = generated(step, torch.randn(64, 256))
    assert "extern \"C\"" in code  # the kernels' C++ was captured
    assert (PARALLEL in code) is not serial


@pytest.mark.skipif(not cpu_matvec.available(), reason="needs the C kernels (a C compiler)")
def test_invariant_engine_step_leaves_threads_to_the_c_kernels():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    prompt, params = [5, 17, 300, 42], SamplingParams(max_tokens=3, ignore_eos=True)
    engine, done = Engine(model, max_batch=2, compile=True), []
    code = generated(lambda: done.append(engine.generate([prompt], params)[0]))
    done = done[0]
    assert done.token_ids == generate(model, [prompt], max_new_tokens=3)[0]
    assert "moekit::qmatvec" in code or "moekit.qmatvec" in code  # the step's code, its products in C
    assert PARALLEL not in code
