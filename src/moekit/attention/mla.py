"""Multi-head latent attention (DeepSeek-V2/V3, Kimi K2), as transformers' DeepseekV3Attention:

    q = q_b_proj(RMSNorm(q_a_proj(x)))  (or q_proj(x) when q_lora_rank is None), per head [nope | rope]
    latent, k_rope = kv_a_proj_with_mqa(x) split (C, R);  latent = RMSNorm(latent)
    k_nope, v = kv_b_proj(latent) per head (N, V);  k = [k_nope | k_rope shared by every head]
    RoPE on the rope parts only (rotate-half, or DeepSeek's interleaved pairs: cfg.rope_interleave)
    softmax scale (N + R)^-0.5, times YaRN's mscale(factor, mscale_all_dim)^2 when set

The layer cache holds only the latent and the rotated shared key (cache.LatentLayerCache: C + R
values per token). `attend` expands k/v from the cached latent, or (`absorb`; by default for
one-token decode steps) folds kv_b_proj into the query and the output instead (scores q_nope W_uk . latent, output W_uv . probs
latent), which never builds per-head keys (same values up to rounding).

Legend: B batch, T new tokens, S keys, D model dim, H heads, C latent dim (kv_lora_rank),
R rotary dim (qk_rope_head_dim), N non-rotary q/k dim (qk_nope_head_dim), V value dim, Q q_lora_rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import LatentLayerCache
from ..moe.weights import project, project_all
from ..norm import RMSNorm
from ..numerics import PLAIN
from ..rope import apply_rope
from .base import attend_spans, refuse_fields, register_attention

LORA_NORM_EPS = 1e-6  # transformers' q_a_layernorm / kv_a_layernorm eps (not rms_norm_eps)


def yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def softmax_scale(cfg) -> float:
    """(N + R)^-0.5, times mscale(factor, mscale_all_dim)^2 under scaled RoPE with mscale_all_dim."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    scaling = cfg.rope_scaling or {}
    if scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    return scale


@register_attention("mla")
class MLAttention(nn.Module):
    # True: fold kv_b_proj into q and the output instead of expanding k/v; False: expand; None (default):
    # absorbed for one-token decode steps outside batch-invariant numerics (3.8x the decode speed at a
    # 2048-token context, benchmarks/results/mla_decode_cpu.md), expanded for prompts and training
    absorb = None

    @classmethod
    def default_head_dim(cls, cfg) -> int:
        return cfg.qk_rope_head_dim  # the rotary dim, as transformers' DeepSeek-V3 config sets head_dim

    @classmethod
    def check(cls, cfg) -> None:
        refuse_fields(cfg, ("rotary_dim",), "mla", "applies to attention='gqa' (MLA's rotary dim is qk_rope_head_dim)")
        for n in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            value = getattr(cfg, n)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{n} must be a positive integer for attention='mla', got {value!r}")
        q = cfg.q_lora_rank
        if q is not None and (not isinstance(q, int) or isinstance(q, bool) or q <= 0):
            raise ValueError(f"ModelConfig.q_lora_rank must be None or a positive integer, got {q!r}")
        if cfg.head_dim != cfg.qk_rope_head_dim:
            raise ValueError(f"attention='mla': head_dim={cfg.head_dim} must equal qk_rope_head_dim="
                             f"{cfg.qk_rope_head_dim} (the rotary dim)")
        if cfg.n_kv_heads != cfg.n_heads:
            raise ValueError(f"attention='mla' gives every head its own key: n_kv_heads={cfg.n_kv_heads} "
                             f"must equal n_heads={cfg.n_heads}")
        if cfg.qk_norm is not None or cfg.clip_qkv is not None:
            raise ValueError(f"attention='mla' has no qk_norm={cfg.qk_norm!r} / clip_qkv={cfg.clip_qkv!r}")

    def __init__(self, cfg, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, D, Q, C = cfg.n_heads, cfg.d_model, cfg.q_lora_rank, cfg.kv_lora_rank
        N, R, V = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        bias = cfg.attention_bias  # transformers: on q_a_proj, kv_a_proj_with_mqa and o_proj
        if Q is None:
            self.q_proj = nn.Linear(D, H * (N + R), bias=False)
        else:
            self.q_a_proj = nn.Linear(D, Q, bias=bias)
            self.q_a_layernorm = RMSNorm(Q, LORA_NORM_EPS)
            self.q_b_proj = nn.Linear(Q, H * (N + R), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, C + R, bias=bias)
        self.kv_a_layernorm = RMSNorm(C, LORA_NORM_EPS)
        self.kv_b_proj = nn.Linear(C, H * (N + V), bias=False)
        self.o_proj = nn.Linear(H * V, D, bias=bias)
        self.scale = softmax_scale(cfg)
        scaling = cfg.rope_scaling or {}
        self.rope_factor = float(scaling.get("attention_factor", 1.0))  # transformers' cos/sin scale

    def new_cache(self, batch: int, max_len: int, dtype, device) -> LatentLayerCache:
        cfg = self.cfg
        return LatentLayerCache.allocate(batch, max_len, cfg.kv_lora_rank, cfg.qk_rope_head_dim, dtype, device)

    def rope(self, x_BHTR, cos_BTR, sin_BTR):
        if self.cfg.rope_interleave:  # pairs (x0, x1), (x2, x3)...: rotate-half of [evens | odds]
            x_BHTR = torch.cat([x_BHTR[..., 0::2], x_BHTR[..., 1::2]], dim=-1)
        out = apply_rope(x_BHTR, cos_BTR, sin_BTR)
        return out if self.rope_factor == 1.0 else out * self.rope_factor

    def project(self, x_BTD, cos_BTR, sin_BTR, numerics=PLAIN):
        """q (B, H, T, N + R) with RoPE on its last R dims; the normed latent (B, 1, T, C) and the
        rotated shared key (B, 1, T, R): what the cache keeps."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        N, R, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        q_in = self.q_proj if cfg.q_lora_rank is None else self.q_a_proj
        q, kv_a = project_all((q_in, self.kv_a_proj_with_mqa), x_BTD, numerics)
        if cfg.q_lora_rank is not None:
            q = project(self.q_b_proj, self.q_a_layernorm(q), numerics)
        q_BHTK = q.view(B, T, cfg.n_heads, N + R).transpose(1, 2)
        q_nope_BHTN, q_rot_BHTR = q_BHTK.split([N, R], dim=-1)
        latent_BTC, k_rot_BTR = kv_a.split([C, R], dim=-1)
        latent_B1TC = self.kv_a_layernorm(latent_BTC)[:, None]
        k_rot_B1TR = self.rope(k_rot_BTR[:, None], cos_BTR, sin_BTR)
        q_BHTK = torch.cat([q_nope_BHTN, self.rope(q_rot_BHTR, cos_BTR, sin_BTR)], dim=-1)
        return q_BHTK, latent_B1TC, k_rot_B1TR

    def expand(self, latent_B1SC, k_rot_B1SR):
        """Per-head keys (B, H, S, N + R) and values (B, H, S, V) from the latent."""
        cfg = self.cfg
        B, _, S, _ = latent_B1SC.shape
        kv_BHSX = self.kv_b_proj(latent_B1SC[:, 0]).view(B, S, cfg.n_heads, -1).transpose(1, 2)
        k_nope_BHSN, v_BHSV = kv_BHSX.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k_BHSK = torch.cat([k_nope_BHSN, k_rot_B1SR.expand(-1, cfg.n_heads, -1, -1)], dim=-1)
        return k_BHSK, v_BHSV

    def attend(self, q_BHTK, state, span, numerics) -> torch.Tensor:
        latent_B1SC, k_rot_B1SR = state
        absorb = self.absorb if self.absorb is not None else q_BHTK.shape[2] == 1 and not numerics.batch_invariant
        if absorb:
            return self.attend_absorbed(q_BHTK, latent_B1SC, k_rot_B1SR, span.mask_B1TS)
        k_BHSK, v_BHSV = self.expand(latent_B1SC, k_rot_B1SR)
        if numerics.matmul_attention(q_BHTK, span.mask_B1TS):
            scores_BHTS = torch.matmul(q_BHTK, k_BHSK.transpose(-1, -2)) * self.scale
            scores_BHTS = scores_BHTS.masked_fill(~span.mask_B1TS, float("-inf"))
            return torch.matmul(torch.softmax(scores_BHTS, dim=-1), v_BHSV)
        causal = span.mask_B1TS is None and q_BHTK.shape[2] > 1
        return F.scaled_dot_product_attention(q_BHTK, k_BHSK, v_BHSV, attn_mask=span.mask_B1TS,
                                              is_causal=causal, scale=self.scale)

    def attend_absorbed(self, q_BHTK, latent_B1SC, k_rot_B1SR, mask_B1TS) -> torch.Tensor:
        """The same attention without per-head keys/values: q_nope through W_uk into the latent
        space, scores against the cached latent, the output back through W_uv."""
        cfg = self.cfg
        H, N, C = cfg.n_heads, cfg.qk_nope_head_dim, cfg.kv_lora_rank
        T, S = q_BHTK.shape[2], latent_B1SC.shape[2]
        w_HXC = self.kv_b_proj.weight.view(H, N + cfg.v_head_dim, C)
        w_uk_HNC, w_uv_HVC = w_HXC[:, :N], w_HXC[:, N:]
        q_nope_BHTN, q_rot_BHTR = q_BHTK.split([N, cfg.qk_rope_head_dim], dim=-1)
        q_lat_BHTC = torch.einsum("bhtn,hnc->bhtc", q_nope_BHTN, w_uk_HNC)
        scores_BHTS = (torch.matmul(q_lat_BHTC, latent_B1SC.transpose(-1, -2))
                       + torch.matmul(q_rot_BHTR, k_rot_B1SR.transpose(-1, -2))) * self.scale
        if mask_B1TS is None and T > 1:  # causal over the new tokens (the last T of S)
            mask_B1TS = torch.ones(T, S, dtype=torch.bool, device=q_BHTK.device).tril(S - T)[None, None]
        if mask_B1TS is not None:
            scores_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf"))
        out_lat_BHTC = torch.matmul(torch.softmax(scores_BHTS, dim=-1), latent_B1SC)
        return torch.einsum("bhtc,hvc->bhtv", out_lat_BHTC, w_uv_HVC)

    def forward(self, x_BTD, plan, rope_BT) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTK, latent_B1TC, k_rot_B1TR = self.project(x_BTD, *rope_BT, plan.numerics)
        out_BHTV = attend_spans(plan, self.layer_idx, q_BHTK, (latent_B1TC, k_rot_B1TR), self.attend)
        return project(self.o_proj, out_BHTV.transpose(1, 2).reshape(B, T, -1), plan.numerics)
