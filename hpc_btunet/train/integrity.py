"""What a job checks before it spends time: its shards, verified by sha256 against the manifest.

The check is split across ranks (each verifies every W-th shard), stays responsive to SLURM's
warning signal between shards (a job preempted while verifying requeues at once, having nothing
to save), and ends the same way on every rank: all succeed, or all raise, the rank that found the
damage with the list of bad shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from hpc_btunet import distributed
from hpc_btunet.data.manifest import ShardInfo, verify_shards
from hpc_btunet.errors import ShardError
from hpc_btunet.train.preemption import PreemptionWatcher


def verify_before_training(
    root: Path, shards: list[ShardInfo], watcher: PreemptionWatcher, where: str
) -> None:
    """sha256 of ``shards`` against the manifest, shared by the ranks; ``where`` names the
    phase for the requeue message."""
    rank, world = distributed.rank(), distributed.world_size()
    mine = shards[rank::world]
    problems: list[str] = []
    for r in range(-(-len(shards) // world)):  # the same number of rounds on every rank
        if r < len(mine):
            try:
                verify_shards(root, [mine[r]])
            except ShardError as e:
                problems.append(str(e))
        if watcher.should_stop():
            watcher.requeue(where)
    failed = torch.tensor([float(bool(problems))])
    if distributed.is_distributed():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if problems:
        raise ShardError("\n".join(problems))
    if failed.item() > 0:
        raise ShardError(f"shard verification of {root} failed on another rank: see its log")
