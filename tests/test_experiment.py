"""`experiment` and `status` on this machine: the plan, its sbatch scripts (dry run), the whole
study in-process (debug executor), reruns that skip what is complete, a failed fold named in
the report and by status, and bad input refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import pack_toy, submit_cli

from hpc_btunet.errors import UserError

TINY = {
    "base_width": 4,
    "depth": 2,
    "device": "cpu",
    "pretrain_steps": 2,
    "pretrain_batch_size": 4,
    "pretrain_log_every": 1,
    "finetune_epochs": 1,
    "finetune_batch_size": 4,
}


def flags(values: dict) -> list[str]:
    out = []
    for k, v in values.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return pack_toy(tmp_path_factory.mktemp("exp") / "data", n=40)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    return pack_toy(tmp_path_factory.mktemp("exp-other") / "data", n=30)


def test_dry_run_prints_the_plan_and_sbatch_scripts_without_submitting(data, tmp_path):
    exp = tmp_path / "exp"
    args = ["experiment", "--data", data, "--out", exp, "--models", "unet,attention_unet"]
    args += ["--folds", 2, "--executor", "slurm", "--pretrain-nodes", 2, "--dry-run"]
    out = submit_cli(*args, *flags(TINY)).stdout
    # one pre-training job per model, on 2 nodes
    assert out.count("# --- sbatch script: pretrain/") == 2
    assert "#SBATCH --nodes=2" in out
    # per model one array of folds x {bt, scratch}, waiting for its own pre-training
    for model in ("unet", "attention_unet"):
        script = out.split(f"# --- sbatch script: finetune/{model} ")[1].split("# ---")[0]
        assert "#SBATCH --array=0-3%4" in script
        assert f"#SBATCH --dependency='afterok:<pretrain/{model}>'" in script
        assert "#SBATCH --kill-on-invalid-dep=yes" in script
        assert "#SBATCH --nodes=1" in script
    assert "bt tasks after <pretrain/unet> (afterok), scratch tasks at once" in out
    report = out.split("# --- sbatch script: report ")[1]
    assert (
        "afterany:<pretrain/unet>:<pretrain/attention_unet>:<finetune/unet>:"
        "<finetune/attention_unet>" in report
    )
    assert "dry run, nothing submitted" in out
    assert not exp.exists(), "a dry run writes nothing"


def _plan(data, exp, **extra):
    from hpc_btunet.experiment import build_plan

    return build_plan({"data": data, "out": exp, "executor": "debug"} | TINY | extra)


def test_the_study_in_process_then_a_rerun_skips_everything(data, tmp_path, capsys):
    from hpc_btunet.experiment import execute

    exp = tmp_path / "exp"
    assert execute(_plan(data, exp, models="unet", folds=2)) == 0
    assert (exp / "pretrain" / "unet" / "encoder.pt").exists()
    for variant in ("bt", "scratch"):
        for fold in range(2):
            result = exp / "finetune" / "unet" / variant / f"fold-{fold}" / "metrics.json"
            assert json.loads(result.read_text())["variant"] == variant
    assert (exp / "report" / "report.md").exists()
    record = json.loads((exp / "experiment.json").read_text())
    assert record["models"] == ["unet"] and record["folds"] == 2
    assert record["variants"] == ["bt", "scratch"]
    capsys.readouterr()

    assert execute(_plan(data, exp, models="unet", folds=2)) == 0
    out = capsys.readouterr().out
    assert "complete, skipped: pretrain/unet, finetune/unet/bt/fold-0" in out
    assert "running" not in out, "nothing runs again"

    status = submit_cli("status", "--experiment", exp).stdout
    assert status.count(" done ") >= 6 and "summary: pretrain 1/1 done" in status
    assert "finetune 4/4 done" in status and "report 1/1 done" in status


def test_a_failed_fold_is_named_by_the_command_the_report_and_status(
    data, tmp_path, monkeypatch, capsys
):
    from hpc_btunet.experiment import execute
    from hpc_btunet.train import finetune

    real = finetune.run

    def failing(cfg):
        if cfg.fold == 1 and cfg.variant == "scratch":
            raise UserError("simulated failure of this fold")
        return real(cfg)

    monkeypatch.setattr(finetune, "run", failing)
    exp = tmp_path / "exp"
    with pytest.raises(UserError) as e:
        execute(_plan(data, exp, models="unet", folds=2))
    assert "finetune/unet/scratch/fold-1: simulated failure of this fold" in str(e.value)
    report = (exp / "report" / "report.md").read_text()
    assert "scratch" in report and "fold-1" in report, "the report names the missing fold"
    assert (exp / "finetune" / "unet" / "bt" / "fold-1" / "metrics.json").exists()

    monkeypatch.setattr(finetune, "run", real)  # the rerun runs only what failed
    capsys.readouterr()
    assert execute(_plan(data, exp, models="unet", folds=2)) == 0
    out = capsys.readouterr().out
    assert "complete, skipped:" in out and "finetune/unet/bt/fold-1" in out
    assert (exp / "finetune" / "unet" / "scratch" / "fold-1" / "metrics.json").exists()


def test_local_executor_records_jobs_and_status_reads_them(data, tmp_path):
    exp = tmp_path / "exp"
    args = ["experiment", "--data", data, "--out", exp, "--models", "unet", "--folds", 1]
    args += ["--variants", "scratch", "--executor", "local"]
    done = submit_cli(*args, *flags(TINY), timeout=300)
    assert "finetune: 1/1 done" in done.stdout and "experiment: finished" in done.stdout
    record = json.loads((exp / "experiment.json").read_text())
    entry = record["tasks"]["finetune/unet/scratch/fold-0"]
    assert entry["executor"] == "local" and Path(entry["log"]).exists()
    status = submit_cli("status", "--experiment", exp).stdout
    assert "unet/scratch/fold-0" in status and "pretrain" not in status.split("\n", 2)[2]


def test_status_states_from_files(data, tmp_path):
    """done, failed (with the error and log), cancelled, not submitted, from the record alone:
    the job's outcome file and its log, never a pickle."""
    from hpc_btunet.errors import UserError
    from hpc_btunet.outcome import write_outcome
    from hpc_btunet.status import collect

    exp = tmp_path / "exp"
    logs = exp / "logs" / "finetune"
    logs.mkdir(parents=True)
    (logs / "7_0_0_log.err").write_text("start\n")
    write_outcome(logs, "7_0", 0, UserError("boom"))
    # a submitit result pickle beside it is never read (status would run its code)
    (logs / "7_0_0_result.pkl").write_bytes(b"cos\nsystem\n(S'touch pwned'\ntR.")
    record = {
        "format": 1,
        "data": str(data),
        "manifest_sha256": "x",
        "models": ["unet"],
        "variants": ["scratch"],
        "folds": 3,
        "executor": "slurm",
        "tasks": {
            "finetune/unet/scratch/fold-0": {
                "job_id": "7_0",
                "executor": "slurm",
                "log": str(logs / "7_0_0_log.err"),
            },
            "finetune/unet/scratch/fold-1": {
                "job_id": "7_1",
                "executor": "slurm",
                "log": str(logs / "7_1_0_log.err"),
                "dependency": "afterok:6",
            },
        },
    }
    (exp / "experiment.json").write_text(json.dumps(record))
    done = exp / "finetune" / "unet" / "scratch" / "fold-2"
    done.mkdir(parents=True)
    (done / "metrics.json").write_text("{}")
    _, rows = collect(exp)
    states = {r.label: (r.state, r.detail) for r in rows}
    assert states["unet/scratch/fold-0"][0] == "failed"
    assert "boom" in states["unet/scratch/fold-0"][1]
    assert str(logs / "7_0_0_log.err") in states["unet/scratch/fold-0"][1]
    assert states["unet/scratch/fold-1"] == (
        "cancelled",
        "never started (its dependency (afterok:6) failed, or scancel)",
    )
    assert states["unet/scratch/fold-2"][0] == "done"
    assert states["report"][0] == "not submitted"
    assert not (exp / "pwned").exists() and not Path("pwned").exists()


def test_task_progress_and_the_progress_line(tmp_path, monkeypatch):
    import io

    from hpc_btunet.status import Progress, task_progress

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("config:\n  total_steps: 40\n  epochs: 30\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 3, "loss": 12.5}) + "\n" + json.dumps({"step": 4, "loss": 11.0})
    )
    assert task_progress("pretrain", run) == "step 4/40 loss 11"
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "epoch": 1, "val_loss": 0.25}))
    assert task_progress("finetune", run) == "epoch 2/30 val loss 0.250"
    for uptime in (12.0, 1e6):  # the monotonic clock counts from boot: a fresh machine too
        stream = io.StringIO()
        progress = Progress(stream, every=3600)
        clock = iter([uptime, uptime + 1, uptime + 3601, uptime + 3602])
        monkeypatch.setattr("hpc_btunet.status.time.monotonic", clock.__next__)
        progress.show("a")  # the first line at once
        progress.show("b")  # too soon after "a": not printed to a log
        progress.show("c")  # an interval later
        progress.show("c")  # unchanged: not again
        progress.done("d")
        assert stream.getvalue() == "a\nc\nd\n", uptime


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"models": "unet,vnet"}, "unknown model(s) vnet"),
        ({"folds": 7}, "has 3 folds; ask for 1 to 3"),
        ({"variants": "bt,other"}, "use bt, scratch or bt,scratch"),
        ({"finetune_nodes": 2, "executor": "slurm"}, "finetune"),
        ({"pretrain_epochs": 0}, "pretrain stage: --epochs must be >= 1"),
        ({"parallel": 0}, "--parallel 0"),
    ],
)
def test_bad_options_refused_before_anything_runs(data, tmp_path, extra, message):
    from hpc_btunet.experiment import build_plan, execute

    exp = tmp_path / "exp"
    with pytest.raises(UserError) as e:
        execute(build_plan({"data": data, "out": exp, "executor": "debug"} | TINY | extra))
    assert message in str(e.value)
    assert not (exp / "experiment.json").exists()


def test_an_experiment_folder_of_another_dataset_is_refused(data, other_data, tmp_path):
    exp = tmp_path / "exp"
    args = ["--out", exp, "--models", "unet", "--folds", 1, "--variants", "scratch"]
    submit_cli("experiment", "--data", data, *args, "--executor", "debug", *flags(TINY))
    done = submit_cli(
        "experiment", "--data", other_data, *args, "--executor", "debug", *flags(TINY), check=False
    )
    assert done.returncode == 2, done.stderr
    assert "holds results of another dataset" in done.stderr and str(data) in done.stderr
    assert "Traceback" not in done.stderr


def test_status_of_a_folder_without_an_experiment(tmp_path):
    done = submit_cli("status", "--experiment", tmp_path, check=False)
    assert done.returncode == 2 and "experiment.json" in done.stderr
    assert "Traceback" not in done.stderr


def test_config_file_with_an_unknown_key(data, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text("pretrain_epochs: 2\npretrain_epoch: 3\n")
    done = submit_cli("experiment", "--data", data, "--config", config, "--dry-run", check=False)
    assert done.returncode == 2 and "unknown key(s) pretrain_epoch" in done.stderr


def _scripted_collect(monkeypatch, polls: list[list[str]]) -> list[float]:
    """``status.collect`` answers each poll with the next list of states (fold 0, fold 1, the
    report); ``time.sleep`` records its periods instead of sleeping. Returns the periods."""
    from hpc_btunet import status

    answers = iter(polls)
    record = {"data": "d", "manifest_sha256": "0" * 64, "models": ["unet"], "folds": 2}
    labels = [("finetune", "unet/scratch/fold-0"), ("finetune", "unet/scratch/fold-1")]
    labels.append(("report", "report"))

    def collect(out):
        states = next(answers)
        return record, [status.Row(*where, s) for where, s in zip(labels, states, strict=True)]

    slept: list[float] = []
    monkeypatch.setattr(status, "collect", collect)
    monkeypatch.setattr(status.time, "sleep", slept.append)
    return slept


def test_status_watch_refreshes_until_nothing_is_queued(monkeypatch, tmp_path, capsys):
    """``--watch S`` prints the table, sleeps S and prints it again while a task is pending or
    running, then stops, with exit status 1 because a task failed."""
    import argparse

    from hpc_btunet.status import run_status

    polls = [
        ["pending", "pending", "pending"],
        ["running", "done", "pending"],
        ["failed, boom", "done", "done"],
    ]
    slept = _scripted_collect(monkeypatch, polls)
    code = run_status(argparse.Namespace(experiment=tmp_path, watch=0.5))
    out = capsys.readouterr().out
    assert code == 1
    assert slept == [0.5, 0.5]
    assert out.count("summary:") == 3
    assert "finetune 0/2 done (2 pending)" in out
    assert "finetune 1/2 done (1 failed); report 1/1 done" in out


def test_status_watch_needs_a_positive_period(tmp_path):
    done = submit_cli("status", "--experiment", tmp_path, "--watch", "0", check=False)
    assert done.returncode == 2 and "--watch 0" in done.stderr
    assert "Traceback" not in done.stderr


def test_wait_for_experiment_fails_naming_what_did_not_finish(monkeypatch, tmp_path, capsys):
    from hpc_btunet import status

    polls = [["running", "pending", "pending"], ["done", "cancelled", "done"]]
    slept = _scripted_collect(monkeypatch, polls)
    with pytest.raises(UserError) as e:
        status.wait_for_experiment(tmp_path, period=3)
    assert str(e.value) == "1 task(s) did not finish: finetune/unet/scratch/fold-1 (cancelled)"
    assert slept == [3]
    assert "finetune 1/2 done (1 cancelled); report 1/1 done" in capsys.readouterr().out


def test_a_submission_slurm_refuses_is_one_message(monkeypatch):
    """sbatch's refusal (e.g. ``Job dependency problem`` for ``afterok`` on a job that failed)
    reaches the user as one ``UserError`` with SLURM's words, not submitit's traceback."""
    import contextlib

    import submitit

    from hpc_btunet.launch import slurm_submit

    class Refusing:
        def batch(self):
            return contextlib.nullcontext()

        def submit(self, fn, config):
            raise submitit.core.utils.FailedJobError(
                "sbatch: error: Batch job submission failed: Job dependency problem\n"
            )

    with pytest.raises(UserError) as e:
        slurm_submit(Refusing(), print, [1, 2])
    assert str(e.value) == (
        "SLURM refused the submission: sbatch: error: Batch job submission failed: "
        "Job dependency problem"
    )
