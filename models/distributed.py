"""Every collective vqtok uses, in one place.

    comm = Collectives.current()      # the torch.distributed group when one is up, else one process
    comm.all_reduce_sum(counts, sums) # in place
    comm.broadcast(centroids)         # rank 0's values everywhere, in place
    comm.gather_ints(consumed)        # [value of rank 0, value of rank 1, ...]

A single process gets `Collectives()` (world size 1), whose operations are no-ops, so the code that
uses them reads the same in one process and on many. The trainer builds the object once and hands
it to what needs it: the quantizer's codebook statistics, the checkpoint's data positions, the
prior's held-out bits, the end-of-run replica check. Tensors go through the device of the process
group's backend (NCCL reduces GPU tensors only; gloo CPU tensors).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Collectives:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"  # where tensors must be for the backend (cuda:N under NCCL)

    @classmethod
    def current(cls, device: str = "cpu") -> "Collectives":
        """The initialised torch.distributed group, or a single process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size(), device)
        return cls(device=device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_reduce_sum(self, *tensors: torch.Tensor) -> None:
        """Sum each tensor over all ranks, in place."""
        if not self.active:
            return
        import torch.distributed as dist

        for t in tensors:
            if t.device.type == torch.device(self.device).type:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
            else:  # e.g. a CPU accumulator under NCCL: reduce a device copy
                d = t.to(self.device)
                dist.all_reduce(d, op=dist.ReduceOp.SUM)
                t.copy_(d)

    def broadcast(self, *tensors: torch.Tensor) -> None:
        """Rank 0's values everywhere, in place (random draws are made on rank 0 and shared)."""
        if not self.active:
            return
        import torch.distributed as dist

        for t in tensors:
            dist.broadcast(t, src=0)

    def gather_ints(self, value: int) -> list[int]:
        """value from every rank, in rank order."""
        return [int(v) for v in self.gather_objects(int(value))]

    def gather_objects(self, value) -> list:
        """A small picklable value from every rank, in rank order."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out


SINGLE_PROCESS = Collectives()
