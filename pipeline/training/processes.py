"""The process group: one process, or torchrun's ranks (gloo on CPU; on GPU nccl for CUDA tensors and gloo
for the CPU ones, such as the step's loss totals and the objects the ranks exchange)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def sum_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each named value summed over every rank (float64), the same on all of them."""
        if self.world_size == 1:
            return values
        names = sorted(values)
        totals = torch.tensor([values[name] for name in names], dtype=torch.float64)  # on the CPU: gloo
        dist.all_reduce(totals)
        return dict(zip(names, totals.tolist(), strict=True))

    def finish(self) -> None:
        """Leave the process group (torchrun)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def process_group_backend(target: torch.device) -> str:
    """The backend of each device type a run's collectives meet: NCCL handles CUDA tensors only, so a GPU
    run's group also gets gloo for CPU tensors ("No backend type associated with device type cpu")."""
    return "cpu:gloo,cuda:nccl" if target.type == "cuda" else "gloo"


def start_processes(device: str) -> tuple[Processes, torch.device]:
    """torch.distributed from torchrun's environment (process_group_backend); one process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(), torch.device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(device)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(target))
    return Processes(rank, world_size, local_rank), target
