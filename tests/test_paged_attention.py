"""Decode attention read in place from the engine's paged KV pool (moekit/cpu_attention.c through
moekit/attention/paged_cpu.py) against `math_attention` on the gathered copy (the torch path it
replaces), with GQA, sinks and masked slots; a row alone against the same row co-batched, bitwise; the
engine's decode steps going through it; and the refusals of sizes the C code cannot read."""

import pytest
import torch

from moekit import ModelConfig, Transformer, cpu_matvec
from moekit.attention import paged_cpu
from moekit.attention.base import math_attention
from moekit.engine import Engine, SamplingParams
from moekit.generate import generate

pytestmark = pytest.mark.skipif(not cpu_matvec.available(), reason=f"no CPU kernel: {cpu_matvec.error()}")


def case(B=5, H=8, G=2, S=37, N=120, Dh=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool_k, pool_v = torch.randn(G, N, Dh, generator=g), torch.randn(G, N, Dh, generator=g)
    table_BS = torch.stack([torch.randperm(N, generator=g)[:S] for _ in range(B)])
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    valid_BS = torch.arange(S)[None] < lengths[:, None]
    valid_BS[0, 3] = False  # a hole inside a row, too
    q_BHDh = torch.randn(B, H, Dh, generator=g)
    return q_BHDh, pool_k, pool_v, table_BS, valid_BS


def gathered_reference(q_BHDh, pool_k, pool_v, table_BS, valid_BS, sinks_H=None):
    B, S = table_BS.shape
    k_BGSDh = pool_k[:, table_BS.reshape(-1)].view(pool_k.shape[0], B, S, -1).transpose(0, 1)
    v_BGSDh = pool_v[:, table_BS.reshape(-1)].view(pool_v.shape[0], B, S, -1).transpose(0, 1)
    out = math_attention(q_BHDh.double()[:, :, None], k_BGSDh.double(), v_BGSDh.double(), valid_BS[:, None, None],
                         None if sinks_H is None else sinks_H.double())
    return out[:, :, 0].float()


@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("G", [1, 2, 8])  # MQA, GQA, MHA
def test_matches_math_attention_on_the_gathered_copy(sinks, G):
    q, pool_k, pool_v, table, valid = case(G=G)
    sinks_H = torch.randn(8) if sinks else None
    out = paged_cpu.call(cpu_matvec.library(), q, pool_k, pool_v, table, valid, sinks_H, 32 ** -0.5)
    torch.testing.assert_close(out, gathered_reference(q, pool_k, pool_v, table, valid, sinks_H), rtol=1e-5, atol=1e-5)


def test_a_row_alone_equals_the_row_co_batched_bitwise():
    q, pool_k, pool_v, table, valid = case(B=9, seed=1)
    lib = cpu_matvec.library()
    together = paged_cpu.call(lib, q, pool_k, pool_v, table, valid, None, 0.25)
    for b in range(9):
        alone = paged_cpu.call(lib, q[b:b + 1], pool_k, pool_v, table[b:b + 1], valid[b:b + 1], None, 0.25)
        assert torch.equal(alone[0], together[b])


@pytest.fixture(scope="module")
def avx2_and_portable(tmp_path_factory):
    """The kernel built without AVX-512 and without AVX2 either (once for the module)."""
    tmp = tmp_path_factory.mktemp("kernels")
    return [cpu_matvec.load(cpu_matvec.build(flags, cache_dir=tmp / name))
            for name, flags in (("avx2", ["-mno-avx512f"]), ("c", ["-mno-avx512f", "-mno-avx2"]))]


@pytest.mark.parametrize("scale", [32 ** -0.5, 30.0])  # 30: many scores more than 87 below the row's max (e^x: 0)
def test_the_avx2_path_gives_the_portable_bits(avx2_and_portable, scale):
    """Built without AVX-512, the kernel's AVX2 dot and exponentials (machines with AVX2) sum and round as the
    portable C does (built without AVX2 too): the same bits, over 37 slots (vectors of 8 and a tail), holes,
    sinks and a NaN query row (NaN kept)."""
    q, pool_k, pool_v, table, valid = case(B=6, S=37, seed=3)
    q[5, 2] = float("nan")
    sinks_H = torch.randn(8)
    avx2, portable = (paged_cpu.call(lib, q, pool_k, pool_v, table, valid, sinks_H, scale) for lib in avx2_and_portable)
    assert torch.equal(avx2[:5], portable[:5]) and avx2[5, 2].isnan().all() and portable[5, 2].isnan().all()
    assert torch.equal(avx2[5, 3:], portable[5, 3:])
    if scale == 32 ** -0.5:  # (the reference's scale)
        torch.testing.assert_close(avx2, gathered_reference(q, pool_k, pool_v, table, valid, sinks_H), rtol=1e-5,
                                   atol=1e-5, equal_nan=True)


def test_a_row_with_no_valid_slot_gets_zeros_and_bad_inputs_are_refused():
    q, pool_k, pool_v, table, valid = case(B=2)
    valid[1] = False
    lib = cpu_matvec.library()
    assert torch.equal(paged_cpu.call(lib, q, pool_k, pool_v, table, valid, None, 0.25)[1], torch.zeros(8, 32))
    bad = table.clone()
    bad[0, 0] = 120  # the pool has 120 slots
    with pytest.raises(IndexError, match=r"outside \[0, 120\)"):
        paged_cpu.call(lib, q, pool_k, pool_v, bad, valid, None, 0.25)
    with pytest.raises(ValueError, match="do not fit"):
        paged_cpu.call(lib, q[:, :7], pool_k, pool_v, table, valid, None, 0.25)  # 7 heads over 2 KV heads
    with pytest.raises(ValueError, match="do not fit"):
        paged_cpu.call(lib, q, pool_k, pool_v[:, :50], table, valid, None, 0.25)


def test_the_engine_decodes_through_it(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    calls = []
    real = paged_cpu.PagedKV.attend
    monkeypatch.setattr(paged_cpu.PagedKV, "attend", lambda self, *a: calls.append(a[0].shape) or real(self, *a))
    prompts = [[5, 17, 300, 42], [8, 3], [11, 12, 13, 14, 15]]
    out = Engine(model).generate(prompts, SamplingParams(max_tokens=6))
    assert [o.token_ids for o in out] == [generate(model, [p], max_new_tokens=6)[0] for p in prompts]
    assert calls  # (the engine matrix runs every feature through it: tests/test_engine_matrix.py)
