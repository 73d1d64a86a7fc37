"""The ops' CPU kernels in C++ (moekit/cpu_ops.cpp: what torch.ops.moekit.* runs where it is built) against
their Python kernels (ctypes over the same C functions: cpu_matvec.call / x8_call, paged_cpu.call, the
fallback): the same bits for every op and layout, and the same error, with its type, for every input the
C code must not read (it trusts its sizes)."""

import platform
import re
import shutil
import sys

import pytest
import torch

from moekit import cpu_matvec
from moekit.attention import paged_cpu
from moekit.quantize.modules import QuantizedWeight

needs_ops = pytest.mark.skipif(not cpu_matvec.available() or not cpu_matvec.ops_in_cpp(),
                               reason=f"no C++ kernels: {cpu_matvec.error() or cpu_matvec.ops_error()}")


def outcome(fn, *args):
    """The result, or (the error's type, its message without file and line details)."""
    try:
        return fn(*args)
    except (ValueError, IndexError, RuntimeError) as exc:
        return type(exc), re.split(r"\n", str(exc))[0]


def same(a, b):
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.equal(a, b)
    return a == b


@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64" or not shutil.which("c++"),
                    reason="the C++ kernels are built on x86-64 Linux with a C++ compiler")
def test_the_cpp_kernels_build_here():
    """A C++ file that fails to compile would otherwise only turn the tests below into skips."""
    assert cpu_matvec.ops_in_cpp(), cpu_matvec.error() or cpu_matvec.ops_error()


@needs_ops
@pytest.mark.parametrize("method", ["q8_0", "q4_0", "mxfp4", "f32"])
def test_qmatvec_equals_the_python_kernel(method):
    torch.manual_seed(0)
    lib = cpu_matvec.library()
    for stack in (False, True):
        w = torch.randn(*((5,) if stack else ()), 40, 96)
        if method == "f32":
            qweight, scale = w, None
        else:
            qw = QuantizedWeight.from_float(w, method)
            qweight, scale = qw.qweight, qw.kernel_scale
        for R in (1, 3, 12):
            x = torch.randn(R, 96)
            index = torch.randint(0, 5, (R,)) if stack else None
            ours = torch.ops.moekit.qmatvec(method, x, qweight, scale, index)
            assert torch.equal(ours, cpu_matvec.call(lib, method, x, qweight, scale, index))
    qw = QuantizedWeight.from_float(torch.randn(3, 16, 64), "q4_0")
    mx = QuantizedWeight.from_float(torch.randn(3, 16, 64), "mxfp4")
    x = torch.randn(2, 64)
    bad = [("q4_0", x, qw.qweight, qw.scale_f32, torch.tensor([0, 3])),  # index outside the stack
           ("q4_0", torch.randn(2, 96), qw.qweight, qw.scale_f32, torch.tensor([0, 1])),  # K
           ("q4_0", x, qw.qweight, qw.scale_f32, None),  # a stack without an index
           ("q4_0", x, qw.qweight, None, torch.tensor([0, 1])),  # no scales
           ("q4_0", x.double(), qw.qweight, qw.scale_f32, torch.tensor([0, 1])),  # float64 x
           ("q4_0", x, qw.qweight, qw.scale, torch.tensor([0, 1])),  # the stored fp16 bits, not float32
           ("mxfp4", x, mx.qweight, mx.scale.float(), torch.tensor([0, 1]))]  # E8M0 scales as floats
    for args in bad:
        ours = outcome(torch.ops.moekit.qmatvec, *args)
        assert isinstance(ours, tuple) and ours[0] in (ValueError, IndexError), ours
        assert ours[0] is outcome(cpu_matvec.call, lib, *args)[0]


@needs_ops
def test_f32matvec_cat_equals_one_qmatvec_per_weight():
    """Projections of one input in one call: per weight the bits of its own `qmatvec` call (the C++ and the Python
    kernel), rows of zeros give zeros, and a weight that does not fit x is refused by both."""
    torch.manual_seed(3)
    lib = cpu_matvec.library()
    weights = [torch.randn(n, 96) for n in (40, 17, 8)]
    for R in (1, 3, 12):
        x = torch.randn(R, 96)
        x[R // 2] = 0
        each = [cpu_matvec.call(lib, "f32", x, w, None, None) for w in weights]
        expected = torch.cat([y.reshape(-1) for y in each])  # each product row-major, one after another
        ours = torch.ops.moekit.f32matvec_cat(x, weights)
        assert torch.equal(ours, expected) and torch.equal(cpu_matvec.call_cat(lib, x, weights), expected)
        views = cpu_matvec.f32matvec_cat(x, weights)
        assert all(v.is_contiguous() and torch.equal(v, y) and not v[R // 2].any() for v, y in zip(views, each))
    x = torch.randn(2, 96)
    bad = [(x, [weights[0], torch.randn(8, 64)]), (x.double(), weights), (torch.randn(2, 80), [torch.randn(4, 80)]),
           (x, [weights[0].double()]), (x, [])]
    for args in bad:
        ours = outcome(torch.ops.moekit.f32matvec_cat, *args)
        assert isinstance(ours, tuple) and ours[0] is ValueError, ours
        assert ours[0] is outcome(cpu_matvec.call_cat, lib, *args)[0]


@needs_ops
@pytest.mark.parametrize("method", ["q8_0", "q4_0"])
def test_x8matvec_equals_the_python_kernel(method):
    torch.manual_seed(1)
    lib = cpu_matvec.library()
    for stack in (False, True):
        qw = QuantizedWeight.from_float(torch.randn(*((4,) if stack else ()), 40, 96), method)
        panels = cpu_matvec.x8_pack(lib, method, qw.qweight, qw.scale_f32)
        for R in (1, 5, 20):
            x = torch.randn(R, 96)
            index = torch.randint(0, 4, (R,)) if stack else None
            ours = torch.ops.moekit.x8matvec(method, x, *panels, 40, index)
            assert torch.equal(ours, cpu_matvec.x8_call(lib, method, x, *panels, 40, index))
    qw = QuantizedWeight.from_float(torch.randn(3, 20, 64), method)
    panels = cpu_matvec.x8_pack(lib, method, qw.qweight, qw.scale_f32)
    other = "q4_0" if method == "q8_0" else "q8_0"
    x = torch.randn(2, 64)
    bad = [(method, x, *panels, 20, torch.tensor([0, 3])), (method, torch.randn(2, 96), *panels, 20, torch.tensor([0, 1])),
           (method, x, *panels, 40, torch.tensor([0, 1])), (other, x, *panels, 20, torch.tensor([0, 1])),
           (method, x, *panels, 20, None), ("f32", x, *panels, 20, torch.tensor([0, 1]))]
    for args in bad:
        ours = outcome(torch.ops.moekit.x8matvec, *args)
        assert isinstance(ours, tuple) and ours[0] in (ValueError, IndexError), ours
        assert ours[0] is outcome(cpu_matvec.x8_call, lib, *args)[0]


@needs_ops
def test_paged_decode_attention_equals_the_python_kernel():
    g = torch.Generator().manual_seed(2)
    lib = cpu_matvec.library()
    B, H, G, S, N, Dh = 3, 8, 2, 21, 90, 32
    pool_k, pool_v = torch.randn(G, N, Dh, generator=g), torch.randn(G, N, Dh, generator=g)
    table = torch.stack([torch.randperm(N, generator=g)[:S] for _ in range(B)])
    valid = torch.arange(S)[None] < torch.tensor([[S], [5], [0]])
    q = torch.randn(B, H, Dh, generator=g)
    for sinks in (None, torch.randn(H, generator=g)):
        ours = torch.ops.moekit.paged_decode_attention(q, pool_k, pool_v, table, valid, sinks, Dh ** -0.5)
        assert torch.equal(ours, paged_cpu.call(lib, q, pool_k, pool_v, table, valid, sinks, Dh ** -0.5))
    out_of_pool = table.clone()
    out_of_pool[0, 0] = N
    bad = [(q, pool_k, pool_v, out_of_pool, valid, None, 0.25), (q[:, :7], pool_k, pool_v, table, valid, None, 0.25),
           (q, pool_k, pool_v[:, :50], table, valid, None, 0.25), (q, pool_k, pool_v, table, valid[:, :5], None, 0.25),
           (q, pool_k, pool_v, table, valid, torch.zeros(3), 0.25)]
    for args in bad:
        ours = outcome(torch.ops.moekit.paged_decode_attention, *args)
        assert isinstance(ours, tuple) and ours[0] in (ValueError, IndexError), ours
        assert ours[0] is outcome(paged_cpu.call, lib, *args)[0]


@pytest.mark.skipif(not cpu_matvec.available() or not shutil.which("false"), reason="needs the C kernel")
def test_without_a_cpp_compiler_the_python_kernels_run(tmp_path):
    """CXX names a compiler that fails: the C sources alone are built and the ops run their Python kernels."""
    import os
    import subprocess

    code = ("import torch; from moekit import cpu_matvec as cm; from moekit.quantize.modules import QuantizedWeight\n"
            "qw = QuantizedWeight.from_float(torch.randn(40, 64), 'q4_0'); x = torch.randn(3, 64)\n"
            "y = torch.ops.moekit.qmatvec('q4_0', x, qw.qweight, qw.scale_f32, None)\n"
            "assert torch.equal(y, cm.call(cm.library(), 'q4_0', x, qw.qweight, qw.scale_f32, None))\n"
            "print(cm.available(), cm.ops_in_cpp(), cm.ops_error())")
    env = dict(os.environ, CXX=shutil.which("false"), MOEKIT_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("True False false failed"), out.stdout
