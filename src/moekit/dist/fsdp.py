"""Data parallelism as a transform of the single-device model (as torchtitan does):

    parallelize(model, meshes, layout)   # EP, global balancing, then FSDP2 fully_shard per block and at the root
    clip_grad_norm(model, max_norm)

Dense parameters (attention, norms, routers, shared experts, embeddings, head) are sharded with FSDP2 over
every data-parallel rank (`meshes.dp`; with dp_replicate > 1, HSDP over `meshes.fsdp`: replicated across
replicas, sharded within). Routed expert weights, already split over the EP group (moekit/dist/ep.py),
are sharded over the ranks that hold the same experts (`meshes.dp_mod_ep`, HSDP: `meshes.fsdp_ep`). FSDP
averages gradients over the data-parallel ranks; an expert's gradient sums the EP group's losses, so its
divide factor is the whole data-parallel size. Every rank must build the model with the same seed first.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from .ep import apply_expert_parallel, apply_global_balancing
from .mesh import Layout, Meshes


def parallelize(model: nn.Module, meshes: Meshes, layout: Layout) -> nn.Module:
    """In place (and returned): the model of one device becomes this rank's part of the parallel model."""
    apply_expert_parallel(model, meshes.ep)
    apply_global_balancing(model, meshes.dp)
    hsdp = layout.dp_replicate > 1
    dense_mesh = meshes.fsdp if hsdp else meshes.dp
    expert_mesh = meshes.fsdp_ep if hsdp else meshes.dp_mod_ep
    for block in model.layers:
        if block.is_moe and layout.ep > 1:  # the experts' own FSDP group (their weights live on the EP mesh)
            experts = fully_shard(block.ffn.experts, mesh=expert_mesh)
            experts.set_gradient_divide_factor(float(layout.dp))
            if layout.dp_shard_mod_ep > 1:  # sum, then divide (gloo has no PREMUL_SUM); with one shard rank
                experts.set_force_sum_reduction_for_comms(True)  # torch 2.13 would then divide twice
        fully_shard(block, mesh=dense_mesh)
    fully_shard(model, mesh=dense_mesh)
    return model


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a parallelized model, whose gradients are DTensors on several meshes
    (dense: the data-parallel mesh; experts: a mesh spanning the EP group too): the norm of the whole model's
    gradient, the same on every rank; scales the gradients as torch does."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    squares = {}  # mesh -> summed squares of its gradients (a Partial DTensor until gathered)
    for g in grads:
        key = g.device_mesh if isinstance(g, DTensor) else None
        sq = torch.linalg.vector_norm(g, dtype=torch.float32) ** 2
        squares[key] = sq if key not in squares else squares[key] + sq
    total = sum(sq.full_tensor() if isinstance(sq, DTensor) else sq for sq in squares.values()).sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.dtype))
    return total
