"""Decoder-only MoE transformer with ONE forward for every path.

    model = Transformer(ModelConfig.preset("tiny"))
    logits_BTV = model(tokens_BT)                                   # training / scoring
    cache = model.new_cache(batch, max_len)
    logits_BTV = model(tokens_BT, cache=cache, start=0)             # prefill, then decode
    logits_BV = model.decode_step(tokens_B1, positions_B1, row_slots_B, valid_BS, cache)  # static step
    logits_RV = model.forward_plan(tokens_1N, plan)                  # any ForwardPlan (engine)
    logits_BTV = model(tokens_BT, routed_experts=ids_BTLK)           # replay routing (RL): L MoE layers
    ids_BTLK = model.routed_experts(tokens_BT)                       # the experts a forward chooses
    model.moe_aux()   # summed MoE aux loss and per-layer tokens per expert of the last forward

What differs between the paths is data, a `ForwardPlan` (plan.py). Each layer: norm, an
attention kind (attention/), norm, a dense SwiGLU or the MoE layer.

Numerics follow HF transformers' LLaMA-family code (RMSNorm in float32, rotate-half RoPE),
so checkpoints imported with `moekit.hf` give the same logits.

Legend: B batch, T new tokens, S cache slots, D model dim, V vocab, N rows of a ragged batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch
from torch import nn

from .attention import build_attention
from .cache import Cache
from .config import ModelConfig
from .moe import MoE
from .moe.ffn import SwiGLU
from .moe.weights import project, rows_alone
from .norm import RMSNorm
from .numerics import PLAIN, Numerics
from .plan import ForwardPlan, stack_routed
from .rope import rope_cos_sin, rope_inv_freq
from .runtime import forget_compiled, materialized


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.zero_centred_norm)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.zero_centred_norm)
        self.is_moe = not cfg.is_dense_layer(layer_idx)
        # this layer's index among the MoE layers (routed_experts' L axis)
        self.moe_index = sum(not cfg.is_dense_layer(i) for i in range(layer_idx)) if self.is_moe else None
        self.ffn = MoE(cfg.moe.replace(causal=True)) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)
        self.last_aux = None

    def forward(self, x_BTD, plan: ForwardPlan, rope_BT, token_ids_BT):
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), plan, rope_BT)
        h_BTD = self.ffn_norm(x_BTD)
        if self.is_moe:
            forced = None if plan.forced_experts is None else plan.forced_experts[..., self.moe_index, :]
            y_BTD, aux = self.ffn(h_BTD, token_ids_BT, plan.numerics, plan.static, plan.active_rows,
                                  forced_experts=forced, routed=plan.routed_experts)
            if not plan.static:  # (a static decode step has no aux: it changes no module, see runtime.Replay)
                self.last_aux = aux
        else:
            y_BTD = self.ffn(h_BTD, plan.numerics)
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
        # from an empty tensor: nn.Embedding's own init would be thrown away by reset_parameters
        self.embed = nn.Embedding.from_pretrained(torch.empty(cfg.vocab_size, cfg.d_model), freeze=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.zero_centred_norm)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("inv_freq", self.rope_inv_freq().to(self.embed.weight.device), persistent=False)
        self.reset_parameters()

    def rope_inv_freq(self) -> torch.Tensor:
        """On the CPU whatever the default device (arange on meta imports torch._dynamo: ~1 s)."""
        cfg = self.cfg
        with torch.device("cpu"):
            return rope_inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embed.weight.is_meta:  # built on meta to be loaded: nothing to fill (normal_ on meta
            return  # imports torch._dynamo, ~1 s)
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, SwiGLU):
                nn.init.normal_(module.w13, std=std)
                nn.init.normal_(module.w2, std=std)
            elif isinstance(module, MoE):
                for p in (module.router.weight, module.experts.w13, module.experts.w2):
                    nn.init.normal_(p, std=std)

    def new_cache(self, batch: int, max_len: int, dtype=None, device=None) -> Cache:
        """A cache for `batch` sequences of up to `max_len` positions: each layer's own kind."""
        weight = self.embed.weight
        dtype, device = dtype or weight.dtype, device or weight.device
        return Cache([block.attn.new_cache(batch, max_len, dtype, device) for block in self.layers])

    # ------------------------------------------------------------------ the one forward
    def forward(self, tokens_BT: torch.Tensor, positions_BT: Optional[torch.Tensor] = None,
                cache: Optional[Cache] = None, start: int = 0,
                key_mask_BS: Optional[torch.Tensor] = None,
                routed_experts: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits (B, T, V). With a `cache`, the new tokens are written at slots start.. and attend
        over the cache; `key_mask_BS` hides padding slots (left-padded batches). `routed_experts`
        (B, T, L, K) int: routing replay, token t goes to these experts in the l-th MoE layer (a row
        of -1: the router's choice), the gates still the router's for them (gradients flow)."""
        return self.forward_plan(tokens_BT, self.dense_plan(tokens_BT, positions_BT, cache, start, key_mask_BS,
                                                            routed_experts))

    def dense_plan(self, tokens_BT: torch.Tensor, positions_BT=None, cache=None, start: int = 0,
                   key_mask_BS=None, routed_experts=None) -> ForwardPlan:
        """`forward`'s plan, its arguments checked."""
        if tokens_BT.dim() != 2 or tokens_BT.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"Transformer expects integer tokens of shape (B, T), got {tuple(tokens_BT.shape)} "
                             f"{tokens_BT.dtype}")
        B, T = tokens_BT.shape
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        if tokens_BT.numel() and (tokens_BT.min() < 0 or tokens_BT.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, vocab_size={self.cfg.vocab_size})")
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"the cache holds {cache.max_len} positions; writing up to {start + T}")
        plan = ForwardPlan.dense(tokens_BT, positions_BT, cache, start, key_mask_BS)
        if routed_experts is not None:
            L, K = len(self.moe_layers()), self.cfg.moe.top_k
            if tuple(routed_experts.shape) != (B, T, L, K):
                raise ValueError(f"routed_experts must have shape (B={B}, T={T}, MoE layers={L}, top_k={K}), got "
                                 f"{tuple(routed_experts.shape)}")
            plan.forced_experts = routed_experts
        return plan

    @torch.no_grad()
    def routed_experts(self, tokens_BT: torch.Tensor, **kwargs) -> torch.Tensor:
        """(B, T, L, K) the experts each token goes to in each of the L MoE layers (the router's order)
        in the forward `self(tokens_BT, **kwargs)` (which it runs)."""
        plan = self.dense_plan(tokens_BT, **kwargs)
        plan.routed_experts = []
        self.forward_plan(tokens_BT, plan)
        return stack_routed(plan.routed_experts, tokens_BT.shape, tokens_BT.device)

    def forward_plan(self, tokens_BT: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        """The forward itself: logits (B, T, V); (R, 1, V) of `plan.active_rows` when set (static decode);
        (R, V) float of `plan.logits_rows` when set (ragged prefill)."""
        x_BTD = self.embed(tokens_BT)
        if plan.active_rows is not None:  # rows that only pad the bucket: zeros (the C matvec skips zero rows)
            x_BTD = torch.zeros_like(x_BTD).index_copy(0, plan.active_rows, x_BTD.index_select(0, plan.active_rows))
        if plan.rope_table is not None:
            positions_N = plan.positions_BT.reshape(-1)
            cos_BTDh, sin_BTDh = (t.index_select(0, positions_N).view(*plan.positions_BT.shape, -1)
                                  for t in plan.rope_table)
        else:
            cos_BTDh, sin_BTDh = rope_cos_sin(self.inv_freq, plan.positions_BT, x_BTD.dtype)
        for block in self.layers:
            x_BTD = block(x_BTD, plan, (cos_BTDh, sin_BTDh), tokens_BT)
        if plan.logits_rows is None and plan.active_rows is not None:
            return self.active_logits(x_BTD[:, -1], plan)[:, None]
        if plan.logits_rows is None:
            return project(self.lm_head, self.norm(x_BTD), plan.numerics)
        if not plan.logits_rows:
            return x_BTD.new_zeros(0, self.cfg.vocab_size, dtype=torch.float32)
        h_RD = plan.numerics.pad_rows(x_BTD[0, plan.logits_rows])
        return project(self.lm_head, self.norm(h_RD), plan.numerics)[: len(plan.logits_rows)].float()

    def active_logits(self, x_BD: torch.Tensor, plan: ForwardPlan) -> torch.Tensor:
        """(R, V) the logits of `plan.active_rows` (the static decode step's real rows). Where the head
        computes each row alone (moe/weights.rows_alone) it multiplies those R rows only; otherwise every row
        of the bucket, then picks them (a GEMM's result for a row follows the row count: batch invariance)."""
        h_BD = self.norm(x_BD)  # every row: the bucket's symbolic count (a lone row's would be a static 1)
        if rows_alone(self.lm_head, h_BD, plan.numerics):
            return project(self.lm_head, h_BD.index_select(0, plan.active_rows), plan.numerics)
        return project(self.lm_head, h_BD, plan.numerics).index_select(0, plan.active_rows)

    def decode_step(self, tokens_B1: torch.Tensor, positions_B1: torch.Tensor, row_slots_B: torch.Tensor,
                    valid_BS: torch.Tensor, cache: Cache, numerics: Numerics = PLAIN,
                    rope_table=None, static: bool = True, active_rows=None, routing: bool = False):
        """One decoding step with static shapes (for torch.compile): logits (B, V), or (R, V) of the R
        `active_rows` when given.

        Row b's new token (RoPE position positions_B1[b]) is written at cache slot row_slots_B[b]
        and attends over every slot s <= row_slots_B[b] with valid_BS[b, s] (False: padding).
        No input checks and no host syncs (the caller validates the tokens); no MoE aux.
        static=False runs the same plan with the eager kernels (host syncs allowed). `active_rows`
        (optional): the rows whose tokens are real; the others only pad the batch to its bucket: they
        start from zeros (which the C matvec skips), skip the routed experts and leave per-sequence state
        (recurrent layers) untouched, and only the real rows' logits are returned. routing=True: returns
        (logits, routed_BLK), each row's experts in the L MoE layers (an output of the step, so it works under
        torch.compile fullgraph).
        """
        S = cache.max_len
        # computed once (`materialized`): inductor would otherwise recompute it inside every layer's kernel that
        # reads it, one element at a time
        visible_BS = materialized((torch.arange(S, device=row_slots_B.device)[None, :] <= row_slots_B[:, None])
                                  & valid_BS)
        plan = ForwardPlan.static_decode(positions_B1, row_slots_B, visible_BS, cache, numerics, rope_table, static)
        plan.active_rows = active_rows
        plan.routed_experts = [] if routing else None
        logits = self.forward_plan(tokens_B1, plan)[:, -1]
        if not routing:
            return logits
        return logits, stack_routed(plan.routed_experts, tokens_B1.shape[:1], tokens_B1.device)

    # ------------------------------------------------------------------ MoE bookkeeping
    def moe_layers(self) -> List[MoE]:
        return [block.ffn for block in self.layers if block.is_moe]

    def moe_aux(self) -> ModelAux:
        """Summed aux loss and per-layer token counts of the last forward."""
        auxes = [block.last_aux for block in self.layers if block.is_moe and block.last_aux is not None]
        device = self.embed.weight.device
        loss = sum((a.loss for a in auxes), torch.zeros((), device=device))
        return ModelAux(loss, [a.tokens_per_expert for a in auxes])

    @property
    def token_limit(self) -> int:
        """Token ids must be below this: the vocabulary, or a smaller hash-router table."""
        limits = [moe.router.token_id_limit() for moe in self.moe_layers()]
        return min([self.cfg.vocab_size] + [n for n in limits if n is not None])

    def set_experts_impl(self, name: str, layout: Optional[str] = None) -> None:
        """Switch every MoE layer's expert backend (a runtime setting, never saved)."""
        for moe in self.moe_layers():
            moe.experts.set_impl(name, layout)
        forget_compiled(self)  # steps compiled with the old backend

    def num_params(self, active: bool = False) -> int:
        """Parameter count (tied weights once); active=True counts K of E routed experts."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for moe in self.moe_layers():
                c = moe.cfg
                ex = moe.experts
                per_expert = sum(w[0].numel() for w in (ex.w13, ex.w2, getattr(ex, "b13", None),
                                                          getattr(ex, "b2", None)) if w is not None)
                total -= (c.num_experts - c.top_k) * per_expert
        return total
