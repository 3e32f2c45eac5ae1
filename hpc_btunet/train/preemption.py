"""Preemption and time limits: SLURM's warning signal, agreed on by every rank at a step boundary.

SLURM sends ``USR2`` to every task some time before it preempts a job or its time runs out
(submitit asks for ``--signal=USR2@90``). Acting inside the signal handler would checkpoint in
the middle of a step on one rank only. Instead every rank records the signal, the training loop
asks ``watcher.should_stop()`` at each step boundary (one tiny all-reduce, so all ranks agree on
the same step), the job saves its checkpoint collectively, and ``watcher.requeue()`` hands over
to submitit on rank 0: it requeues the job (time-outs a bounded number of times) and the rerun
resumes from that checkpoint. Outside submitit (torchrun, in-process) the job stops with
:class:`Preempted`, and rerunning the command resumes it.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import torch
import torch.distributed as dist

from hpc_btunet import distributed
from hpc_btunet.errors import UserError


class Preempted(UserError):
    """The job stopped on a preemption signal after saving its checkpoint."""


class PreemptionWatcher:
    """Records the warning signal(s); restores the previous handlers on ``close``."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGUSR2,)) -> None:
        self.received: int | None = None
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """Whether any rank has received the signal. Every rank must call it at the same step."""
        flag = torch.tensor([0.0 if self.received is None else 1.0])
        if distributed.is_distributed():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def requeue(self, where: str) -> None:
        """After the collective checkpoint: requeue through submitit (rank 0) and leave. Never returns."""
        signum = self.received or signal.SIGUSR2
        handler = self._previous.get(signum)
        submitit_handler = callable(handler) and "submitit" in getattr(handler, "__module__", "")
        outcome: BaseException | None = None
        if distributed.rank() == 0 and submitit_handler:
            try:
                handler(signum, None)  # submitit: pickles the job, requeues it, then exits
            except BaseException as e:  # SystemExit after a requeue, or "not requeued" errors
                outcome = e
        if distributed.is_distributed():
            dist.barrier()  # nobody leaves before rank 0 has asked SLURM to requeue
        self.close()
        if submitit_handler:
            if isinstance(outcome, SystemExit) or outcome is None:
                sys.exit(-1)
            raise outcome
        raise Preempted(
            f"stopped on signal {signal.Signals(signum).name} with a checkpoint at {where}: "
            "rerun the same command to resume"
        )

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
