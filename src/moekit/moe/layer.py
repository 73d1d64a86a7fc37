"""MoE layer = router + routed experts (+ shared experts).

    y, aux = moe(x)            # x: (..., D) -> y: (..., D)
    y, aux = moe(x, token_ids) # router='hash' routes by token id

`aux.loss` is the weighted sum of the enabled balancing losses; the unweighted
values are reported beside it. In eval mode (inference) the losses are skipped:
`aux.loss` is 0 and the individual values are None. In training mode the layer also accumulates
per-expert token counts for the aux-loss-free bias update, which the caller
applies explicitly with `moe.update_expert_bias()` after the optimizer step.

Legend: T tokens, D model dim, E experts, P (token, expert) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..config import MoEConfig
from . import balancing
from .decode import experts_static
from .experts import Experts
from .ffn import SwiGLU
from .router import Router, Routing


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
        self.router = Router(cfg)
        self.experts = Experts(cfg)
        self.shared = SwiGLU(cfg.d_model, cfg.shared_dim) if cfg.num_shared_experts > 0 else None
        self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False) if cfg.shared_gate else None
        # token counts since the last aux-loss-free bias update (training forwards only)
        self.register_buffer("tokens_since_update", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=True)

    def forward(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None):
        cfg = self.cfg
        if x.dim() < 1 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"MoE expects input of shape (..., d_model={cfg.d_model}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"MoE expects a floating-point input, got dtype {x.dtype}")
        weight_dtype = self.experts.w13.dtype
        if x.dtype != weight_dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"MoE input dtype {x.dtype} does not match the weights' dtype {weight_dtype}; "
                f"convert the module (moe.to({x.dtype})) or run under torch.autocast"
            )
        seq_len = x.shape[-2] if x.dim() >= 2 else 1
        x_TD = x.reshape(-1, cfg.d_model)
        if token_ids is not None and token_ids.numel() != x_TD.shape[0]:
            raise ValueError(f"token_ids has {token_ids.numel()} ids but x has {x_TD.shape[0]} tokens")

        routing = self.router(x_TD, token_ids)
        y_TD = self.experts(x_TD, routing.gates_P, routing.token_idx_P, routing.expert_idx_P)
        if self.shared is not None:
            y_TD = y_TD + self._shared(x_TD)

        tokens_per_expert = routing.tokens_per_expert(cfg.num_experts)
        if self.training:
            self.tokens_since_update += tokens_per_expert.to(self.tokens_since_update.device)
        aux = self._aux(routing, tokens_per_expert, seq_len, x.dtype)
        return y_TD.view(x.shape), aux

    def forward_static(self, x: torch.Tensor, token_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Inference with static shapes and no host syncs (torch.compile'd decoding): y only, no aux.

        K experts per token, so token_rounding (a data-dependent number of pairs) is not supported.
        No input checks: the caller validates (hash token ids must lie in the table).
        """
        x_TD = x.reshape(-1, self.cfg.d_model)
        expert_idx_TK, gates_TK = self.router.route_static(x_TD, token_ids)
        y_TD = experts_static(x_TD, self.experts.w13, self.experts.w2, gates_TK, expert_idx_TK)
        if self.shared is not None:
            y_TD = y_TD + self._shared(x_TD)
        return y_TD.view(x.shape)

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Shared experts, unweighted or (Qwen2-MoE) scaled by sigmoid(x @ g)."""
        shared_TD = self.shared(x_TD)
        if self.shared_gate is not None:
            shared_TD = torch.sigmoid(self.shared_gate(x_TD)) * shared_TD
        return shared_TD

    def _aux(self, routing: Routing, tokens_per_expert: torch.Tensor, seq_len: int, dtype) -> MoEAux:
        cfg = self.cfg
        device = tokens_per_expert.device
        zero = torch.zeros((), device=device, dtype=torch.float32)
        if not self.training:  # inference: no balancing losses (keeps decoding cheap)
            return MoEAux(zero, tokens_per_expert, None, None, None, routing)
        switch = seq = z = zero
        total = zero
        if routing.logits_TE is not None and routing.num_tokens > 0:
            grad = torch.is_grad_enabled()
            with torch.set_grad_enabled(grad and (cfg.aux_loss_coef > 0 or cfg.seq_aux_loss_coef > 0)):
                probs_TE = routing.probs()
            with torch.set_grad_enabled(grad and cfg.aux_loss_coef > 0):
                switch = balancing.switch_loss(probs_TE, routing.top1_T)
            with torch.set_grad_enabled(grad and cfg.seq_aux_loss_coef > 0):
                seq = balancing.sequence_aux_loss(probs_TE, routing.token_idx_P, routing.expert_idx_P, seq_len, cfg.top_k)
            with torch.set_grad_enabled(grad and cfg.z_loss_coef > 0):
                z = balancing.z_loss(routing.logits_TE)
            total = cfg.aux_loss_coef * switch + cfg.seq_aux_loss_coef * seq + cfg.z_loss_coef * z
        return MoEAux(total, tokens_per_expert, switch, seq, z, routing)

    @torch.no_grad()
    def update_expert_bias(self, gamma: Optional[float] = None) -> torch.Tensor:
        """Aux-loss-free balancing step: move `router.expert_bias` toward balanced load.

        Uses the token counts accumulated by training-mode forwards since the last
        call, then resets them. Call after `optimizer.step()`. Returns the counts used.
        """
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        load_E = self.tokens_since_update.clone()
        if load_E.sum() > 0:
            balancing.bias_update(self.router.expert_bias, load_E, gamma)
        self.tokens_since_update.zero_()
        return load_E

    def extra_repr(self) -> str:
        c = self.cfg
        return f"router={c.router!r}, top_k={c.top_k}, num_shared_experts={c.num_shared_experts}"
