"""The gated delta rule's three forms (attention/delta_rule.py): the chunked and one-token forms
against the per-token reference, and the reference against the recurrence written out by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.attention.delta_rule import delta_rule_chunked, delta_rule_reference, delta_rule_step


def inputs(B=2, Hk=2, Hv=4, T=70, Dk=8, Dv=6, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, Hk, T, Dk, generator=g, dtype=torch.float64), dim=-1) * Dk ** -0.5
    k = F.normalize(torch.randn(B, Hk, T, Dk, generator=g, dtype=torch.float64), dim=-1)
    v = torch.randn(B, Hv, T, Dv, generator=g, dtype=torch.float64)
    decay = -3 * torch.rand(B, Hv, T, generator=g, dtype=torch.float64)  # log decays down to exp(-3)
    beta = torch.rand(B, Hv, T, generator=g, dtype=torch.float64)
    S0 = torch.randn(B, Hv, Dk, Dv, generator=g, dtype=torch.float64)
    out = [t.to(dtype).requires_grad_(requires_grad) for t in (q, k, v, decay, beta, S0)]
    return out


def stepwise(q, k, v, g, beta, S):
    outs = []
    for t in range(q.shape[2]):
        o, S = delta_rule_step(q[:, :, t], k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t], S)
        outs.append(o)
    return torch.stack(outs, dim=2), S


def test_reference_is_the_recurrence_by_hand():
    """One value head per key head, B = 1, T = 2, worked with plain matrices."""
    q, k, v, g, beta, S0 = inputs(B=1, Hk=1, Hv=1, T=2, Dk=3, Dv=2)
    S = S0[0, 0]
    expected = []
    for t in range(2):
        kt, vt, qt = k[0, 0, t], v[0, 0, t], q[0, 0, t]
        S = torch.exp(g[0, 0, t]) * S
        S = S + beta[0, 0, t] * torch.outer(kt, vt - S.T @ kt)
        expected.append(S.T @ qt)
    o, S_end = delta_rule_reference(q, k, v, g, beta, S0)
    torch.testing.assert_close(o[0, 0], torch.stack(expected), rtol=0, atol=1e-14)
    torch.testing.assert_close(S_end[0, 0], S, rtol=0, atol=1e-14)


def test_value_head_j_reads_key_head_j_div_r():
    q, k, v, g, beta, S0 = inputs(B=1, Hk=2, Hv=6, T=5)
    o, S = delta_rule_reference(q, k, v, g, beta, S0)
    for j in range(6):  # head j alone, with key head j // 3
        o_j, S_j = delta_rule_reference(q[:, j // 3:j // 3 + 1], k[:, j // 3:j // 3 + 1], v[:, j:j + 1],
                                        g[:, j:j + 1], beta[:, j:j + 1], S0[:, j:j + 1])
        torch.testing.assert_close(o[:, j:j + 1], o_j, rtol=0, atol=0)
        torch.testing.assert_close(S[:, j:j + 1], S_j, rtol=0, atol=0)


@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("chunk", [64, 16])
def test_chunked_and_step_equal_reference_fp64(T, chunk):
    x = inputs(T=T)
    o_ref, S_ref = delta_rule_reference(*x)
    o_chk, S_chk = delta_rule_chunked(*x, chunk=chunk)
    o_stp, S_stp = stepwise(*x)
    for o, S in ((o_chk, S_chk), (o_stp, S_stp)):
        torch.testing.assert_close(o, o_ref, rtol=0, atol=1e-12)
        torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-12)


def test_no_state_means_zero_state_and_padding_tokens_leave_it():
    q, k, v, g, beta, S0 = inputs(T=9)
    o1, S1 = delta_rule_chunked(q, k, v, g, beta, None)
    o2, S2 = delta_rule_chunked(q, k, v, g, beta, torch.zeros_like(S0))
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(S1, S2, rtol=0, atol=0)
    g2, beta2 = g.clone(), beta.clone()
    g2[..., :4], beta2[..., :4] = 0, 0  # four "padding" tokens first: the state passes through them
    _, S_pad = delta_rule_chunked(q, k, v, g2, beta2, S0)
    _, S_cut = delta_rule_reference(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], g[..., 4:], beta[..., 4:], S0)
    torch.testing.assert_close(S_pad, S_cut, rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [37, 100])
def test_fp32_within_the_references_own_error(T):
    x64 = inputs(T=T)
    o64, S64 = delta_rule_reference(*x64)
    x32 = [t.float() for t in x64]
    o_ref, S_ref = delta_rule_reference(*x32)
    o_chk, S_chk = delta_rule_chunked(*x32)
    o_stp, S_stp = stepwise(*x32)
    err_o, err_S = (o_ref.double() - o64).abs().max(), (S_ref.double() - S64).abs().max()
    for o, S in ((o_chk, S_chk), (o_stp, S_stp)):
        assert o.dtype == torch.float32
        assert (o.double() - o64).abs().max() <= 2 * err_o + 1e-7
        assert (S.double() - S64).abs().max() <= 2 * err_S + 1e-7


def test_bfloat16_inputs_work_in_float32():
    x = [t.bfloat16() for t in inputs(T=20)]
    o, S = delta_rule_chunked(*x)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    o_ref, S_ref = delta_rule_reference(*x)
    torch.testing.assert_close(S, S_ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("T", [7, 70])
def test_chunked_gradients_equal_the_references(T):
    x = inputs(T=T, requires_grad=True)
    w_o = torch.randn(2, 4, T, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    w_S = torch.randn(2, 4, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    grads = []
    for fn in (delta_rule_reference, lambda *a: delta_rule_chunked(*a, chunk=16)):
        o, S = fn(*x)
        grads.append(torch.autograd.grad((o * w_o).sum() + (S * w_S).sum(), x))
    for g_ref, g_chk in zip(*grads):
        torch.testing.assert_close(g_chk, g_ref, rtol=0, atol=1e-10)
