"""Red team of the report: every file it reads is untrusted input, and a report is one unit.

Damaged, hostile or misplaced results (NaN, out of range, another fold's file, a key given
twice, a named pipe, a predictions.npz that is not one or whose headers would size a huge
allocation) are named in report.md and left out of every number; only a folder without one
usable fold is refused. A report killed while it writes, or failing halfway, leaves the
previous complete report in place, and the next run puts the folder right. The command-line
cases run ``python -m hpc_btunet.submit report`` in a fresh process (marked slow).
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from numpy.lib import format as npy
from redteam import cli, refused, snapshot
from report_runs import predictions_of, write_record, write_run

from hpc_btunet.errors import UserError
from hpc_btunet.report import ReportConfig, run
from hpc_btunet.report.folder_swap import repair

KEYS = ["a", "b", "c"]


def _study(exp: Path, folds: int = 3, bt: float = 0.7, scratch: float = 0.5) -> Path:
    """unet with and without BT over ``folds`` folds, with predictions."""
    for fold in range(folds):
        write_run(exp, "unet", "bt", fold, bt, predictions=predictions_of(KEYS, bt))
        write_run(exp, "unet", "scratch", fold, scratch, predictions=predictions_of(KEYS, scratch))
    return exp


def _metrics(exp: Path, variant: str, fold: int) -> Path:
    return exp / "finetune" / "unet" / variant / f"fold-{fold}" / "metrics.json"


def _edit(path: Path, **test_mean) -> None:
    """Rewrite ``metrics.json`` with some test.mean values replaced (as a person would)."""
    result = json.loads(path.read_text())
    result["test"]["mean"] = result["test"]["mean"] | test_mean
    path.write_text(json.dumps(result))  # json writes NaN and Infinity as Python reads them


def _report(exp: Path, **options) -> str:
    return run(ReportConfig(experiment=exp, wandb="disabled", **options)).read_text()


def _left_out(text: str) -> str:
    return text.split("## Results left out\n")[1].split("\n## ")[0]


def _table(exp: Path) -> list[dict]:
    return list(csv.DictReader((exp / "report" / "table.csv").open()))


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _leftovers(exp: Path) -> list[str]:
    return sorted(p.name for p in exp.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# --- values read are checked ------------------------------------------------------------------


def test_nan_out_of_range_and_misplaced_results_are_named_and_left_out(tmp_path):
    exp = _study(tmp_path / "exp", folds=4)
    _edit(_metrics(exp, "bt", 1), dice=float("nan"))
    _edit(_metrics(exp, "bt", 2), precision=1.5)
    _edit(_metrics(exp, "bt", 3), iou=10**300)  # compared as it is, never made a float
    misplaced = _metrics(exp, "scratch", 3)  # fold 0's result copied into fold 3's folder
    misplaced.write_text(_metrics(exp, "scratch", 0).read_text())
    text = _report(exp)
    section = _left_out(text)
    assert f"{_metrics(exp, 'bt', 1)} is not a fine-tuning result (test.mean.dice is nan" in section
    assert f"{_metrics(exp, 'bt', 2)} is not a fine-tuning result (test.mean.precision is 1.5" in (
        section
    )
    says = "finetune/unet/scratch/fold-3 (it says unet/scratch/fold-0)"
    assert (
        f"{misplaced} is not the result of its folder {says}" in section
        and "move it back to its own run folder" in section
    )
    assert f"{_metrics(exp, 'bt', 3)} is not a fine-tuning result (test.mean.iou is 1000" in section
    assert "4 result file(s) left out: not in Table 2" in section
    # the table averages the usable folds only: 1 with BT, 3 without, the values as written
    rows = {r["bt"]: r for r in _table(exp)}
    assert rows["Y"]["folds"] == "1" and float(rows["Y"]["dice"]) == pytest.approx(0.7)
    assert rows["N"]["folds"] == "3" and float(rows["N"]["precision"]) == pytest.approx(0.5)
    table = (exp / "report" / "table.csv").read_text().lower()
    assert "nan" not in table and "1.5" not in table
    # a run whose result is left out is not also called missing
    assert "## Missing runs" not in text


def test_a_key_given_twice_is_left_out(tmp_path):
    exp = _study(tmp_path / "exp", folds=2)
    twice = _metrics(exp, "bt", 1)
    text = twice.read_text()
    twice.write_text(text[:-1] + ', "test": {"mean": {"dice": 1.0}}}')  # a second "test" key
    section = _left_out(_report(exp))
    assert f"{twice} gives the key 'test' twice in one object" in section
    assert "run that fold again" in section
    assert {r["bt"]: r["folds"] for r in _table(exp)} == {"Y": "1", "N": "2"}


def test_no_usable_fold_is_one_error_naming_each_file(tmp_path):
    exp = tmp_path / "exp"
    write_run(exp, "unet", "bt", 0, 0.5)
    write_run(exp, "unet", "scratch", 0, 0.5)
    _edit(_metrics(exp, "bt", 0), iou=float("inf"))
    _metrics(exp, "scratch", 0).write_text('{"model": "unet", "variant": "scr')
    before = snapshot(exp)
    with pytest.raises(UserError) as refusal:
        _report(exp)
    message = str(refusal.value)
    assert "\n" not in message
    assert f"no usable fine-tuning result under {exp}/finetune/, 2 left out" in message
    assert f"{_metrics(exp, 'bt', 0)} is not a fine-tuning result (test.mean.iou is inf" in message
    assert f"{_metrics(exp, 'scratch', 0)} is not valid JSON" in message
    assert snapshot(exp) == before  # nothing written, not even the lock


def _npy(array=None, *, shape=None, dtype=None, data: bytes = b"") -> bytes:
    """A ``.npy`` member: an array, or a bare header declaring ``shape`` and ``dtype``."""
    buf = io.BytesIO()
    if array is not None:
        npy.write_array(buf, array)
    else:
        header = {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
        npy.write_array_header_1_0(buf, header | {"shape": shape})
        buf.write(data)
    return buf.getvalue()


def _npz(path: Path, **members: bytes) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in members.items():
            z.writestr(f"{name}.npy", content)


GOOD = predictions_of(KEYS, 0.5)
HOSTILE = {
    "not-a-zip": ("bytes", b"PK\x03\x04 this is no archive", "unreadable (BadZipFile"),
    "truncated": ("truncate", None, "unreadable"),
    # a member shorter than its header says (the zip's directory kept, the data cut)
    "short-member": (
        "members",
        {
            "keys": _npy(GOOD["keys"]),
            "dice": _npy(GOOD["dice"]),
            "masks": _npy(shape=(3, 16, 16), dtype="u1", data=b"\1" * 100),
        },
        "masks.npy holds 228 bytes, its header describes 896",
    ),
    # a header declaring 10^12 keys: numpy would allocate 40 TB before reading a byte
    "huge-keys-header": (
        "members",
        {
            "keys": _npy(shape=(10**12,), dtype="<U10"),
            "dice": _npy(GOOD["dice"]),
            "masks": _npy(GOOD["masks"]),
        },
        "keys are <U10 (1000000000000,): more than 1,000,000 images",
    ),
    "huge-masks-header": (
        "members",
        {
            "keys": _npy(GOOD["keys"]),
            "dice": _npy(GOOD["dice"]),
            "masks": _npy(shape=(3, 10**6, 10**6), dtype="u1"),
        },
        "masks of 1000000 x 1000000 pixels",
    ),
    "object-keys": (
        "members",
        {
            "keys": _npy(np.array(["a", 1, None], dtype=object)),
            "dice": _npy(GOOD["dice"]),
            "masks": _npy(GOOD["masks"]),
        },
        "keys are object (3,), not one text key per image",
    ),
    "dice-out-of-range": (
        "members",
        {
            "keys": _npy(GOOD["keys"]),
            "dice": _npy(np.array([0.5, 2.0, 0.1])),
            "masks": _npy(GOOD["masks"]),
        },
        "per-image Dice outside [0, 1]",
    ),
    "outside-the-run-folder": ("name", "../../../../../../etc/passwd", "outside its run folder"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_damaged_or_hostile_predictions_are_a_sentence(tmp_path, case):
    exp = _study(tmp_path / "exp", folds=2)
    how, content, words = HOSTILE[case]
    folder = _metrics(exp, "scratch", 1).parent
    npz = folder / "predictions.npz"
    if how == "bytes":
        npz.write_bytes(content)
    elif how == "truncate":
        npz.write_bytes(npz.read_bytes()[:-40])
    elif how == "members":
        _npz(npz, **content)
    else:
        result = json.loads(_metrics(exp, "scratch", 1).read_text())
        _metrics(exp, "scratch", 1).write_text(json.dumps(result | {"predictions": content}))
    text = _report(exp)
    line = next(ln for ln in text.splitlines() if "runs without usable predictions:" in ln)
    assert words in line, line
    assert "1 run(s) without usable predictions are left out here and in the bootstrap" in text
    boot = next(csv.DictReader((exp / "report" / "bootstrap.csv").open()))
    assert boot["folds"] == "1"  # fold 0 alone is paired with predictions
    assert {r["bt"]: r["folds"] for r in _table(exp)} == {"Y": "2", "N": "2"}  # metrics kept


def test_a_record_is_checked_not_trusted(tmp_path):
    exp = _study(tmp_path / "exp", folds=2)
    write_record(exp, tmp_path / "data", ["unet"], 1_000_000_000)
    text = _report(exp)  # 10^9 expected folds would never finish
    assert "Note: " in text and "'folds' must be a whole number" in text
    assert "the expected runs are those found" in text


def test_a_metrics_log_is_read_line_by_line_within_bounds(tmp_path):
    exp = _study(tmp_path / "exp", folds=1)
    pretrain = exp / "pretrain" / "unet"
    pretrain.mkdir(parents=True)
    (pretrain / "encoder.pt").write_bytes(b"")
    (pretrain / "config.yaml").write_text("config: [unclosed\n")  # not YAML: left out
    lines = [
        '{"step": 1, "train_seconds": 60.0}',
        '{"step": 3, "train_seconds": 150.0}',
        '{"step": 4, "note": "' + "x" * 100_000 + '", "train_seconds": 999}',  # too long a line
        "not json",
        '{"train_seconds": NaN}',
        '{"train_seconds": true}',
        '{"train_seconds": 1, "train_seconds": 2}',  # a key twice: the line is not read
        "[1, 2]",
    ]
    (pretrain / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    text = _report(exp)
    assert "summed over requeues): unet 150 s (2.5 min)" in text
    assert "- pre-training:" not in text  # its config.yaml was not usable


# --- options ----------------------------------------------------------------------------------


def test_too_many_images_are_refused(tmp_path):
    write_run(tmp_path, "unet", "bt", 0, 0.5)
    with pytest.raises(UserError, match="--images gives 17 keys: Fig. 5 shows at most 16"):
        ReportConfig(experiment=tmp_path, images=",".join(f"k{i}" for i in range(17)))


@pytest.mark.slow
@pytest.mark.parametrize(
    "option, words",
    [
        (["--bootstrap", "1000000000"], ["--bootstrap must be >= 100 and <= 100000"]),
        (["--seed", "-1"], ["--seed must be >= 0, got -1"]),
    ],
)
def test_bootstrap_and_seed_bounds(tmp_path, option, words):
    exp = _study(tmp_path / "exp", folds=2)
    refused(["report", "--experiment", exp, *option], words, root=exp)


# --- a report is one unit ---------------------------------------------------------------------


def test_a_failing_rerun_leaves_the_previous_report_unchanged(tmp_path, monkeypatch):
    import hpc_btunet.report as report

    exp = _study(tmp_path / "exp", folds=2)
    _report(exp)
    before = snapshot(exp / "report")
    _edit(_metrics(exp, "bt", 0), dice=0.9)  # new numbers the failing run would write first

    def broken(*args):
        raise RuntimeError("a bug halfway through the report")

    monkeypatch.setattr(report, "fold_statistics", broken)  # after table.md, table.csv
    with pytest.raises(RuntimeError, match="halfway"):
        _report(exp)
    assert snapshot(exp / "report") == before
    assert _leftovers(exp) == []


@pytest.mark.slow
def test_a_refused_rerun_changes_nothing(tmp_path):
    exp = _study(tmp_path / "exp", folds=2)
    _report(exp)
    words = ["--images: nope not in the test split of fold 0's predictions", "e.g. a, b, c"]
    refused(["report", "--experiment", exp, "--images", "a,nope"], words, root=exp)


def test_offline_wandb_runs_move_into_the_new_report(tmp_path):
    exp = _study(tmp_path / "exp", folds=2)
    _report(exp)
    offline = exp / "report" / "wandb" / "offline-run-20240101_000000-abc"
    offline.mkdir(parents=True)
    (offline / "run-abc.wandb").write_bytes(b"not synced yet")
    _report(exp)
    assert (offline / "run-abc.wandb").read_bytes() == b"not synced yet"
    assert _leftovers(exp) == []


def test_repair_after_each_point_of_a_killed_swap(tmp_path):
    exp = tmp_path / "exp"
    # killed between the two renames: the old report is renamed back, the new one removed
    (exp / ".report.old-1234").mkdir(parents=True)
    (exp / ".report.old-1234" / "report.md").write_text("old, complete")
    (exp / ".report.tmp-abcd").mkdir()
    (exp / ".report.tmp-abcd" / "report.md").write_text("new")
    repair(exp / "report")
    assert (exp / "report" / "report.md").read_text() == "old, complete"
    assert _leftovers(exp) == []
    # killed after both: the new report stays, the old one's wandb runs move over
    old = exp / ".report.old-5678"
    (old / "wandb" / "offline-run-1").mkdir(parents=True)
    repair(exp / "report")
    assert (exp / "report" / "wandb" / "offline-run-1").is_dir()
    assert (exp / "report" / "report.md").read_text() == "old, complete"
    assert _leftovers(exp) == []


_KILLED = """
import os, signal, sys
from pathlib import Path
import hpc_btunet.report as report
from hpc_btunet.submit import main

where, written = sys.argv[1], []
if where == "writing":  # after two files of the new report are written
    real_write = report._write_text
    def write(path, text):
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, text)
        written.append(path)
    report._write_text = write
else:  # between the two renames of the swap: the old report moved away, the new not in place
    real_rename = os.rename
    def rename(src, dst, *args, **kw):
        if Path(src).name.startswith(".report.tmp-"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rename(src, dst, *args, **kw)
    os.rename = rename
sys.exit(main(sys.argv[2:]))
"""


def _killed(where: str, exp: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _KILLED, where, "report", "--experiment", str(exp)],
        env=dict(os.environ, WANDB_MODE="disabled"),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == -signal.SIGKILL, (done.returncode, done.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["writing", "between-renames"])
def test_a_killed_report_then_a_rerun_gives_one_consistent_folder(tmp_path, where):
    exp = _study(tmp_path / "exp", folds=2)
    _report(exp, bootstrap=200)
    first = _files(exp / "report")
    for fold in range(2):
        _edit(_metrics(exp, "bt", fold), precision=0.9, dice=0.8, iou=0.75)

    _killed(where, exp)
    (tmp,) = exp.glob(".report.tmp-*")
    if where == "writing":  # the new report's first files, never its report.md
        assert sorted(_files(tmp)) == ["table.csv", "table.md"]
    else:
        assert "report.md" in _files(tmp)
    if where == "writing":  # the previous report, whole: its tables and its text agree
        assert _files(exp / "report") == first
    else:  # no report.md outside a complete folder (status says "not done" for a moment)
        assert not (exp / "report").exists()
        assert any(".report.old-" in name for name in _leftovers(exp))

    _report(exp, bootstrap=200)
    second = _files(exp / "report")
    assert _leftovers(exp) == []
    assert "| U-Net | Y | 2 | 0.900 ± 0.000 | 0.800 ± 0.000 | 0.750 ± 0.000 |" in (
        second["report.md"].decode()
    )
    assert b"0.9" in second["table.csv"] and second["table.md"] != first["table.md"]
    _report(exp, bootstrap=200)  # undisturbed: the same files, byte for byte
    assert _files(exp / "report") == second


@pytest.mark.slow
def test_named_pipes_are_named_within_seconds(tmp_path):
    exp = _study(tmp_path / "exp", folds=2)
    fifo = _metrics(exp, "scratch", 1)
    fifo.unlink()
    os.mkfifo(fifo)
    os.mkfifo(fifo.parent / "config.yaml")
    pretrain = exp / "pretrain" / "unet"
    pretrain.mkdir(parents=True)
    (pretrain / "encoder.pt").write_bytes(b"")
    os.mkfifo(pretrain / "metrics.jsonl")
    os.mkfifo(pretrain / "config.yaml")
    done = cli(["report", "--experiment", exp], timeout=30)  # a read of a FIFO never returns
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    text = (exp / "report" / "report.md").read_text()
    assert f"- {fifo} is a named pipe (FIFO), not a regular file" in _left_out(text)
    assert "unet n/a (not logged by its version)" in text  # the pipe in place of the log
    assert f"1 result(s) left out (named in {exp}/report/report.md): {fifo}" in done.stdout
