"""Run a function on W processes joined in a gloo process group, with a hard timeout.

A hang (a rank stuck in a collective) fails the test after ``timeout`` seconds instead of stalling
the suite; every child is killed. ``fn(rank, world_size, *args)`` must be a module-level function.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import queue
import socket
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, results):
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=60),
        )
        out = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        results.put((rank, "ok", out))
    except BaseException:  # report every failure to the parent, which fails the test
        results.put((rank, "error", traceback.format_exc()))


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]`` computed on W processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, object] = {}
    try:
        for _ in range(world_size):
            try:
                rank, status, out = results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(
                    f"ranks {sorted(set(range(world_size)) - outs.keys())} did not finish "
                    f"within {timeout} s (hang?)"
                ) from None
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{out}")
            outs[rank] = out
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [outs[r] for r in range(world_size)]
