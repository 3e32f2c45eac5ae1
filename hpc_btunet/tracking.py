"""Experiment tracking: Weights & Biases from the main process, and always a local copy.

Every logged record goes to the run folder's ``metrics.jsonl`` (reports never depend on the
service) and, from rank 0, to a wandb run: project, group = the experiment (the ``--out``
folder's name), job type = the stage, name = model/variant/fold, config = the resolved config.
Offline by default (``wandb sync <run folder>/wandb/offline-run-*`` uploads later); online when
``--wandb online`` or ``WANDB_MODE=online``, with the key taken by wandb from its own login or
``WANDB_API_KEY`` (never logged here). The run id is stored in the run folder (``wandb-id``),
so a requeued or resumed job continues the same wandb run. Images (a job's predictions over a few
samples) go to wandb alone, and only a job that finds ``shows_media`` true prepares them.

The tracking service never fails a training job. Compute nodes often have no network: before an
online run starts, the server wandb would use (``WANDB_BASE_URL``, else wandb's settings) is asked
once, for at most :data:`REACH_TIMEOUT_S` seconds; when it does not answer, or ``wandb.init``
fails online all the same (no key, a refused key, a timeout), the run logs offline instead, with
one warning line saying how to upload it later. A ``wandb-id`` file that is not an id the toolkit
wrote (damaged, replaced, enormous) is replaced by a new id with a warning: the earlier wandb run
is then not continued, and the job goes on.
"""

from __future__ import annotations

import os
import re
import secrets
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_btunet.atomic import atomic_open
from hpc_btunet.errors import UserError
from hpc_btunet.readers import UnreadableFile, read_text
from hpc_btunet.train.run import RunDir

if TYPE_CHECKING:
    import numpy as np

MODES = ("offline", "online", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online"}  # wandb's older names, which it still reads
_SECRET_HINTS = ("key", "token", "secret", "password")
ID_NAME = "wandb-id"
RUN_ID = re.compile(r"[0-9a-f]{12}")  # what new_run_id writes
REACH_TIMEOUT_S = 5.0  # how long an online start waits for the server to answer
DEFAULT_BASE_URL = "https://api.wandb.ai"


def resolve_mode(mode: str) -> str:
    """The wandb mode a job runs with: ``WANDB_MODE`` when set (unless the flag disables
    wandb), else the flag; a value wandb does not know is refused with the valid ones."""
    if mode != "disabled":
        mode = os.environ.get("WANDB_MODE") or mode
        where = "WANDB_MODE" if os.environ.get("WANDB_MODE") else "--wandb"
    else:
        where = "--wandb"
    mode = _ALIASES.get(mode, mode)
    if mode not in MODES:
        raise UserError(f"{where} {mode!r} is not a wandb mode: choose one of {', '.join(MODES)}")
    return mode


def new_run_id() -> str:
    return secrets.token_hex(6)


def _warn(message: str) -> None:
    print(f"warning: {_redacted(message)}", file=sys.stderr, flush=True)


def _redacted(text: str) -> str:
    """``text`` without the API key and without credentials in a URL, on one line."""
    key = os.environ.get("WANDB_API_KEY")
    if key:
        text = text.replace(key, "<WANDB_API_KEY>")
    text = re.sub(r"(\w+://)[^/@\s]*@", r"\1", text)
    return " ".join(text.split())


def run_id(folder: Path) -> str:
    """The wandb run id of the run folder ``folder``: the one recorded in its ``wandb-id``, or a
    new one recorded there. A file that holds no id the toolkit writes is replaced by a new id,
    with a warning that the earlier wandb run is not continued (training goes on; only the
    dashboard's history is split)."""
    id_file = Path(folder) / ID_NAME
    try:
        text = read_text(id_file, 256, "wandb run id file").strip()
    except FileNotFoundError:
        problem = None  # a new run
    except UnreadableFile as e:
        problem = str(e).removeprefix(f"{id_file} ")
    else:
        if RUN_ID.fullmatch(text):
            return text
        shown = text if len(text) <= 40 else f"{text[:40]}..."
        problem = f"it holds {shown!r}, not a run id (12 hex digits)"
    if id_file.is_dir() and not id_file.is_symlink():
        raise UserError(
            f"{id_file} is a folder, where the run's wandb id is kept: move it away (the job "
            "then starts a new wandb run), or choose another --out"
        )
    new = new_run_id()
    if problem is not None:
        _warn(
            f"{id_file} is damaged ({problem}); starting a new wandb run {new}: the earlier "
            "wandb run of this folder is not continued (its offline runs stay in "
            f"{Path(folder) / 'wandb'})"
        )
    with atomic_open(id_file, "w") as f:
        f.write(new)
    return new


def base_url() -> str:
    """The server an online wandb run talks to: ``WANDB_BASE_URL``, else wandb's settings
    (its settings files, or its default)."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url
    try:
        from wandb.sdk import wandb_setup

        return str(wandb_setup.singleton().settings.base_url)  # starts no service
    except Exception:  # an older or newer wandb without this: its long-standing default
        return DEFAULT_BASE_URL


def shown_url(url: str) -> str:
    """``url`` as a log line may show it: scheme, host and port (no credentials, no path)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an invalid URL)"
    return f"{parts.scheme}://{host}{port}" if host else "(an invalid URL)"


def unreachable(url: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """Why the server at ``url`` gives no answer from here within ``timeout`` seconds (name
    resolution included), or None when it answers at all: any HTTP status, or a TLS handshake
    (whether wandb accepts the server is for ``wandb.init`` to find out). Proxies are taken from
    the environment, as wandb takes them."""
    answer: list[str | None] = []

    def ask() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):  # noqa: S310 - http(s) only
                pass
            answer.append(None)
        except urllib.error.HTTPError:
            answer.append(None)  # the server answered
        except urllib.error.URLError as e:
            answer.append(None if isinstance(e.reason, ssl.SSLError) else str(e.reason))
        except ssl.SSLError:
            answer.append(None)
        except (OSError, ValueError) as e:  # a timeout, a reset, not a URL
            answer.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        return f"{shown_url(url)} is not an http(s) URL"
    asker = threading.Thread(target=ask, name="wandb-reachability", daemon=True)
    asker.start()
    asker.join(timeout + 1)  # name resolution is not bounded by urlopen's timeout
    if not answer:
        return f"no answer within {timeout:.0f} s"
    return answer[0]


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
        mode = resolve_mode(mode)
        if not rundir.is_main or mode == "disabled":
            return
        import wandb

        rundir.path.mkdir(parents=True, exist_ok=True)
        later = (
            f"this run logs offline instead; upload it later from a machine with network: "
            f"wandb sync {rundir.path / 'wandb'}/offline-run-*"
        )
        if mode == "online" and (why := unreachable(url := base_url())) is not None:
            _warn(f"wandb server {shown_url(url)} cannot be reached from here ({why}); {later}")
            mode = "offline"

        the_id = run_id(rundir.path)

        def init(mode: str):
            return wandb.init(
                project=project,
                group=group,
                job_type=stage,
                name=name,
                id=the_id,
                resume="allow",
                dir=str(rundir.path),
                mode=mode,
                config=_public(config),
                allow_val_change=True,  # a resume may change the config (another world size)
                settings=wandb.Settings(console="off", silent=True),
            )

        if mode != "online":
            self.run = init(mode)
            return
        try:
            self.run = init("online")
        except Exception as e:  # CommError, UsageError (no key), AuthenticationError, timeouts
            first = next((line for line in str(e).splitlines() if line.strip()), "")
            _warn(f"wandb.init failed online ({type(e).__name__}: {first[:300]}); {later}")
            wandb.teardown()  # the failed run keeps its id in use otherwise
            self.run = init("offline")

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
