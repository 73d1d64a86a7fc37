"""MoE layer = router + routed experts (+ shared experts).

    y, aux = moe(x, token_ids=None, numerics=PLAIN, static=False, active_rows=None)   # (..., D)
    y, aux = moe(x, forced_experts=ids, routed=sink)   # replay ids (..., K); sink.append(ids (rows, K))

`token_ids`: for router='hash'. `static=True`: the compiled decode step (no host syncs, no
input checks, aux is None). `active_rows`: routed experts for these rows only. In eval mode
the balancing losses are skipped (`aux.loss` 0, the values None); in training mode the layer
accumulates per-expert token counts for `update_expert_bias()`, called after the optimizer step.
`forced_experts` (..., K): routing replay, these experts for each token (a row of -1: the router's
choice), gates from the router; `routed` (a list): the layer appends its chosen ids (T, K), the
padding rows of a static batch included (an output of the compiled step, no side effect outside).

Data parallelism (moekit.dist.ep) sets `global_sum(t)`, a sum over the data-parallel ranks
with autograd: the training-mode balancing losses and counts become those of the global batch.
It is None in one process, and expert parallelism replaces `experts` by a module with the same
call signature, so the single-process path never touches torch.distributed.

Legend: T tokens, D model dim, E experts, P (token, expert) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..numerics import PLAIN, Numerics
from . import balancing
from .config import MoEConfig
from .experts import Experts
from .ffn import SwiGLU
from .router import Routing, build_router, check_forced, topk_routing
from .weights import project


@dataclass
class MoEAux:
    loss: torch.Tensor  # scalar: aux_loss_coef*switch + seq_aux_loss_coef*seq + z_loss_coef*z (0 in eval mode)
    tokens_per_expert: torch.Tensor  # (E,) int64, this call
    switch_loss: Optional[torch.Tensor]  # unweighted E * sum f_i P_i (1.0 when uniform); None in eval mode
    seq_aux_loss: Optional[torch.Tensor]  # unweighted DeepSeek sequence-wise loss (1.0 when uniform); None in eval
    z_loss: Optional[torch.Tensor]  # unweighted mean logsumexp^2; None in eval mode
    routing: Routing  # the pairs, gates and router outputs of this call


class MoE(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise ValueError(f"MoE expects a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = Experts(cfg)
        self.shared = SwiGLU(cfg.d_model, cfg.shared_dim) if cfg.num_shared_experts > 0 else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate else None
        # token counts since the last aux-loss-free bias update (training forwards only)
        self.register_buffer("tokens_since_update", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=True)
        self.global_sum = None  # moekit.dist.ep.apply_global_balancing

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None, numerics: Numerics = PLAIN,
                static: bool = False, active_rows: Optional[torch.Tensor] = None,
                forced_experts: Optional[torch.Tensor] = None, routed: Optional[list] = None):
        cfg = self.cfg
        if not static:
            self.check_inputs(x, token_ids)
        x_TD = x.reshape(-1, cfg.d_model)
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)
        if forced_experts is None:
            routing = self.router(x_TD, token_ids_T, numerics)
        else:
            forced_TK = forced_experts.reshape(-1, forced_experts.shape[-1])
            if not static:
                check_forced(forced_TK, x_TD.shape[0], cfg.num_experts, cfg.top_k)
            routing = self.router(x_TD, token_ids_T, numerics, forced_TK)
        if routed is not None:
            if routing.expert_idx_TK is None:
                raise ValueError(f"recording routed experts needs K experts per token; router={cfg.router!r}"
                                 f"{' with token_rounding' if cfg.token_rounding else ''} varies the count")
            routed.append(routing.expert_idx_TK)
        if active_rows is None:
            y_TD = self.experts(x_TD, routing, numerics, static)
        else:  # only these rows need the routed experts (the others pad a static batch)
            picked = topk_routing(self.router, routing.expert_idx_TK.index_select(0, active_rows),
                                  routing.gates_TK.index_select(0, active_rows), None)
            y_RD = self.experts(x_TD.index_select(0, active_rows), picked, numerics, static)
            y_TD = torch.zeros_like(x_TD).index_copy(0, active_rows, y_RD)
        if self.shared is not None:
            shared_TD = self.shared(x_TD, numerics)
            if self.shared_gate is not None:  # Qwen2-MoE: sigmoid(x @ g) * shared(x)
                shared_TD = numerics.ew(torch.sigmoid, project(self.shared_gate, x_TD, numerics)) * shared_TD
            y_TD = y_TD + shared_TD
        if static:
            return y_TD.view(x.shape), None
        tokens_per_expert = torch.bincount(routing.expert_idx_P, minlength=cfg.num_experts)
        reduce = self.global_sum if self.training else None  # eval forwards stay local
        if reduce is not None:
            tokens_per_expert = reduce(tokens_per_expert)
        if self.training:
            self.tokens_since_update += tokens_per_expert.to(self.tokens_since_update.device)
        seq_len = x.shape[-2] if x.dim() >= 2 else 1
        return y_TD.view(x.shape), self._aux(routing, tokens_per_expert, seq_len, reduce)

    def check_inputs(self, x: torch.Tensor, token_ids: Optional[torch.Tensor]) -> None:
        cfg = self.cfg
        if x.dim() < 1 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE expects input of shape (..., d_model={cfg.d_model}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE expects a floating-point input, got dtype {x.dtype}")
        weight_dtype = self.router.weight.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"MoE input dtype {x.dtype} does not match the weights' dtype {weight_dtype}; "
                f"convert the module (moe.to({x.dtype})) or run under torch.autocast"
            )
        num_tokens = x.numel() // cfg.d_model
        if token_ids is not None and token_ids.numel() != num_tokens:
            raise ValueError(f"token_ids has {token_ids.numel()} ids but x has {num_tokens} tokens")
        self.router.check_inputs(x.reshape(-1, cfg.d_model), None if token_ids is None else token_ids.reshape(-1))

    def _aux(self, routing: Routing, tokens_per_expert: torch.Tensor, seq_len: int, reduce=None) -> MoEAux:
        cfg = self.cfg
        device = tokens_per_expert.device
        zero = torch.zeros((), device=device, dtype=torch.float32)
        if not self.training:  # inference: no balancing losses (keeps decoding cheap)
            return MoEAux(zero, tokens_per_expert, None, None, None, routing)
        switch = seq = z = zero
        total = zero
        # with `reduce`, every rank joins the collectives, even with no tokens of its own
        if routing.logits_TE is not None and (routing.num_tokens > 0 or reduce is not None):
            grad = torch.is_grad_enabled()
            with torch.set_grad_enabled(grad and (cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0)):
                probs_TE = routing.probs()
            with torch.set_grad_enabled(grad and cfg.aux_loss_coef > 0):
                switch = balancing.switch_loss(probs_TE, routing.top1_T, reduce)
            with torch.set_grad_enabled(grad and cfg.seq_aux_loss_coef > 0):
                seq = balancing.sequence_aux_loss(probs_TE, routing.token_idx_P, routing.expert_idx_P, seq_len,
                                                  cfg.top_k, reduce)
            with torch.set_grad_enabled(grad and cfg.z_loss_coef > 0):
                z = balancing.z_loss(routing.logits_TE, reduce)
            total = cfg.aux_loss_coef * switch + cfg.seq_aux_loss_coef * seq + cfg.z_loss_coef * z
        return MoEAux(total, tokens_per_expert, switch, seq, z, routing)

    @torch.no_grad()
    def update_expert_bias(self, gamma: Optional[float] = None) -> torch.Tensor:
        """Aux-loss-free step from the counts of training forwards since the last call (then reset);
        call after `optimizer.step()`. Returns the counts used (global under `global_sum`: every
        data-parallel rank then applies the same update)."""
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        load_E = self.tokens_since_update.clone()
        if load_E.sum() > 0:
            balancing.bias_update(self.router.expert_bias, load_E, gamma)
        self.tokens_since_update.zero_()
        return load_E

    def extra_repr(self) -> str:
        c = self.cfg
        return f"router={c.router!r}, top_k={c.top_k}, num_shared_experts={c.num_shared_experts}"


def update_expert_biases(model: nn.Module, gamma: Optional[float] = None) -> int:
    """`update_expert_bias` on every MoE layer of `model` (after `optimizer.step()`); returns how many."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    for moe in layers:
        moe.update_expert_bias(gamma)
    return len(layers)
