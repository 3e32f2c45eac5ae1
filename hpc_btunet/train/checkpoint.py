"""Checkpoints and weight files: written atomically, checked when read, loaded with
``torch.load(weights_only=True)``.

A job's checkpoints are folders ``<run>/checkpoints/step-NNNNNNNN/``, each holding the engine's
files (one per rank under DeepSpeed's ZeRO), the job's progress (``job.pt``) and, written last,
the marker ``complete.json`` listing every file with its size. They are written as
``.step-NNNNNNNN.partial/`` and renamed once the marker is there (see
:mod:`hpc_btunet.train.session` for the protocol across ranks), so a folder without its marker is
never taken for a checkpoint. Older ones are pruned, keeping ``keep`` of them, so that a damaged
newest one still leaves a good one: resuming takes the newest *intact* checkpoint (every listed
file present with its size, every torch archive passing its CRC check), and sets a damaged one
aside as ``step-NNNNNNNN.corrupt`` with a warning naming it.

Integrity: ``torch.save`` writes a zip archive with a CRC-32 of every member, which
``torch.load`` does not check (a flipped byte in a tensor loads as a wrong weight). Every read
here first checks those CRCs (``zipfile.testzip``): one extra sequential read of the file, far
cheaper than the training it protects, and no side file to keep in step with the checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

from hpc_btunet.atomic import atomic_open, write_json
from hpc_btunet.errors import UserError

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = (
    "complete.json"  # written last, after every rank has saved: a checkpoint without it is not one
)
JOB_STATE = (
    "job.pt"  # the job's own progress (step, epoch, curve, ...), written by the main process
)
PARTIAL = ".partial"


def partial_dir(folder: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is written before it is complete."""
    return Path(folder) / f".step-{step:08d}{PARTIAL}"


def prepare_partial(folder: Path, step: int) -> Path:
    """(Main process, before every rank saves.) An empty partial folder for ``step``; one a
    killed save left behind is removed first."""
    partial = partial_dir(folder, step)
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    return partial


def commit(partial: Path, meta: dict[str, Any], keep: int = 2) -> Path:
    """(Main process, after a barrier that every rank reached with its files written.) List the
    files with their sizes in the marker, written last, then rename the folder to ``step-N``
    and prune all but the ``keep`` newest checkpoints."""
    partial = Path(partial)
    _fsync_tree(partial)
    files = {
        str(p.relative_to(partial)): p.stat().st_size
        for p in sorted(partial.rglob("*"))
        if p.is_file()
    }
    write_json(partial / MARKER, meta | {"files": files})
    final = partial.parent / partial.name.removeprefix(".").removesuffix(PARTIAL)
    if final.exists():  # the same step saved again (a rerun of the final step)
        shutil.rmtree(final)
    partial.rename(final)
    _fsync_dir(final.parent)
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Make what every rank wrote durable before the marker says it is complete."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(d)


def remove_partial(folder: Path) -> list[Path]:
    """(The run folder's writer, at start.) Remove what saves cut short by a kill left."""
    folder = Path(folder)
    found = sorted(folder.glob(f".step-*{PARTIAL}")) if folder.is_dir() else []
    for p in found:
        shutil.rmtree(p, ignore_errors=True)
    return found


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints (folders with their marker), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in folder.iterdir()
        if (m := _STEP_DIR.match(p.name)) and (p / MARKER).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(folder: Path) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name.removeprefix("step-"))


def read_marker(path: Path) -> dict:
    """The marker of checkpoint ``path`` (engine, world size, files), or a UserError."""
    try:
        meta = json.loads((Path(path) / MARKER).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"checkpoint {path} has an unreadable {MARKER} ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict):
        raise UserError(f"checkpoint {path} has an unreadable {MARKER} (no file list)")
    return meta


def damage(path: Path) -> str | None:
    """Why ``path`` is not an intact torch archive, or None when every member's CRC matches."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a readable torch.save archive ({e})"
    return f"member {bad} fails its CRC check" if bad else None


def checkpoint_damage(path: Path) -> str | None:
    """Why checkpoint folder ``path`` cannot be resumed from, or None: its marker lists every
    file with its size, and every torch archive in it passes its CRC check."""
    try:
        meta = read_marker(path)
    except UserError as e:
        return str(e)
    for name, size in meta["files"].items():
        file = Path(path) / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written"
        if file.suffix == ".pt" and (problem := damage(file)):
            return f"{name}: {problem}"
    return None


def latest_intact_checkpoint(folder: Path, set_aside: bool = True) -> Path | None:
    """The newest intact checkpoint. Damaged newer ones are renamed to ``*.corrupt`` (when
    ``set_aside``; only one process of a job should) and named in a warning."""
    for path in reversed(list_checkpoints(folder)):
        problem = checkpoint_damage(path) if path.exists() else "removed meanwhile"
        if problem is None:
            return path
        if set_aside and path.exists():
            path.replace(path.with_name(path.name + ".corrupt"))
        print(
            f"warning: checkpoint {path} is damaged ({problem}); "
            + ("set aside as *.corrupt; " if set_aside else "")
            + "trying the one before it",
            file=sys.stderr,
            flush=True,
        )
    return None


def save_file(path: Path, state: Any) -> None:
    """``torch.save`` to a temporary name, renamed when complete."""
    with atomic_open(path, "wb") as f:
        torch.save(state, f)


def load_file(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with one clear message for each failure."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist: check the path")
    if not zipfile.is_zipfile(path):  # torch.save has written zip archives since torch 1.6
        raise UserError(
            f"{what} {path} is not a readable torch file (not a torch.save archive): check or recreate it"
        )
    if problem := damage(path):
        raise UserError(f"{what} {path} is damaged ({problem}): recreate it or copy it again")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next(
            (line.strip() for line in str(e).splitlines() if "Unsupported global" in line), ""
        )
        raise UserError(
            f"{what} {path} holds objects that a safe load refuses (weights_only=True): save a plain "
            f"state dict of tensors instead{f' ({detail})' if detail else ''}"
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(
            f"{what} {path} is not a readable torch file ({e}): check or recreate it"
        ) from e


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], signature: dict) -> None:
    """Write a bare state dict (``path``) and, beside it, the model it belongs to (``.json``)."""
    path = Path(path)
    write_json(path.with_suffix(".json"), signature)
    with atomic_open(path, "wb") as f:
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, f)


def load_weights(path: Path, what: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The state dict of ``path`` and the model signature stored beside it (None if absent)."""
    state = load_file(path, what)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(
            f"{what} {path} is not a state dict of tensors: pass an encoder.pt written by pretrain"
        )
    sidecar = Path(path).with_suffix(".json")
    signature = json.loads(sidecar.read_text()) if sidecar.is_file() else None
    return state, signature
