"""Several processes, one model: DistributedDataParallel under ``torchrun`` (a no-op without it). Every rank walks
the same order and noise of the global batch and keeps its slice, its loss weighted by its share: N processes
take the steps of one.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Shard:
    """This process's place among ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes grids, plots and checkpoints, and prints."""
        return self.rank == 0

    def part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous slice of a global batch along dim 0 (sizes differ by at most one)."""
        return x if self.world == 1 else x.tensor_split(self.world)[self.rank]


SINGLE = Shard()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> tuple[Shard, torch.device]:
    """Join the process group torchrun set up: NCCL on CUDA (one GPU per local rank), gloo on CPU."""
    if not launched_by_torchrun():
        return SINGLE, device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Shard(dist.get_rank(), dist.get_world_size()), device


def stop(wait: bool = True) -> None:
    """Leave the process group; after a failure, without waiting for the others (torchrun stops them)."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier(shard: Shard) -> None:
    if shard.world > 1:
        dist.barrier()


def wrap(module: nn.Module, shard: Shard, device: torch.device) -> nn.Module:
    """``module`` under DDP when there are several processes (gradients averaged in ``backward``)."""
    if shard.world == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    # the buffers are the noise schedule, identical everywhere: no need to broadcast them every step
    return nn.parallel.DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)


def sum_over_ranks(x: torch.Tensor, shard: Shard) -> torch.Tensor:
    """``x`` summed over every rank (``x`` itself in a single process)."""
    if shard.world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


class Replicas:
    """The model as training calls it (DDP-wrapped with several processes), and each rank's loss weighted by its
    share of the batch, which makes N processes train as one."""

    def __init__(self, ddpm: nn.Module, shard: Shard = SINGLE, device: torch.device | None = None) -> None:
        self.shard = shard
        self.module = wrap(ddpm, shard, device or torch.device("cpu"))

    def part(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a tensor that spans the global batch."""
        return self.shard.part(x)

    def backward(self, loss: torch.Tensor, mine: int, batch: int) -> None:
        """Back-propagate this rank's mean loss over ``mine`` of the ``batch`` images."""
        (loss * (mine / batch * self.shard.world)).backward()

    def share(self, loss: torch.Tensor, mine: int, batch: int) -> torch.Tensor:
        """This rank's share of the global mean loss (the loss itself in a single process)."""
        return (loss * (mine / batch)).detach()
