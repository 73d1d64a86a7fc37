"""Gated DeltaNet, the linear-attention layers of Qwen3-Next and Qwen3.5/3.6-MoE ("linear" layer_types).

    x -> in_proj -> q, k, v, z, b, a
    q, k, v: causal depthwise conv1d (kernel K, no bias) + SiLU; q, k L2-normed; q / sqrt(Dk)
    beta = sigmoid(b), g = -exp(A_log) * softplus(a + dt_bias)
    o = gated delta rule (delta_rule.py) over q, k, v, g, beta from the row's recurrent state
    out_proj(RMSNorm(o) * SiLU(z))        (the norm per value head, weight starting at 1)

Projections, by `ModelConfig.linear_fused_proj`: Qwen3-Next's fused `in_proj_qkvz` (per key head
[q (Dk), k (Dk), v (R Dv), z (R Dv)]) and `in_proj_ba` (per key head [b (R), a (R)]); or Qwen3.5's
split `in_proj_qkv` ([q all heads, k, v]), `in_proj_z`, `in_proj_b`, `in_proj_a`. Parameter names
are transformers' (`conv1d.weight`, `A_log`, `dt_bias`, `norm.weight`, `out_proj.weight`).

State (cache.RecurrentLayerCache): the last K - 1 conv inputs and the (Hv, Dk, Dv) delta-rule
state per sequence, of fixed size. How each plan (plan.py) drives it:
  * a span from slot 0 (dense prefill, training, a request's first ragged segment) starts from
    zeros; a later one (dense decode, later segments) continues its rows' state;
  * the static decode step (row_slots_B) continues every row, and writes back only
    `plan.active_rows` when given (rows that are not decoding keep their state);
  * tokens the span's key mask hides (left padding) feed zeros to the conv and leave the
    delta-rule state untouched (beta = 0, g = 0); the mask is read from the span's last query row,
    so hidden tokens must come before the visible ones (left padding), as in `generate`.
T > 1 runs the chunked delta rule, T = 1 the one-token step (elementwise: batch-invariant).

Legend: B batch, T tokens, D model dim, Hk key heads, Hv value heads, R = Hv / Hk, Dk / Dv key /
value head dims, C conv channels (2 Hk Dk + Hv Dv), K conv kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import RecurrentLayerCache
from ..moe.weights import project, project_all
from ..norm import RMSNorm
from ..numerics import PLAIN
from .delta_rule import delta_rule_chunked, delta_rule_step, work_dtype, zero_state
from .base import register_attention

L2_EPS = 1e-6  # transformers' (and FLA's) l2norm epsilon


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


@register_attention("gated_deltanet")
class GatedDeltaNet(nn.Module):
    @classmethod
    def default_head_dim(cls, cfg) -> int:
        return cfg.d_model // cfg.n_heads if cfg.n_heads > 0 else 0

    @classmethod
    def check(cls, cfg) -> None:
        names = ("linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
                 "linear_conv_kernel")
        bad = [f"{n}={getattr(cfg, n)!r}" for n in names if not positive_int(getattr(cfg, n))]
        if bad:
            raise ValueError(f"Gated DeltaNet ('linear' layers) needs positive integers: {', '.join(bad)}")
        if cfg.linear_num_value_heads % cfg.linear_num_key_heads:
            raise ValueError(f"ModelConfig.linear_num_value_heads={cfg.linear_num_value_heads} must be a multiple of "
                             f"linear_num_key_heads={cfg.linear_num_key_heads}")

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        D, Hk, Hv = cfg.d_model, cfg.linear_num_key_heads, cfg.linear_num_value_heads
        Dk, Dv, K = cfg.linear_key_head_dim, cfg.linear_value_head_dim, cfg.linear_conv_kernel
        self.Hk, self.Hv, self.Dk, self.Dv, self.K = Hk, Hv, Dk, Dv, K
        self.conv_dim = 2 * Hk * Dk + Hv * Dv
        if cfg.linear_fused_proj:
            self.in_proj_qkvz = nn.Linear(D, 2 * Hk * Dk + 2 * Hv * Dv, bias=False)
            self.in_proj_ba = nn.Linear(D, 2 * Hv, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(D, self.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(D, Hv * Dv, bias=False)
            self.in_proj_b = nn.Linear(D, Hv, bias=False)
            self.in_proj_a = nn.Linear(D, Hv, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, K, groups=self.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.empty(Hv))
        self.A_log = nn.Parameter(torch.empty(Hv))
        self.norm = RMSNorm(Dv, cfg.norm_eps)
        self.out_proj = nn.Linear(Hv * Dv, D, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """transformers' init: dt_bias 1, A = exp(A_log) uniform in [1, 16] (decay rates), the conv as nn.Conv1d."""
        if self.A_log.is_meta:
            return
        self.dt_bias.fill_(1.0)
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())

    def new_cache(self, batch: int, max_len: int, dtype, device) -> RecurrentLayerCache:
        return RecurrentLayerCache.allocate(batch, self.conv_dim, self.K, self.Hv, self.Dk, self.Dv, max_len,
                                            dtype, device)

    def project(self, x_BTD, numerics=PLAIN):
        """(conv input (B, T, C) as [q, k, v], z (B, T, Hv, Dv), b and a (B, T, Hv))."""
        B, T, _ = x_BTD.shape
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        if self.cfg.linear_fused_proj:
            R = Hv // Hk
            qkvz, ba = project_all((self.in_proj_qkvz, self.in_proj_ba), x_BTD, numerics)
            q, k, v, z = qkvz.view(B, T, Hk, 2 * Dk + 2 * R * Dv).split([Dk, Dk, R * Dv, R * Dv], dim=-1)
            b, a = ba.view(B, T, Hk, 2 * R).split([R, R], dim=-1)
            mixed_BTC = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], dim=-1)
            return mixed_BTC, z.reshape(B, T, Hv, Dv), b.reshape(B, T, Hv), a.reshape(B, T, Hv)
        qkv, z, b, a = project_all((self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a), x_BTD, numerics)
        return qkv, z.view(B, T, Hv, Dv), b, a

    def mix(self, mixed_BTC, b_BTHv, a_BTHv, span, plan) -> torch.Tensor:
        """The conv and the delta rule over one span, from and into its cache: o (B, T, Hv, Dv)."""
        B, T, C = mixed_BTC.shape
        ew = plan.numerics.ew
        cache = None if span.cache is None else span.cache[self.layer_idx]
        fresh = cache is None or RecurrentLayerCache.starts_fresh(span, T)
        valid_BT = None
        if span.mask_B1TS is not None and T > 1:  # the last query row sees every earlier visible token
            S = span.mask_B1TS.shape[-1]
            valid_BT = span.mask_B1TS[:, 0, -1, S - T:]
            mixed_BTC = mixed_BTC * valid_BT[..., None].to(mixed_BTC.dtype)
        prev_BCW = mixed_BTC.new_zeros(B, C, self.K - 1) if fresh else cache.conv.to(mixed_BTC.dtype)
        window_BCW = torch.cat([prev_BCW, mixed_BTC.transpose(1, 2)], dim=2)  # (B, C, K - 1 + T)
        weight_CK = self.conv1d.weight[:, 0]
        if T == 1:  # elementwise: a row's bits do not depend on the batch
            conv_BCT = (window_BCW * weight_CK).sum(-1, keepdim=True)
        else:
            conv_BCT = F.conv1d(window_BCW, self.conv1d.weight, groups=C)
        act_BTC = ew(F.silu, conv_BCT.transpose(1, 2))
        Hk, Hv, Dk, Dv = self.Hk, self.Hv, self.Dk, self.Dv
        q, k, v = act_BTC.split([Hk * Dk, Hk * Dk, Hv * Dv], dim=-1)
        wt = work_dtype(q.dtype)
        q_BHkTDk, k_BHkTDk = (self.l2norm(t.view(B, T, Hk, Dk).transpose(1, 2).to(wt), ew) for t in (q, k))
        q_BHkTDk = q_BHkTDk * Dk ** -0.5
        v_BHvTDv = v.view(B, T, Hv, Dv).transpose(1, 2)
        beta_BHvT = ew(torch.sigmoid, b_BTHv).transpose(1, 2).to(wt)
        g_BHvT = (-self.A_log.float().exp() * ew(F.softplus, a_BTHv.float() + self.dt_bias)).transpose(1, 2).to(wt)
        if valid_BT is not None:  # hidden tokens: no decay and no write
            keep_B1T = valid_BT[:, None, :]
            beta_BHvT, g_BHvT = beta_BHvT * keep_B1T, g_BHvT * keep_B1T
        state0 = zero_state(B, Hv, Dk, Dv, wt, v.device) if fresh else cache.state
        if T == 1:
            o_BHvDv, state = delta_rule_step(q_BHkTDk[:, :, 0], k_BHkTDk[:, :, 0], v_BHvTDv[:, :, 0],
                                             g_BHvT[:, :, 0], beta_BHvT[:, :, 0], state0.to(wt), ew)
            o_BHvTDv = o_BHvDv[:, :, None]
        else:
            o_BHvTDv, state = delta_rule_chunked(q_BHkTDk, k_BHkTDk, v_BHvTDv, g_BHvT, beta_BHvT, state0)
        if cache is not None:
            active = plan.active_rows if span.row_slots_B is not None else None
            cache.update(window_BCW[:, :, window_BCW.shape[2] - (self.K - 1):], state, active)
        return o_BHvTDv.transpose(1, 2)

    @staticmethod
    def l2norm(x, ew):
        return x * ew(torch.rsqrt, (x * x).sum(-1, keepdim=True) + L2_EPS)

    def forward(self, x_BTD, plan, rope_BT) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        mixed_BTC, z_BTHvDv, b_BTHv, a_BTHv = self.project(x_BTD, plan.numerics)
        outs = []
        for span in plan.spans:
            a, b = span.a, span.b
            outs.append(self.mix(mixed_BTC[:, a:b], b_BTHv[:, a:b], a_BTHv[:, a:b], span, plan))
        if plan.padded_from < T:
            outs.append(x_BTD.new_zeros(B, T - plan.padded_from, self.Hv, self.Dv))
        o_BTHvDv = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        gated = self.norm(o_BTHvDv).float() * plan.numerics.ew(F.silu, z_BTHvDv.float())
        return project(self.out_proj, gated.to(x_BTD.dtype).reshape(B, T, -1), plan.numerics)
