"""Expert parallelism and global balancing: transforms of a built single-device model.

    apply_expert_parallel(model, meshes.ep)     # each rank keeps E/ep routed experts
    apply_global_balancing(model, meshes.dp)    # balancing losses, load counts, bias over all ranks

Expert parallelism. EP rank j holds experts [j*E/ep, (j+1)*E/ep): `experts.w13` and
`experts.w2` become DTensors on the ep mesh with placement Shard(0) (global shape (E, ...), so
state-dict keys and shapes stay those of one process and DCP can reshard between EP degrees).
`moe.experts` becomes an `ExpertParallel` module (an `Experts` with the same parameter names
and call signature, so FSDP's hooks on it run as usual). One forward:

    1. pairs sorted by expert; counts_E per expert
    2. all_to_all of counts_E (E/ep per destination): counts_SJ, rows from source s for my expert j
    3. all_to_all (uneven splits, autograd) of the pairs' token rows X[tok] and their gates
    4. the local grouped backend on the received rows (one pair each, local expert ids
       rebuilt from counts_SJ, nothing more is sent)
    5. reverse all_to_all (autograd) of the gate-weighted outputs, per-token sum (`SumPerToken`)

Saved for backward on each rank: what the backend keeps for the received rows (grouped: the
received X (R, D), H (R, 2F), the gates and integer sort metadata), the pairs' sort (int64) and
nothing else: the gathered and exchanged rows are temporaries, the gather and the per-token sum
keep only indices, the all-to-alls only their split sizes. Measured in tests/test_dist_ep.py;
at T=512 tokens per rank, D=128, F=32, E=64, K=8, ep=2, fp32: 3.28 MB per rank (received X
2.09 MB for 4080 rows, H 1.04 MB) against 1.39 MB for one process on 512 tokens. Rows travel
per pair, so the received X is about K*D per token, not D.

Every forward of an EP model, training or eval, is a collective over the EP group: all its
ranks must run it (with batches of any sizes, empty included). No static plan (compiled
decode) and no batch-invariant numerics under EP: those raise ValueError.

Gradients reach x and the gates (so the router) through the reverse all-to-alls, and w13/w2 of
each rank's own experts from the tokens of the whole EP group: an expert gradient is the sum
over the EP group's local losses. FSDP therefore divides expert gradients by the whole
data-parallel size, not by the size of `dp_mod_ep` (torchtitan's gradient divide factor).

Global balancing. With data parallelism each rank sees part of the global batch. In training
mode `GlobalSum` (an all-reduce over the dp mesh, with autograd: its backward sums the
gradients of all ranks) makes `aux.tokens_per_expert`, the Switch loss's f_i and P_i, the
sequence-wise and z losses those of the global batch, identical on every rank; the token counts
that feed the aux-loss-free update are global, so every rank applies the same bias. Each rank's
gradient of `aux.loss` is (dp size) x its own tokens' share, so averaging gradients over the dp
ranks (FSDP's default) gives one process's gradient. Eval-mode forwards skip these
all-reduces (without EP, rank 0 may run one alone). expert_choice routing and token rounding
select within each rank's batch, so they are not equal to one process.

Legend: T tokens, D model dim, E experts, J experts per rank, S source/destination ranks,
P pairs sent, R rows received.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from ..moe.experts import Experts, get_backend
from ..moe.grouped import experts_grouped
from ..moe.layer import MoE
from ..moe.weights import dense
from ..numerics import PLAIN, Numerics


def local(w: torch.Tensor) -> torch.Tensor:
    """This rank's part of a (possibly DTensor) weight; the gradient flows back to the DTensor."""
    return w.to_local() if isinstance(w, DTensor) else w


def exchange(t: torch.Tensor, recv: list, send: list, group) -> torch.Tensor:
    """all_to_all_single with uneven splits and autograd (the backward sends the gradients back);
    waited, so a plain tensor (not an AsyncCollectiveTensor) goes on."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(t.contiguous(), recv, send, group))


class SumPerToken(torch.autograd.Function):
    """out[t] = sum of y_PD over the pairs of token t; saves only the token index (index_add's own
    backward would keep y_PD, the combined per-pair outputs)."""

    @staticmethod
    def forward(ctx, y_PD, tok_P, num_tokens: int):
        ctx.save_for_backward(tok_P)
        return y_PD.new_zeros(num_tokens, y_PD.shape[1]).index_add_(0, tok_P, y_PD)

    @staticmethod
    def backward(ctx, dout_TD):
        (tok_P,) = ctx.saved_tensors
        return dout_TD.index_select(0, tok_P), None, None


class ExpertParallel(Experts):
    """`Experts` whose routed computation runs over an EP group: same parameters (w13, w2 as
    Shard(0) DTensors), backend settings and call signature; it replaces `moe.experts`."""

    def __init__(self, experts: Experts, ep_mesh):
        nn.Module.__init__(self)  # the weights come from `experts`, nothing to allocate
        if not experts.plain:
            raise ValueError(f"expert parallelism runs plain SwiGLU experts; this layer has {experts.features()}")
        self.size = ep_mesh.size()
        self.group = ep_mesh.get_group()
        self.num_local = experts.w13.shape[0] // self.size
        for name in ("w13", "w2"):
            w = getattr(experts, name)
            setattr(self, name, nn.Parameter(distribute_tensor(w.detach(), ep_mesh, [Shard(0)]),
                                             requires_grad=w.requires_grad))
        self.impl, self.layout = experts.impl, experts.layout

    def forward(self, x_TD: torch.Tensor, routing, numerics: Numerics = PLAIN, static: bool = False) -> torch.Tensor:
        if static or numerics.batch_invariant:
            raise ValueError("expert parallelism runs eager forwards only "
                             "(no static plan, no batch-invariant numerics)")
        device_type = x_TD.device.type
        if torch.is_autocast_enabled(device_type):
            x_TD = x_TD.to(torch.get_autocast_dtype(device_type))
        dtype, S, J = x_TD.dtype, self.size, self.num_local
        w13_JFD, w2_JDF = dense(local(self.w13), dtype=dtype), dense(local(self.w2), dtype=dtype)

        order_P = torch.argsort(routing.expert_idx_P, stable=True)
        tok_P = routing.token_idx_P[order_P]
        counts_E = torch.bincount(routing.expert_idx_P, minlength=S * J)
        counts_SJ = funcol.all_to_all_single(counts_E, None, None, self.group).view(S, J)
        send = counts_E.view(S, J).sum(1).tolist()
        recv = counts_SJ.sum(1).tolist()

        x_RD = exchange(x_TD.index_select(0, tok_P), recv, send, self.group)
        gates_R = exchange(routing.gates_P[order_P], recv, send, self.group)
        expert_R = torch.arange(J, device=x_TD.device).repeat(S).repeat_interleave(counts_SJ.reshape(-1))
        row_R = torch.arange(expert_R.numel(), device=x_TD.device)
        if self.impl == "grouped":
            y_RD = experts_grouped(x_RD, w13_JFD, w2_JDF, gates_R, row_R, expert_R, self.layout)
        else:
            y_RD = get_backend(self.impl)(x_RD, w13_JFD, w2_JDF, gates_R, row_R, expert_R)
        y_PD = exchange(y_RD, send, recv, self.group)
        return SumPerToken.apply(y_PD, tok_P, x_TD.shape[0])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ep={self.size}, experts_per_rank={self.num_local}"


class GlobalSum:
    """Sum over the data-parallel ranks (autograd: the backward sums every rank's gradient)."""

    def __init__(self, dp_mesh):
        self.group = dp_mesh.get_group()

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return funcol.wait_tensor(funcol.all_reduce(t, "sum", self.group))


def moe_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, MoE)]


def apply_expert_parallel(model: nn.Module, ep_mesh) -> nn.Module:
    """In place: every MoE layer keeps its rank's E/ep experts and exchanges tokens by all-to-all.
    A no-op for an EP group of one. Call before FSDP (the weights become Shard(0) DTensors)."""
    ep = ep_mesh.size()
    if ep == 1:
        return model
    for moe in moe_layers(model):
        E = moe.cfg.num_experts
        if E % ep:
            raise ValueError(f"num_experts={E} is not divisible by --ep {ep}")
        if isinstance(moe.experts, ExpertParallel):
            raise ValueError("apply_expert_parallel was already applied to this model")
        moe.experts = ExpertParallel(moe.experts, ep_mesh)
    return model


def apply_global_balancing(model: nn.Module, dp_mesh) -> nn.Module:
    """In place: training-mode balancing losses, token counts and the bias update of every MoE
    layer use the global batch over `dp_mesh`. A no-op for one data-parallel rank."""
    if dp_mesh.size() == 1:
        return model
    for moe in moe_layers(model):
        moe.global_sum = GlobalSum(dp_mesh)
    return model
