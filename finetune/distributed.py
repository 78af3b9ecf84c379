"""This process's place in a data-parallel run, and the few collectives fine-tuning needs.

TorchDistributor (through torchrun) sets WORLD_SIZE, RANK, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT; without WORLD_SIZE (or with 1) the process runs alone and every
collective here is the identity, so the training code has one path for both.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_rank: int
    local_world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (any picklable object)."""
        if not self.on:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if not self.on:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, *values: float) -> list[float]:
        """Element-wise sums over ranks, in float64."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.on:
            dist.all_reduce(t)
        return t.tolist()

    def sync_buffers(self, model: torch.nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics) everywhere. DDP copies them at the start of each
        forward, so after the last step of an epoch the ranks' running statistics still differ."""
        if self.on:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def close(self) -> None:
        if self.on and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str) -> Dist:
    """Join the process group when WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA) and pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"rank {rank}: CUDA asked for but torch.cuda.is_available() is False")
        # TorchDistributor restricts CUDA_VISIBLE_DEVICES to the GPUs it owns: local rank i takes the i-th.
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        on = torch.device("cuda", index)
    elif device == "cpu":
        on = torch.device("cpu")
    else:
        raise ValueError(f"device {device!r}: choose cpu or cuda")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if on.type == "cuda" else "gloo", init_method="env://",
                                rank=rank, world_size=world)
    return Dist(rank, world, local_rank, local_world, on)
