"""The training engine: device, process group, and the wrapping of a model for data parallelism.

Jobs ask the engine for the device and for ``wrap(module)``; they never test ranks themselves
beyond ``engine.is_main`` (who logs and saves). With one process ``wrap`` is the identity. With
several, BatchNorm layers are made to use global-batch statistics (``nn.SyncBatchNorm`` on CUDA,
our ``GlobalBatchNorm`` on CPU, where SyncBatchNorm cannot train) and the module is wrapped in
``DistributedDataParallel``, so that W ranks compute what one process computes on the global batch.
A DeepSpeed engine will sit beside this one behind the same two calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hpc_btunet import distributed
from hpc_btunet.errors import UserError
from hpc_btunet.global_batchnorm import convert_global_batchnorm


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name} was asked for but no CUDA GPU is visible: use --device cpu"
        )
    return torch.device(name)


@dataclass
class Engine:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def setup(cls, device: str = "auto", timeout_s: float = 600.0) -> Engine:
        """Join the job's process group (SLURM/submitit, torchrun or none) and pick the device.

        ``timeout_s`` bounds every collective: a lost rank ends the job with an error, not a hang.
        """
        dev = pick_device(device)
        placement = distributed.init_process_group(use_cuda=dev.type == "cuda", timeout_s=timeout_s)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", placement.local_rank)
            torch.cuda.set_device(dev)
        return cls(dev, placement.rank, placement.world_size, placement.local_rank)

    def close(self) -> None:
        distributed.teardown()

    def wrap(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.world_size == 1:
            return module
        if self.device.type == "cuda":
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
            return nn.parallel.DistributedDataParallel(module, device_ids=[self.device.index])
        module = convert_global_batchnorm(module)
        return nn.parallel.DistributedDataParallel(module)

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (so that all ranks stop together)."""
        ok = torch.tensor([float(torch.isfinite(value).all())], device=value.device)
        if self.world_size > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())
