"""Decoder-only MoE transformer: RMSNorm, RoPE, GQA attention (SDPA), SwiGLU or MoE FFN.

    model = Transformer(ModelConfig.preset("tiny"))
    logits_BTV = model(tokens_BT)
    model.moe_aux()   # summed MoE aux loss and per-layer tokens per expert of the last forward

Numerics follow HF transformers' LLaMA-family code (RMSNorm in float32, rotate-half
RoPE), so checkpoints imported with `moekit.hf` give the same logits.

Incremental decoding: pass a `KVCache`, the absolute cache index `start` of the
first new token, per-token `positions_BT`, and `key_mask_BS` (False for padding
slots) when sequences are left-padded. `decode_step` is the static-shape variant of a
one-token forward (cache written at a slot tensor, attention over the whole cache
under a mask, no host syncs) that `generate(compile=True)` runs under torch.compile.

Legend: B batch, T new tokens, S cache/key length, D model dim, H heads, G KV heads,
Dh head dim, V vocab, L layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .moe import MoE
from .moe.ffn import SwiGLU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's numerics (float32 normalisation, then weight * x.to(dtype)) in one fused op
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies (Dh/2,), with the configured scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("type")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    elif kind == "yarn":
        factor = scaling["factor"]
        old_len = scaling.get("original_max_position_embeddings", 4096)
        beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

        def dim_at(rotations):
            return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

        low, high = max(math.floor(dim_at(beta_fast)), 0), min(math.ceil(dim_at(beta_slow)), dim - 1)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    return inv_freq.float()


def rope_cos_sin(inv_freq: torch.Tensor, positions_BT: torch.Tensor, dtype: torch.dtype):
    freqs_BTd = positions_BT.float()[..., None] * inv_freq.to(positions_BT.device)
    emb_BTDh = torch.cat([freqs_BTd, freqs_BTd], dim=-1)
    return emb_BTDh.cos().to(dtype), emb_BTDh.sin().to(dtype)


def apply_rope(x_BHTDh: torch.Tensor, cos_BTDh: torch.Tensor, sin_BTDh: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHTDh.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x_BHTDh * cos_BTDh[:, None] + rotated * sin_BTDh[:, None]


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: (L, B, G, S_max, Dh)."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device) -> "KVCache":
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        H, G, Dh, D = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_model
        self.q_proj = nn.Linear(D, H * Dh, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(D, G * Dh, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(D, G * Dh, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * Dh, D, bias=False)
        if cfg.qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(Dh, cfg.norm_eps), RMSNorm(Dh, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(H * Dh, cfg.norm_eps), RMSNorm(G * Dh, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def _qkv(self, x_BTD, cos_BTDh, sin_BTDh):
        """Projections, qk-norm, clipping and RoPE: q (B, H, T, Dh), k and v (B, G, T, Dh)."""
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.clip_qkv is not None:
            q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
        q_BHTDh = q.view(B, T, cfg.n_heads, cfg.head_dim)
        k_BGTDh = k.view(B, T, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "head":
            q_BHTDh, k_BGTDh = self.q_norm(q_BHTDh), self.k_norm(k_BGTDh)
        q_BHTDh = apply_rope(q_BHTDh.transpose(1, 2), cos_BTDh, sin_BTDh)
        k_BGTDh = apply_rope(k_BGTDh.transpose(1, 2), cos_BTDh, sin_BTDh)
        v_BGTDh = v.view(B, T, cfg.n_kv_heads, cfg.head_dim).transpose(1, 2)
        return q_BHTDh, k_BGTDh, v_BGTDh

    def forward(self, x_BTD, cos_BTDh, sin_BTDh, cache: Optional[KVCache] = None, start: int = 0,
                attn_mask_B1TS: Optional[torch.Tensor] = None):
        cfg = self.cfg
        B, T, _ = x_BTD.shape
        q_BHTDh, k_BGTDh, v_BGTDh = self._qkv(x_BTD, cos_BTDh, sin_BTDh)
        if cache is not None:
            end = start + T
            cache.k[self.layer_idx, :, :, start:end] = k_BGTDh
            cache.v[self.layer_idx, :, :, start:end] = v_BGTDh
            k_BGTDh, v_BGTDh = cache.k[self.layer_idx, :, :, :end], cache.v[self.layer_idx, :, :, :end]
        gqa = cfg.n_kv_heads != cfg.n_heads
        if attn_mask_B1TS is None:
            # no mask: causal for a block of queries; one query (decoding) sees every key up to itself
            out = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, is_causal=T > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q_BHTDh, k_BGTDh, v_BGTDh, attn_mask=attn_mask_B1TS, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward_static(self, x_BTD, cos_BTDh, sin_BTDh, k_BGSDh, v_BGSDh, slot_T, attn_mask_B1TS):
        """Static shapes: write k/v at cache slots `slot_T` (index_copy_), attend over all S slots with the mask."""
        B, T, _ = x_BTD.shape
        q_BHTDh, k_BGTDh, v_BGTDh = self._qkv(x_BTD, cos_BTDh, sin_BTDh)
        k_BGSDh.index_copy_(2, slot_T, k_BGTDh)
        v_BGSDh.index_copy_(2, slot_T, v_BGTDh)
        out = F.scaled_dot_product_attention(q_BHTDh, k_BGSDh, v_BGSDh, attn_mask=attn_mask_B1TS,
                                             enable_gqa=self.cfg.n_kv_heads != self.cfg.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def attention_mask(B: int, T: int, start: int, key_mask_BS: Optional[torch.Tensor], device) -> torch.Tensor:
    """(B, 1, T, S) bool: query start+i sees keys j <= start+i that are not padding (and always itself)."""
    S = start + T
    q_idx_T1 = torch.arange(start, S, device=device)[:, None]
    k_idx_1S = torch.arange(S, device=device)[None, :]
    allowed_BTS = (k_idx_1S <= q_idx_T1).expand(B, T, S)
    if key_mask_BS is not None:
        allowed_BTS = allowed_BTS & key_mask_BS[:, None, :S] | (k_idx_1S == q_idx_T1)
    return allowed_BTS[:, None]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = not cfg.is_dense_layer(layer_idx)
        self.ffn = MoE(cfg.moe.replace(causal=True)) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)
        self.last_aux = None

    def forward(self, x_BTD, cos, sin, cache=None, start=0, attn_mask_B1TS=None, token_ids_BT=None):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, cache, start, attn_mask_B1TS)
        h_BTD = self.ffn_norm(x_BTD)
        if self.is_moe:
            y_BTD, self.last_aux = self.ffn(h_BTD, token_ids=token_ids_BT)
        else:
            y_BTD = self.ffn(h_BTD)
        return x_BTD + y_BTD

    def forward_static(self, x_BTD, cos, sin, k_BGSDh, v_BGSDh, slot_T, attn_mask_B1TS, token_ids_BT):
        """`forward` for `Transformer.decode_step`: static shapes, no host syncs, no aux."""
        x_BTD = x_BTD + self.attn.forward_static(self.attn_norm(x_BTD), cos, sin, k_BGSDh, v_BGSDh, slot_T,
                                                 attn_mask_B1TS)
        h_BTD = self.ffn_norm(x_BTD)
        y_BTD = self.ffn.forward_static(h_BTD, token_ids_BT) if self.is_moe else self.ffn(h_BTD)
        return x_BTD + y_BTD


@dataclass
class ModelAux:
    loss: torch.Tensor  # summed MoE aux losses of the last forward
    tokens_per_expert: List[torch.Tensor]  # one (E,) tensor per MoE layer, in layer order


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if not isinstance(cfg, ModelConfig):
            raise ValueError(f"Transformer expects a ModelConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, SwiGLU):
                nn.init.normal_(module.w13, std=std)
                nn.init.normal_(module.w2, std=std)
            elif isinstance(module, MoE):
                for p in (module.router.weight, module.experts.w13, module.experts.w2):
                    nn.init.normal_(p, std=std)

    def forward(self, tokens_BT: torch.Tensor, positions_BT: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None, start: int = 0,
                key_mask_BS: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokens_BT.dim() != 2 or tokens_BT.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Transformer expects integer tokens of shape (B, T), got {tuple(tokens_BT.shape)} {tokens_BT.dtype}")
        B, T = tokens_BT.shape
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if tokens_BT.numel() and (tokens_BT.min() < 0 or tokens_BT.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size})")
        if positions_BT is None:
            positions_BT = torch.arange(start, start + T, device=tokens_BT.device).expand(B, T)
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; writing up to {start + T}")
        attn_mask_B1TS = None
        if key_mask_BS is not None or (cache is not None and T > 1 and start > 0):
            attn_mask_B1TS = attention_mask(B, T, start, key_mask_BS, tokens_BT.device)
        x_BTD = self.embed(tokens_BT)
        cos, sin = rope_cos_sin(self.inv_freq, positions_BT, x_BTD.dtype)
        for block in self.layers:
            x_BTD = block(x_BTD, cos, sin, cache, start, attn_mask_B1TS, tokens_BT)
        return self.lm_head(self.norm(x_BTD))

    def decode_step(self, tokens_B1: torch.Tensor, positions_B1: torch.Tensor, slot_1: torch.Tensor,
                    key_mask_BS: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        """One decoding step with static shapes (for torch.compile): logits (B, V) of the new tokens.

        tokens_B1 / positions_B1: the new token and its RoPE position per sequence; slot_1:
        the cache slot they are written to (a tensor, so the step does not change with it);
        key_mask_BS: False for padding slots; cache_k / cache_v: a KVCache's (L, B, G, S, Dh)
        tensors, written in place. Attention covers all S slots, masked to those <= slot_1
        and not padding. No input checks and no host syncs (the caller validates tokens);
        MoE layers route through `MoE.forward_static` and record no aux (`moe_aux()`).
        """
        S = cache_k.shape[3]
        visible_BS = (torch.arange(S, device=slot_1.device) <= slot_1) & key_mask_BS
        attn_mask_B11S = visible_BS[:, None, None, :]
        x_BTD = self.embed(tokens_B1)
        cos, sin = rope_cos_sin(self.inv_freq, positions_B1, x_BTD.dtype)
        for i, block in enumerate(self.layers):
            x_BTD = block.forward_static(x_BTD, cos, sin, cache_k[i], cache_v[i], slot_1, attn_mask_B11S, tokens_B1)
        return self.lm_head(self.norm(x_BTD))[:, -1]

    def moe_layers(self) -> List[MoE]:
        return [block.ffn for block in self.layers if block.is_moe]

    def moe_aux(self) -> ModelAux:
        """Summed aux loss and per-layer token counts of the last forward."""
        auxes = [block.last_aux for block in self.layers if block.is_moe and block.last_aux is not None]
        device = self.embed.weight.device
        loss = sum((a.loss for a in auxes), torch.zeros((), device=device))
        return ModelAux(loss, [a.tokens_per_expert for a in auxes])

    def num_params(self, active: bool = False) -> int:
        """Parameter count (tied weights once); active=True counts K of E routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for moe in self.moe_layers():
                c = moe.cfg
                per_expert = moe.experts.w13[0].numel() + moe.experts.w2[0].numel()
                total -= (c.num_experts - c.top_k) * per_expert
        return total
