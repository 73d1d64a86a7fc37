"""The training processes of a run, seen from one of them: which rank this is, and the few agreements the
trainer needs (wait for rank 0, take rank 0's value, average a number, fail together).

`Ranks()` is one process with no torch.distributed at all; `Ranks(env)` wraps the process group that
moekit.dist.mesh.init_distributed started under torchrun. Rank 0 alone writes the run directory.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, TypeVar

import torch

T = TypeVar("T")


class Ranks:
    def __init__(self, env=None):
        self.env = env
        self.rank = env.rank if env is not None else 0
        self.world = env.world_size if env is not None else 1
        self.main = self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.env is not None

    def barrier(self) -> None:
        if self.env is not None:
            import torch.distributed as dist

            dist.barrier()

    def share(self, value: T) -> T:
        """Rank 0's `value` on every rank (a picklable object)."""
        if self.env is None:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: Sequence[float]) -> list:
        """Each number averaged over the ranks (float64)."""
        if self.env is None:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(list(values), dtype=torch.float64, device=self.env.device)
        dist.all_reduce(t)
        return (t / self.world).tolist()

    def on_main(self, fn: Callable[[], T]) -> Optional[T]:
        """Run `fn` on rank 0 while the others wait; a ValueError there is raised on every rank (the same
        message), so all processes stop together. Returns fn's result on rank 0, None elsewhere."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except ValueError as err:
                error = str(err)
                if self.env is None:
                    raise
        error = self.share(error)
        if error is not None:
            raise ValueError(error)
        return result
