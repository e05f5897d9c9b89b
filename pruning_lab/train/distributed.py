"""Data-parallel training across processes (torchrun or srun): one process per GPU, or gloo on CPU.

Every process draws the same per-epoch order and takes its share of each global batch, so N
processes at batch B compute the same updates as one process at batch B (DDP averages gradients).
Only rank 0 writes checkpoints and logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup() -> DistInfo:
    """Join the process group that torchrun (or srun with the same variables) describes, once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
        if info.is_main:
            print(f"data-parallel: {world} processes ({backend})", flush=True)
    return info


def all_reduce_sums(sums: dict, info: DistInfo) -> dict:
    """Sum each running metric over the processes (a no-op in a single process)."""
    if not info.enabled:
        return sums
    keys = sorted(sums)
    stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float64) for k in keys])
    if torch.cuda.is_available():
        stacked = stacked.cuda()
    dist.all_reduce(stacked)
    return {k: v for k, v in zip(keys, stacked.cpu())}


def _collective_device() -> str:
    """Where small collective tensors live: NCCL needs them on the GPU, gloo on the CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every process if it is true on any (so all stop at the same step)."""
    if not info.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def barrier(info: DistInfo) -> None:
    """Wait for every process (e.g. until rank 0 has written a checkpoint)."""
    if info.enabled:
        dist.barrier()


def broadcast_weights(model: nn.Module, info: DistInfo) -> None:
    """Give every process rank 0's weights and buffers: BatchNorm running statistics drift apart
    (each process updates them on its own share of the batch), and other nodes cannot read rank 0's
    node-local checkpoint files."""
    if info.enabled:
        for tensor in model.state_dict().values():
            if tensor.is_contiguous():
                dist.broadcast(tensor, src=0)
            else:  # e.g. channels_last convolution weights: collectives want a dense buffer
                buffer = tensor.contiguous()
                dist.broadcast(buffer, src=0)
                tensor.copy_(buffer)


def rank0_value(value: float, info: DistInfo) -> float:
    """Rank 0's value on every process, so that decisions that lead to collectives agree."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
    dist.broadcast(t, src=0)
    return float(t.item())


class ModelAndLoss(nn.Module):
    """The student and the criterion as one module, so one DDP wrapper syncs both (regressors too)."""

    def __init__(self, model: nn.Module, criterion: nn.Module) -> None:
        super().__init__()
        self.model, self.criterion = model, criterion

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits, features = self.model(x)
        return logits, self.criterion(logits, features, y, x)


def wrap(model: nn.Module, criterion: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """ModelAndLoss, inside DistributedDataParallel when there are several processes."""
    step = ModelAndLoss(model, criterion)
    if not info.enabled:
        return step
    if device.type == "cuda":  # batch statistics over the global batch, as with one process
        step = nn.SyncBatchNorm.convert_sync_batchnorm(step)
        return nn.parallel.DistributedDataParallel(step, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(step)
