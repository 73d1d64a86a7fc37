"""The parallel layout, the process group and the device meshes.

    layout = Layout(dp_replicate=1, dp_shard=-1, ep=2).check(world_size, num_experts)
    env = init_distributed()             # None without torchrun: one process, no torch.distributed
    meshes = build_meshes(env, layout)   # meshes.dp, meshes.ep, meshes.dp_mod_ep, ...

Rule (torchtitan's): world size = dp_replicate x dp_shard, and expert parallelism borrows its
ranks from dp_shard, so `ep` must divide `dp_shard`. Every rank is a data-parallel rank (it
reads its own part of the global batch); the ep ranks of one EP group exchange tokens and each
holds E/ep routed experts. The world mesh is 3-D (dp_replicate, dp_shard_mod_ep, ep), with
dp_shard = dp_shard_mod_ep x ep; the 1-D and 2-D meshes below are slices and flattenings of it:

    dp         all ranks (flattened): batch slicing, global balancing, dense FSDP without HSDP
    ep         the expert-parallel group: token all-to-all, expert weights Shard(0)
    dp_mod_ep  the ranks that hold the same experts (dp_replicate x dp_shard_mod_ep, flattened)
    fsdp       2-D (dp_replicate, dp_shard): dense parameters under HSDP
    fsdp_ep    2-D (dp_replicate, dp_shard_mod_ep): expert parameters under HSDP
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class Layout:
    dp_replicate: int = 1  # HSDP replicas (parameters replicated across them)
    dp_shard: int = -1  # FSDP degree; -1: the rest of the world
    ep: int = 1  # expert-parallel degree (must divide dp_shard)

    def resolve(self, world_size: int) -> "Layout":
        """dp_shard=-1 becomes world_size // dp_replicate; ValueError on non-positive degrees."""
        for name, value in (("--dp-replicate", self.dp_replicate), ("--ep", self.ep)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.dp_shard == -1:
            if world_size % self.dp_replicate:
                raise ValueError(f"world size {world_size} is not divisible by --dp-replicate {self.dp_replicate}")
            return replace(self, dp_shard=world_size // self.dp_replicate)
        if self.dp_shard < 1:
            raise ValueError(f"--dp-shard must be >= 1 or -1 (the rest), got {self.dp_shard}")
        return self

    def check(self, world_size: int, num_experts: Optional[int] = None) -> "Layout":
        """The resolved layout, or ValueError naming the numbers that do not fit."""
        layout = self.resolve(world_size)
        if layout.dp_replicate * layout.dp_shard != world_size:
            raise ValueError(f"world size {world_size} is not dp_replicate {layout.dp_replicate} "
                             f"x dp_shard {layout.dp_shard}")
        if layout.dp_shard % layout.ep:
            raise ValueError(f"--ep {layout.ep} does not divide dp_shard {layout.dp_shard} "
                             "(expert-parallel ranks are taken from the data-parallel shard ranks)")
        if num_experts is not None and num_experts % layout.ep:
            raise ValueError(f"num_experts={num_experts} is not divisible by --ep {layout.ep}")
        return layout

    @property
    def dp(self) -> int:
        """Data-parallel ranks: all of them."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed() -> Optional[DistEnv]:
    """Join torchrun's process group (nccl on CUDA with device cuda:LOCAL_RANK, gloo on CPU);
    None when not launched by torchrun (then nothing of torch.distributed is touched)."""
    if not launched_by_torchrun():
        return None
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device)


@dataclass
class Meshes:
    world: "object"  # 3-D DeviceMesh (dp_replicate, dp_shard_mod_ep, ep)
    dp: "object"  # 1-D, all ranks
    ep: "object"  # 1-D, this rank's EP group
    dp_mod_ep: "object"  # 1-D, the ranks holding the same experts
    fsdp: "object"  # 2-D (dp_replicate, dp_shard)
    fsdp_ep: "object"  # 2-D (dp_replicate, dp_shard_mod_ep)


def build_meshes(env: DistEnv, layout: Layout) -> Meshes:
    from torch.distributed.device_mesh import init_device_mesh

    layout = layout.check(env.world_size)
    fsdp = init_device_mesh(env.device.type, (layout.dp_replicate, layout.dp_shard),
                            mesh_dim_names=("dp_replicate", "dp_shard"))
    world = fsdp._unflatten("dp_shard", (layout.dp_shard_mod_ep, layout.ep), ("dp_shard_mod_ep", "ep"))
    fsdp_ep = world["dp_replicate", "dp_shard_mod_ep"]
    return Meshes(world=world, dp=fsdp._flatten("dp"), ep=world["ep"], dp_mod_ep=fsdp_ep._flatten("dp_mod_ep"),
                  fsdp=fsdp, fsdp_ep=fsdp_ep)


def finish_and_exit(code: int = 0) -> None:
    """End a torchrun worker after its work is written: a barrier, the process group destroyed, stdout and
    stderr flushed, then `os._exit(code)`. Interpreter teardown is skipped on purpose: with torch 2.13 on
    gloo it sometimes aborts ("terminate called without an active exception", about once in ten CPU runs),
    which turns a finished run into a failed one."""
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
