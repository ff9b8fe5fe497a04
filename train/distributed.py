"""torchrun integration: NCCL on GPUs, gloo on CPU; rank 0 alone writes checkpoints and logs."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


class DistributedSetupError(RuntimeError):
    """The launch does not fit this machine (e.g. more processes than GPUs)."""


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        per_node, visible = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1)), torch.cuda.device_count()
        if per_node > visible:  # refuse before any work, not "invalid device ordinal" mid-setup
            raise DistributedSetupError(
                f"{per_node} processes on this node but {visible} GPU(s) visible: launch torchrun with "
                f"--nproc_per_node={visible} (NPROC={visible}), choose GPUs with CUDA_VISIBLE_DEVICES, or set "
                "CUDA_VISIBLE_DEVICES= to train on CPU with gloo")
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return World(rank, local, size)


def device_for(world: World) -> torch.device:
    return torch.device("cuda", world.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def distributed() -> bool:
    """Whether this process is in an initialised torch.distributed process group."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if distributed() else 1


def unwrap(model):
    """The model itself, under a DDP wrapper or not."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def barrier() -> None:
    if distributed():
        dist.barrier()


def cleanup() -> None:
    if distributed():
        dist.destroy_process_group()
