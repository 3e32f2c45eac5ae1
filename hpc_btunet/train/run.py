"""A job's output folder: its identity, provenance and local metrics log.

Every run writes ``config.yaml`` (the resolved config plus the package version, git revision and
the sha256 of the dataset manifest) and appends one JSON object per logged step to
``metrics.jsonl``, so that results never depend on an external tracking service. A run is
complete when its final artefact exists (``encoder.pt`` for pre-training, ``metrics.json`` for
fine-tuning); a complete run is skipped on rerun, an incomplete one resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from hpc_btunet import __version__
from hpc_btunet.atomic import atomic_open
from hpc_btunet.data.manifest import MANIFEST_NAME


def git_revision() -> str:
    """The git commit of the installed package's checkout, or "unknown" (installed from a wheel)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def manifest_sha256(data: Path) -> str:
    return hashlib.sha256((Path(data) / MANIFEST_NAME).read_bytes()).hexdigest()


class RunDir:
    """Paths and logs of one job's output folder; only the main process writes (``is_main``)."""

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self.checkpoints = self.path / "checkpoints"
        self.metrics_log = self.path / "metrics.jsonl"

    def write_config(self, config: dict[str, Any], data: Path) -> None:
        if not self.is_main:
            return
        provenance = {
            "package_version": __version__,
            "git_revision": git_revision(),
            "manifest_sha256": manifest_sha256(data),
            "python": sys.version.split()[0],
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        with atomic_open(self.path / "config.yaml", "w") as f:
            yaml.safe_dump({"config": config, "provenance": provenance}, f, sort_keys=False)

    def truncate_log(self, after_step: int) -> None:
        """On resume, drop log lines past the checkpoint's step: they will be logged again."""
        if not self.is_main or not self.metrics_log.exists():
            return
        kept = [
            line
            for line in self.metrics_log.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= after_step
        ]
        with atomic_open(self.metrics_log, "w") as f:
            f.write("".join(line + "\n" for line in kept))

    def log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.metrics_log, "a") as f:
            f.write(json.dumps(record) + "\n")
