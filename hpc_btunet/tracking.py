"""Experiment tracking: Weights & Biases from the main process, and always a local copy.

Every logged record goes to the run folder's ``metrics.jsonl`` (reports never depend on the
service) and, from rank 0, to a wandb run: project, group = the experiment (the ``--out``
folder's name), job type = the stage, name = model/variant/fold, config = the resolved config.
Offline by default (``wandb sync <run folder>/wandb/offline-run-*`` uploads later); online when
``--wandb online`` or ``WANDB_MODE=online``, with the key taken by wandb from its own login or
``WANDB_API_KEY`` (never logged here). The run id is stored in the run folder, so a requeued or
resumed job continues the same wandb run. Images (a job's predictions over a few samples) go to
wandb alone, and only a job that finds ``shows_media`` true prepares them.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Any

from hpc_btunet.atomic import atomic_open
from hpc_btunet.train.run import RunDir

if TYPE_CHECKING:
    import numpy as np

MODES = ("offline", "online", "disabled")
_SECRET_HINTS = ("key", "token", "secret", "password")


def _public(config: dict[str, Any]) -> dict[str, Any]:
    """The config without anything that looks like a credential."""
    return {k: v for k, v in config.items() if not any(h in k.lower() for h in _SECRET_HINTS)}


class Tracker:
    """Logs records locally and to wandb; only the main process talks to wandb."""

    def __init__(
        self,
        rundir: RunDir,
        config: dict[str, Any],
        *,
        stage: str,
        name: str,
        group: str,
        mode: str = "offline",
        project: str = "hpc_btunet",
    ) -> None:
        self.rundir = rundir
        self.run = None
        mode = os.environ.get("WANDB_MODE", mode) if mode != "disabled" else mode
        if not rundir.is_main or mode == "disabled":
            return
        if mode not in MODES:
            raise ValueError(f"unknown wandb mode {mode!r}: choose one of {', '.join(MODES)}")
        import wandb

        rundir.path.mkdir(parents=True, exist_ok=True)
        id_file = rundir.path / "wandb-id"
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(6)
            with atomic_open(id_file, "w") as f:
                f.write(run_id)
        self.run = wandb.init(
            project=project,
            group=group,
            job_type=stage,
            name=name,
            id=run_id,
            resume="allow",
            dir=str(rundir.path),
            mode=mode,
            config=_public(config),
            allow_val_change=True,  # a resume may change the config (another world size)
            settings=wandb.Settings(console="off", silent=True),
        )

    def log(self, record: dict[str, Any], step: int) -> None:
        self.rundir.log({"step": step, **record})
        if self.run is not None:
            self.run.log(record, step=step)

    @property
    def shows_media(self) -> bool:
        """Whether :meth:`images` shows anything: a wandb run is open (the main process, wandb
        not disabled). Callers gather images only then."""
        return self.run is not None

    def images(
        self, name: str, shown: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], step: int
    ) -> None:
        """Images with two mask overlays, ``(caption, image, prediction, truth)``, the masks
        H x W {0, 1}: to wandb only (``metrics.jsonl`` keeps numbers)."""
        if self.run is None:
            return
        import wandb

        labels = {1: "foreground"}
        self.run.log(
            {
                name: [
                    wandb.Image(
                        image,
                        caption=caption,
                        masks={
                            "prediction": {"mask_data": prediction, "class_labels": labels},
                            "ground_truth": {"mask_data": truth, "class_labels": labels},
                        },
                    )
                    for caption, image, prediction, truth in shown
                ]
            },
            step=step,
        )

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
