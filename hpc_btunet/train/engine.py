"""The training engine: one interface that owns the process group, the device, the wrapped model
and the whole optimiser step, with two implementations, DDP and DeepSpeed.

A job builds its model, optimiser and learning-rate schedule, hands them to
``engine.prepare(module, optimizer, scheduler)`` and then only calls the engine:

- ``engine.inputs(x)`` puts a batch on the device in the dtype and memory format the engine needs,
  and ``with engine.autocast():`` surrounds the forward pass;
- ``engine.step(loss)``: backward, then, on every ``accumulate``-th call (every call by default),
  gradient clipping, loss scaling, the optimiser and scheduler step; it returns whether the
  optimiser stepped. Between those calls the gradients of the micro-batches add up (DDP
  communicates only at the last one);
- ``engine.save(folder)`` / ``engine.load(folder)``: the engine's share of a checkpoint (every rank
  calls them; :mod:`hpc_btunet.train.session` makes the folder a checkpoint only when all ranks
  have written);
- ``engine.export()``: the model's plain fp32 state dict on CPU, gathered from every partition,
  the same whichever engine trained it;
- ``engine.is_main``, ``engine.barrier()``, ``engine.all_finite(x)``.

Jobs never ask which engine they run on. BatchNorm statistics have a scope (``bn_scope``):
``global`` (default): across ranks whenever the world size is above one (``nn.SyncBatchNorm`` on
CUDA, our ``GlobalBatchNorm`` on CPU, where SyncBatchNorm cannot train), so W ranks compute what
one process computes on the global batch; ``local``: each rank's own (micro-)batch, with the
running statistics of all ranks applied in order at every optimiser step
(:class:`~hpc_btunet.global_batchnorm.LocalBatchNorm`), so W ranks compute what one process
computes with W accumulated micro-batches.

Precision: ``fp32``; ``bf16`` and ``fp16`` run the forward pass in half precision. Under DDP that
is ``torch.autocast`` (weights stay fp32) with a gradient scaler for fp16; DeepSpeed casts the
weights themselves and keeps fp32 master copies (see :mod:`hpc_btunet.train.deepspeed_engine`).
The Barlow Twins loss, BatchNorm statistics and spectral pooling compute in fp32 either way.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from hpc_btunet import distributed
from hpc_btunet.errors import UserError
from hpc_btunet.global_batchnorm import (
    apply_recorded_statistics,
    convert_global_batchnorm,
    convert_local_batchnorm,
)
from hpc_btunet.threads import ThreadPlan, place_threads
from hpc_btunet.train.checkpoint import load_file, save_file

ENGINES = ("ddp", "deepspeed")
BN_SCOPES = ("global", "local")
PRECISIONS = ("fp32", "bf16", "fp16")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
ENGINE_STATE = "engine.pt"  # DDP: model, optimiser, scheduler, scaler; DeepSpeed: the scheduler


def plain(t: torch.Tensor) -> torch.Tensor:
    """A tensor as exported weights hold it: on CPU, floating point as fp32, counters as they are."""
    t = t.detach().cpu()
    return t.float() if t.is_floating_point() else t


DEVICE_NAME = re.compile(r"auto|cpu|cuda(?::\d+)?")


def check_device_name(name: str) -> str:
    """``name`` when it is a device a job can run on (auto, cpu, cuda, cuda:N); else one
    error with the valid ones. Whether the device exists is :func:`pick_device`'s to say."""
    if not isinstance(name, str) or not DEVICE_NAME.fullmatch(name):
        raise UserError(
            f"--device {name!r} is not a device a job runs on: choose auto (a GPU when one is "
            "visible), cpu, cuda, or cuda:N (the GPU of that index)"
        )
    return name


def pick_device(name: str) -> torch.device:
    """The device ``name`` stands for on this machine, refusing one that is not here."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            f"--device {name} was asked for but no CUDA GPU is visible: use --device cpu (or auto)"
        )
    device = torch.device(name)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"--device {name}: this machine shows {torch.cuda.device_count()} GPU(s) "
            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}): choose one of them, or cuda"
        )
    return device


def check_precision(precision: str, device: torch.device) -> None:
    """Refuse a precision this device cannot train in, naming the one that works."""
    if precision == "fp16" and device.type == "cpu":
        raise UserError(
            "--precision fp16 needs a CUDA GPU (half-precision training on CPU is neither "
            "supported by DeepSpeed nor fast): use --precision bf16 on CPU, or fp32"
        )
    gpu_here = device.type == "cuda" and torch.cuda.is_available()  # not on a login node
    if precision == "bf16" and gpu_here and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"--precision bf16: the GPU {torch.cuda.get_device_name(device)} has no bf16 "
            "support: use --precision fp16 (with loss scaling) or fp32"
        )


@dataclass(frozen=True)
class EngineSpec:
    """What a job asks of its engine (from its config's engine options)."""

    kind: str = "ddp"
    precision: str = "fp32"
    zero_stage: int = 0
    grad_clip: float = 0.0
    channels_last: bool = False
    batch_size: int = 1  # per rank and micro-batch (DeepSpeed's micro-batch)
    accumulate: int = 1  # micro-batches per optimiser step
    bn_scope: str = "global"
    deepspeed_config: Path | None = None
    device: str = "auto"
    timeout_s: float = 600.0


class Engine:
    """The interface both engines implement (see the module docstring)."""

    kind: ClassVar[str] = ""

    def __init__(self, spec: EngineSpec, device: torch.device, placement: distributed.Placement):
        self.spec = spec
        self.device = device
        self.rank, self.world_size = placement.rank, placement.world_size
        self.local_rank = placement.local_rank
        self.threads: ThreadPlan | None = None  # this rank's compute threads (create_engine)
        self.module: nn.Module | None = None  # the model as built (unwrapped)
        self.wrapped: nn.Module | None = None  # what prepare() returned
        self.optimizer: Optimizer | None = None
        self.scheduler: Any = None

    # --- process group -------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if distributed.world_size() > 1:
            dist.barrier()

    def all_finite(self, value: torch.Tensor) -> bool:
        """Whether ``value`` is finite on every rank (so that all ranks stop together)."""
        ok = torch.tensor([float(torch.isfinite(value).all())], device=value.device)
        if distributed.world_size() > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def close(self) -> None:
        distributed.teardown()

    def config_files(self) -> dict[str, dict]:
        """Files the engine's configuration is recorded in, next to the run's config.yaml."""
        return {}

    def meta(self) -> dict[str, Any]:
        """What a checkpoint records about the engine that wrote it."""
        return {
            "engine": self.kind,
            "world_size": self.world_size,
            "precision": self.spec.precision,
        }

    # --- model and step ------------------------------------------------------------------------

    def prepare(self, module: nn.Module, optimizer: Optimizer, scheduler: Any = None) -> nn.Module:
        """Move, convert and wrap ``module`` for this engine; return the callable to train with."""
        raise NotImplementedError

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the device, in the memory format (and, for DeepSpeed, dtype) the model takes."""
        x = x.to(self.device, non_blocking=True)
        if self.spec.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def step(self, loss: torch.Tensor) -> bool:
        """Backward of ``loss``; on the last micro-batch of a step, the optimiser step too (then
        True). The gradients of the micro-batches add up: each ``loss`` must be scaled for that
        already (the gradient cache of :mod:`hpc_btunet.train.pretrain` hands over exact ones)."""
        raise NotImplementedError

    def _after_step(self) -> None:
        if self._local_bn:
            apply_recorded_statistics(self.module, self.spec.accumulate)

    def save(self, folder: Path) -> None:
        """Write this engine's share of a checkpoint into ``folder`` (called on every rank)."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Restore model, optimiser and schedule from checkpoint ``folder`` (every rank)."""
        raise NotImplementedError

    def export(self) -> dict[str, torch.Tensor]:
        """The model's full state dict, fp32 on CPU (every rank calls it; all get it)."""
        raise NotImplementedError

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Put an exported state dict back into the model (to evaluate the best epoch)."""
        self.module.load_state_dict(state)

    def train(self, mode: bool = True) -> None:
        self.wrapped.train(mode)

    @property
    def _local_bn(self) -> bool:
        return self.spec.bn_scope == "local" and self.world_size > 1

    def _convert_batchnorm(self, module: nn.Module) -> nn.Module:
        if self.world_size == 1:
            return module
        if self._local_bn:
            return convert_local_batchnorm(module)
        if self.device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return convert_global_batchnorm(module)

    def _place(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        if self.spec.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def _save_schedule(self, folder: Path, extra: dict | None = None) -> None:
        state = {"scheduler": None if self.scheduler is None else self.scheduler.state_dict()}
        save_file(Path(folder) / ENGINE_STATE, state | (extra or {}))

    def _load_state(self, folder: Path) -> dict:
        return load_file(Path(folder) / ENGINE_STATE, "checkpoint")


# DDP does not broadcast buffers at each forward: BatchNorm running statistics are the same on
# every rank by construction (global statistics, or every rank's records applied in one order),
# and the broadcast would cost a collective per forward (torch 2.13 renamed the option)
_NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
    else {"broadcast_buffers": False}
)


class DDPEngine(Engine):
    """``DistributedDataParallel`` (identity for one process), ``torch.autocast`` for half
    precision, ``torch.amp.GradScaler`` for fp16. Checkpoints: one file, written by rank 0."""

    kind = "ddp"

    def prepare(self, module, optimizer, scheduler=None):
        self.module = self._convert_batchnorm(self._place(module))
        self.optimizer, self.scheduler = optimizer, scheduler
        self.scaler = (
            torch.amp.GradScaler(self.device.type) if self.spec.precision == "fp16" else None
        )
        self.micro_steps = 0  # step() calls since the start (checkpoints fall on step ends)
        self.wrapped = self.module
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.module, device_ids=ids, **_NO_FORWARD_BUFFER_SYNC
            )
        return self.wrapped

    def autocast(self):
        if self.spec.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=HALF[self.spec.precision])

    def step(self, loss):
        self.micro_steps += 1
        boundary = self.micro_steps % self.spec.accumulate == 0
        accumulating = not boundary and self.world_size > 1
        with self.wrapped.no_sync() if accumulating else contextlib.nullcontext():
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        if not boundary:
            return False
        if self.scaler is None:
            self._clip()
            self.optimizer.step()
            applied = True
        else:
            scale = self.scaler.get_scale()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale  # a lowered scale: inf/NaN, step skipped
        if applied and self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._after_step()
        return True

    def _clip(self) -> None:
        if self.spec.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.spec.grad_clip)

    def save(self, folder):
        if not self.is_main:
            return
        self._save_schedule(
            folder,
            {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": None if self.scaler is None else self.scaler.state_dict(),
            },
        )

    def load(self, folder):
        state = self._load_state(folder)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def export(self):
        return {k: plain(v) for k, v in self.module.state_dict().items()}


def create_engine(spec: EngineSpec) -> Engine:
    """Join the job's process group (SLURM/submitit, torchrun or none), pick the device and build
    the engine ``spec.kind``. ``spec.timeout_s`` bounds every collective: a lost rank ends the
    job with an error, not a hang."""
    device = pick_device(spec.device)
    check_precision(spec.precision, device)
    placement = distributed.init_process_group(
        use_cuda=device.type == "cuda", timeout_s=spec.timeout_s
    )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", placement.local_rank)
        torch.cuda.set_device(device)
    if spec.kind == "deepspeed":
        from hpc_btunet.train.deepspeed_engine import DeepSpeedEngine

        engine = DeepSpeedEngine(spec, device, placement)
    elif spec.kind == "ddp":
        engine = DDPEngine(spec, device, placement)
    else:
        raise UserError(f"unknown engine {spec.kind!r}: choose one of {', '.join(ENGINES)}")
    engine.threads = place_threads(placement.launcher, placement.local_world_size)
    return engine


@contextlib.contextmanager
def engine_session(spec: EngineSpec) -> Iterator[Engine]:
    """An engine for the length of a job; its process group is left at the end."""
    engine = create_engine(spec)
    try:
        yield engine
    finally:
        engine.close()
