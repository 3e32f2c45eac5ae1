"""A job's run on its engine: the one path for starting, resuming, checkpointing and preemption
that every job (pre-training, fine-tuning) shares.

``run_job(cfg, stage, name, body)`` builds the engine from the config, opens the run folder
(lock, identity, newest intact checkpoint: :func:`hpc_btunet.train.run.open_run`), stages the
dataset to node-local disk with ``--stage-to`` (:mod:`hpc_btunet.data.staging`) and calls
``body(session)`` unless the run is complete. The body reads its dataset from ``session.data``
(the node's copy, or ``--data``), builds its model, hands it to the engine, then:

- ``state = session.resume()``: the engine's state and the job's own progress (a dict) from the
  newest intact checkpoint, or None for a new run;
- ``session.start(config, position)``: records the config (and under ``runtime`` the threads and
  what staging did) and opens the tracker;
- ``session.watch(progress)``: ``progress()`` returns ``(position, state)``, what a checkpoint
  made now would hold; ``session.stop_if_preempted()`` after every batch saves it and requeues
  when SLURM's warning arrived on any rank;
- ``session.save(position, state)``: a checkpoint, collectively.

A checkpoint is a folder ``checkpoints/step-NNNNNNNN/`` (``position`` is the job's count of
batches done). Every rank writes its share into ``.step-NNNNNNNN.partial/`` (DeepSpeed's ZeRO
partitions; under DDP rank 0 writes everything), the main process writes the job's progress
(``job.pt``), and after a barrier the main process writes the marker (``complete.json``: engine,
world size, precision and every file with its size) last and renames the folder. A kill at any
point before that rename leaves the previous checkpoint as the newest; the partial folder is
removed by the next writer of the run folder.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hpc_btunet import distributed
from hpc_btunet.atomic import write_json
from hpc_btunet.data.staging import WAIT_S, stage_dataset
from hpc_btunet.errors import UserError
from hpc_btunet.tracking import Tracker
from hpc_btunet.train import checkpoint
from hpc_btunet.train.engine import Engine, create_engine
from hpc_btunet.train.preemption import PreemptionWatcher
from hpc_btunet.train.run import RunDir, open_run, record_start

Progress = Callable[[], tuple[int, dict[str, Any]]]


class Session:
    def __init__(self, cfg, engine: Engine, stage: str, name: str) -> None:
        self.cfg, self.engine, self.stage, self.name = cfg, engine, stage, name
        self.rundir = RunDir(cfg.run_dir(), is_main=engine.is_main)
        self.identity = cfg.identity(engine.world_size)
        self.data = Path(cfg.data)  # where the dataset is read: --data, or the node's copy
        self.staging: dict | None = None  # what staging did, for the config (None: off)
        self.last: Path | None = None
        self.watcher: PreemptionWatcher | None = None
        self.tracker: Tracker | None = None
        self._progress: Progress | None = None

    def open(self) -> bool:
        """Become the run folder's writer and check it; True when the run is complete."""
        complete, self.last = open_run(
            self.rundir,
            self.identity,
            self.cfg.result_file(),
            self.cfg.force_resume,
            self.cfg.identity_hints,
        )
        if self.last is not None:
            mine = self.engine.meta()
            check_resumable(self.last, mine["engine"], mine["world_size"], mine.get("zero_stage"))
        if not complete and self.engine.is_main:
            checkpoint.remove_partial(self.rundir.checkpoints)
            for name, content in self.engine.config_files().items():
                write_json(self.rundir.path / name, content)
        self.watcher = None if complete else PreemptionWatcher()
        return complete

    def log(self, message: str) -> None:
        if self.engine.is_main:
            print(f"{self.stage}: {message}", flush=True)

    def stage_data(self) -> None:
        """With ``--stage-to``: every rank copies or checks the dataset's node-local copy (one
        process per node copies, the others wait) and reads it from there, or from ``--data``
        after a fallback. One line per node says what was done."""
        if self.cfg.stage_to is None:
            return
        result = stage_dataset(
            self.cfg.data,
            self.cfg.stage_to,
            self.cfg.splits_read,
            on_error=self.cfg.stage_on_error,
            log=self._node_log,
        )
        self.data, self.staging = result.data, result.record()
        # the nodes that reused a copy wait here for those still copying, for as long as a
        # process waits for its node's copy: not in the next collective, whose timeout
        # (--dist-timeout) a long copy would exceed
        distributed.wait_for_all(WAIT_S)

    def _node_log(self, message: str) -> None:
        if self.engine.local_rank == 0:
            print(f"{self.stage}: {message}", flush=True)

    # --- resume and checkpoints ----------------------------------------------------------------

    def resume(self) -> dict[str, Any] | None:
        """Restore the engine from the newest intact checkpoint and return the job's progress
        saved with it (None when the run starts afresh). Every rank calls it."""
        if self.last is None:
            return None
        self.engine.load(self.last)
        state = checkpoint.load_file(self.last / checkpoint.JOB_STATE, "checkpoint")
        torch.set_rng_state(state.pop("rng"))
        return state

    def save(self, position: int, state: dict[str, Any]) -> Path | None:
        """A checkpoint of the engine and the job's ``state`` at ``position`` (collective)."""
        engine, folder = self.engine, self.rundir.checkpoints
        partial = checkpoint.partial_dir(folder, position)
        if engine.is_main:
            checkpoint.prepare_partial(folder, position)
        engine.barrier()
        engine.save(partial)
        if engine.is_main:
            checkpoint.save_file(
                partial / checkpoint.JOB_STATE, state | {"rng": torch.get_rng_state()}
            )
        engine.barrier()  # every rank's files are written
        final = None
        if engine.is_main:
            final = checkpoint.commit(partial, engine.meta() | {"position": position})
        engine.barrier()
        return final

    # --- preemption ----------------------------------------------------------------------------

    def watch(self, progress: Progress) -> None:
        """``progress()`` gives what a checkpoint made now holds: ``(position, state)``."""
        self._progress = progress

    def progress(self) -> tuple[int, dict[str, Any]]:
        return self._progress()

    def stop_if_preempted(self, save: bool = True) -> None:
        """Every rank, at the same point: on SLURM's warning, save the progress since the last
        checkpoint (``save``) and requeue. Never returns when it stops."""
        if not self.watcher.should_stop():
            return
        position, state = self.progress()
        if save:
            self.save(position, state)
        self.engine.barrier()
        if self.tracker is not None:
            self.tracker.finish()
        self.log(f"preempted at step {position}: checkpoint saved, requeueing")
        self.watcher.requeue(f"step {position}")

    # --- start and end -------------------------------------------------------------------------

    def start(self, config: dict, position: int, tracked: dict | None = None) -> Tracker:
        """Record the config (and identity) and open the tracker. Both also get how this start
        runs (``runtime``): each rank's compute threads and where they came from, and with
        ``--stage-to`` where the dataset was read and the copy's figures."""
        runtime = {}
        if self.engine.threads is not None:
            runtime["threads"] = self.engine.threads.as_dict()
        if self.staging is not None:
            runtime["staging"] = self.staging
        record_start(self.rundir, config, self.identity, self.cfg.data, position, runtime)
        self.tracker = Tracker(
            self.rundir,
            (tracked or config) | runtime,
            stage=self.stage,
            name=self.name,
            group=Path(self.cfg.out).name,
            mode=self.cfg.wandb,
            project=self.cfg.project,
        )
        return self.tracker

    def finish(self, summary: dict) -> None:
        self.tracker.summary(summary)
        self.tracker.finish()
        self.watcher.close()
        self.engine.barrier()


def check_resumable(last: Path, engine: str, world_size: int, zero_stage: int | None) -> None:
    """Refuse (even with --force-resume) a checkpoint this engine cannot read: one written by
    the other engine, by DeepSpeed with another ZeRO stage, or with ZeRO 1/2 partitions on
    another world size (DeepSpeed cannot re-split them). DDP and ZeRO 0 checkpoints hold the
    whole state and resume on any world size."""
    meta = checkpoint.read_marker(last)
    if meta.get("engine") != engine:
        raise UserError(
            f"checkpoint {last} was written by the {meta.get('engine')} engine, but this run "
            f"uses --engine {engine}: rerun with --engine {meta.get('engine')} to resume it, or "
            "choose another --out"
        )
    if engine != "deepspeed":
        return
    changed = []
    if meta.get("zero_stage") != zero_stage:
        changed.append(f"zero_stage {meta.get('zero_stage')} (checkpoint) vs {zero_stage} (now)")
    if meta.get("world_size") != world_size and meta.get("zero_stage"):  # ZeRO 0: whole state
        changed.append(
            f"world_size {meta.get('world_size')} (checkpoint; ZeRO {meta.get('zero_stage')} "
            f"split the optimiser state over its ranks, which DeepSpeed cannot re-split) vs "
            f"{world_size} (now)"
        )
    if changed:
        raise UserError(
            f"checkpoint {last} cannot be resumed by DeepSpeed with another layout "
            f"({'; '.join(changed)}): rerun with the checkpoint's --zero-stage and number of "
            "ranks (ZeRO 0 and DDP checkpoints resume on any number), or choose another --out"
        )


def run_job(cfg, stage: str, name: str, body: Callable[[Session], Path]) -> Path:
    """Build the engine, open the run folder, and run ``body`` unless the run is complete."""
    engine = create_engine(cfg.engine_spec())
    session = Session(cfg, engine, stage, name)
    try:
        if session.open():
            session.log(f"{cfg.result_file()} exists, nothing to do")
            return cfg.result_file()
        session.stage_data()
        result = body(session)
        engine.close()
        return result
    finally:
        session.rundir.release()
        sys.stdout.flush()
