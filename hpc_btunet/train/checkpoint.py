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

Records read back are untrusted input (:mod:`hpc_btunet.readers`): a marker must be a regular
file of bounded size holding strict JSON whose file list names files inside its folder with their
sizes; the JSON beside a weight file (its model signature) likewise. Weights loaded as an input
(``--pretrained``) must be finite: NaN or infinite weights are refused naming the file.

Integrity: ``torch.save`` writes a zip archive with a CRC-32 of every member, which
``torch.load`` does not check (a flipped byte in a tensor loads as a wrong weight). Every read
here first checks those CRCs (``zipfile.testzip``): one extra sequential read of the file, far
cheaper than the training it protects, and no side file to keep in step with the checkpoint.
"""

from __future__ import annotations

import math
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
from hpc_btunet.readers import MB, UnreadableFile, inside, read_json, regular_file

_STEP_DIR = re.compile(r"^step-(\d{8})$")
MARKER = (
    "complete.json"  # written last, after every rank has saved: a checkpoint without it is not one
)
JOB_STATE = (
    "job.pt"  # the job's own progress (step, epoch, curve, ...), written by the main process
)
PARTIAL = ".partial"
MARKER_LIMIT = 16 * MB  # a marker lists every rank's files: a few hundred bytes each
SIGNATURE_LIMIT = 1 * MB  # the model signature beside a weight file


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
    """The marker of checkpoint ``path`` (engine, world size, files), or a UserError naming it
    and the way out (the checkpoint before it is used once this one is gone)."""
    try:
        return _marker(path)
    except _Damaged as e:
        raise UserError(f"checkpoint {path} cannot be resumed: {e}") from None


class _Damaged(Exception):
    """Why a checkpoint's marker is not one :func:`commit` writes (naming it, with the fix)."""


_MARKER_FIX = "move its checkpoint folder away to resume from the one before it"


def _marker(path: Path) -> dict:
    marker = Path(path) / MARKER
    try:
        meta = read_json(marker, MARKER_LIMIT, "checkpoint marker", _MARKER_FIX)
    except FileNotFoundError:
        raise _Damaged(f"{marker} is missing: {_MARKER_FIX}") from None
    except UnreadableFile as e:
        raise _Damaged(str(e)) from None
    except OSError as e:
        raise _Damaged(f"{marker} cannot be read ({e.strerror or e}): {_MARKER_FIX}") from None
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        raise _Damaged(f"{marker} holds no file list: {_MARKER_FIX}")
    for name, size in files.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _Damaged(f"{marker} gives {name!r} no byte count: {_MARKER_FIX}")
        if inside(name, path) in (None, Path(path).resolve()):
            raise _Damaged(
                f"{marker} lists {name!r}, which is not a file inside the checkpoint: "
                + _MARKER_FIX
            )
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
        meta = _marker(path)
    except _Damaged as e:
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
    try:
        regular_file(path, f"pass the {what} file itself")
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist: check the path") from None
    except UnreadableFile as e:
        raise UserError(f"{what} {e}") from None
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
    bad = next((k for k, v in state.items() if v.is_floating_point() and not _finite(v)), None)
    if bad is not None:
        values = state[bad]
        kind = "NaN" if values.isnan().any() else "infinite"
        raise UserError(
            f"{what} {path} holds {kind} weights ({bad}): the run that wrote it diverged; pass "
            "another file, or run it again (pretrain: a lower --lr or --grad-clip)"
        )
    return state, read_signature(path, what)


def _finite(t: torch.Tensor) -> bool:
    return t.numel() == 0 or math.isfinite(t.float().abs().max().item())


def read_signature(path: Path, what: str) -> dict | None:
    """The model signature written beside weight file ``path`` (``.json``), or None when there
    is none; one that is not a JSON object is refused naming it."""
    sidecar = Path(path).with_suffix(".json")
    fix = f"remove it to load {Path(path).name} without its check, or copy both files again"
    try:
        signature = read_json(sidecar, SIGNATURE_LIMIT, "model signature", fix)
    except FileNotFoundError:
        return None
    except UnreadableFile as e:
        raise UserError(f"{what}: {e}") from None
    if not isinstance(signature, dict):
        raise UserError(f"{what}: {sidecar} is not a model signature (a JSON object): {fix}")
    return signature
