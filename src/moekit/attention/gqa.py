"""Grouped-query attention: MHA (G = H), GQA, MQA (G = 1); q/k RMSNorm per head (Qwen3) or over
the whole projection (OLMoE), q/k/v bias (Qwen2-MoE), clipping (OLMoE), rotate-half RoPE on the whole head or
on its first rope_dim dims (partial rotary: GLM-4.5, MiniMax-M2), SDPA; gpt-oss's attention sinks
(a learned logit per head in each softmax, `math_attention`), o_proj bias and sliding-window layers
(cfg.window(i): the last W keys, the query's own included).
Its layer cache holds keys and values (cache.KVLayerCache); a sliding layer's holds only a ring of
about the window (cache.WindowKVCache), which also builds the mask over it.

Legend: B batch, T new tokens, S keys, D model dim, H heads, G KV heads, Dh head dim, R rotary dim (cfg.rope_dim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import KVLayerCache, WindowKVCache, window_visible
from ..moe.weights import project, project_all
from ..norm import RMSNorm
from ..numerics import PLAIN
from ..rope import apply_rope
from .base import MLA_FIELDS, attend_spans, math_attention, refuse_fields, register_attention
from .paged_cpu import PagedKV


@register_attention("gqa")
class GQAttention(nn.Module):
    supports_window = True
    supports_sinks = True
    supports_out_bias = True

    @classmethod
    def default_head_dim(cls, cfg) -> int:
        return cfg.d_model // cfg.n_heads if cfg.n_heads > 0 else 0

    @classmethod
    def check(cls, cfg) -> None:
        refuse_fields(cfg, MLA_FIELDS, "gqa", "only apply to attention='mla'")
        r = cfg.rotary_dim
        if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r <= 0 or r % 2 or r > cfg.head_dim):
            raise ValueError(f"ModelConfig.rotary_dim={r!r} must be an even positive integer <= head_dim={cfg.head_dim}")

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, G, Dh, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        # with an output gate (Qwen3-Next) q_proj emits, per head, the query then the gate: (H, 2 * Dh)
        self.q_proj = nn.Linear(D, H * Dh * (2 if cfg.attn_output_gate else 1), bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, G * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, G * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=cfg.attention_out_bias)
        self.sinks = nn.Parameter(torch.zeros(H)) if cfg.attention_sinks else None
        self.window = cfg.window(layer_idx)
        zc = cfg.zero_centred_norm
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.norm_eps, zc), RMSNorm(Dh, cfg.norm_eps, zc)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Dh, cfg.norm_eps, zc), RMSNorm(G * Dh, cfg.norm_eps, zc)
        else:
            self.q_norm = self.k_norm = None

    def new_cache(self, batch: int, max_len: int, dtype, device):
        cfg = self.cfg
        if self.window is not None:
            return WindowKVCache.allocate(batch, cfg.n_kv_heads, max_len, cfg.head_dim, self.window, dtype, device)
        return KVLayerCache.allocate(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device)

    def project(self, x_BTD, cos_BTR, sin_BTR, numerics=PLAIN):
        """Projections, qk-norm, clipping and RoPE (on the first R dims): q (B, H, T, Dh), k and v (B, G, T, Dh),
        and the output gate (B, T, H * Dh) or None."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q, k, v = project_all((self.q_proj, self.k_proj, self.v_proj), x_BTD, numerics)
        gate_BTE = None
        if cfg.attn_output_gate:
            q_BTH2Dh = q.view(B, T, cfg.n_heads, 2 * cfg.head_dim)
            q, gate_BTE = (t.reshape(B, T, -1) for t in q_BTH2Dh.split(cfg.head_dim, dim=-1))
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q_BTHDh = q.view(B, T, cfg.n_heads, cfg.head_dim)
        k_BTGDh = k.view(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q_BTHDh, k_BTGDh = self.q_norm(q_BTHDh), self.k_norm(k_BTGDh)
        q_BHTDh = apply_rope(q_BTHDh.transpose(1, 2), cos_BTR, sin_BTR)
        k_BGTDh = apply_rope(k_BTGDh.transpose(1, 2), cos_BTR, sin_BTR)
        v_BGTDh = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        return q_BHTDh, k_BGTDh, v_BGTDh, gate_BTE

    def attend(self, q_BHTDh, kv, span, numerics) -> torch.Tensor:
        if isinstance(kv, PagedKV):  # a decode step over the engine's pool, read in place (CPU kernel)
            return kv.attend(q_BHTDh, span.mask_B1TS, self.sinks)
        # a window cache returns its own mask; without a cache a sliding layer masks the new tokens here
        k_BGSDh, v_BGSDh, mask_B1TS = kv if len(kv) == 3 else (*kv, span.mask_B1TS)
        if self.window is not None and len(kv) == 2:
            slot_1T = torch.arange(q_BHTDh.shape[2], device=q_BHTDh.device)[None]
            visible_11TT = window_visible(slot_1T, slot_1T, self.window)[:, None]
            mask_B1TS = visible_11TT if mask_B1TS is None else visible_11TT & mask_B1TS
        if self.sinks is not None or numerics.matmul_attention(q_BHTDh, mask_B1TS):
            return math_attention(q_BHTDh, k_BGSDh, v_BGSDh, mask_B1TS, self.sinks)
        gqa = self.cfg.n_kv_heads != self.cfg.n_heads
        # no mask: causal for a block of new tokens; one token (decoding) sees every key up to itself
        causal = mask_B1TS is None and q_BHTDh.shape[2] > 1
        return F.scaled_dot_product_attention(q_BHTDh, k_BGSDh, v_BGSDh, attn_mask=mask_B1TS,
                                              is_causal=causal, enable_gqa=gqa)

    def forward(self, x_BTD, plan, rope_BT) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTDh, k_BGTDh, v_BGTDh, gate_BTE = self.project(x_BTD, *rope_BT, plan.numerics)
        out_BHTDh = attend_spans(plan, self.layer_idx, q_BHTDh, (k_BGTDh, v_BGTDh), self.attend, in_place=True)
        out_BTE = out_BHTDh.transpose(1, 2).reshape(B, T, -1)
        if gate_BTE is not None:
            out_BTE = out_BTE * torch.sigmoid(gate_BTE)
        return project(self.o_proj, out_BTE, plan.numerics)
