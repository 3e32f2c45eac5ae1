"""The toolkit's own jobs on the local SLURM cluster (2 nodes): multi-node DDP pre-training, a
fold array that waits for it, and preemption with requeue and resume."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from test_local_cluster import _job_state, _wait_for, local_cluster  # noqa: F401  (module fixture)

from hpc_btunet.train.checkpoint import list_checkpoints

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
TINY = [
    "--base-width",
    "4",
    "--depth",
    "2",
    "--batch-size",
    "4",
    "--executor",
    "slurm",
    "--profile",
    "local",
]


def cli(*args) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def job_id(stdout: str) -> str:
    return re.search(r"submitted (?:array )?job (\d+)", stdout).group(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from conftest import ToySource

    from hpc_btunet.data.pack import PackConfig, pack
    from hpc_btunet.data.splits import SplitConfig

    out = tmp_path_factory.mktemp("slurm") / "data"
    pack(
        ToySource(n=60),
        PackConfig(out=out, image_size=32, shard_size=20, splits=SplitConfig(folds=3)),
        log=lambda _: None,
    )
    return out


@pytest.mark.timeout(600)
def test_two_node_pretrain_then_fold_array_after_it(data, tmp_path):
    exp = tmp_path / "exp"
    out = cli(
        "pretrain",
        "--data",
        data,
        "--out",
        exp,
        "--steps",
        6,
        "--log-every",
        1,
        "--nodes",
        2,
        "--tasks-per-node",
        1,
        "--wait",  # on a multi-task job: every task's result is collected
        *TINY,
    )
    pre = job_id(out)
    assert "2 node(s) x 1 task(s)" in out and "pretrain: 1 job(s) completed" in out
    out = cli(
        "finetune",
        "--data",
        data,
        "--out",
        exp,
        "--folds",
        3,
        "--variants",
        "bt",
        "--epochs",
        2,
        "--after",
        pre,
        "--wait",
        *TINY,
    )
    assert re.search(r"submitted array job \d+ of 3 task\(s\) to SLURM .*after " + pre, out)
    deps = subprocess.run(["scontrol", "show", "job", pre], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in deps
    encoder = exp / "pretrain" / "unet" / "encoder.pt"
    assert encoder.exists()
    log = (exp / "pretrain" / "unet" / "metrics.jsonl").read_text()
    config = (exp / "pretrain" / "unet" / "config.yaml").read_text()
    assert "global_batch: 8" in config, "2 ranks x batch 4"
    assert len(log.splitlines()) == 6
    pre_logs = list((exp / "logs" / "pretrain").glob(f"{pre}/*_log.out"))
    assert len(pre_logs) == 2 and "2 rank(s)" in "".join(p.read_text() for p in pre_logs)
    for fold in range(3):
        metrics = json.loads(
            (exp / "finetune" / "unet" / "bt" / f"fold-{fold}" / "metrics.json").read_text()
        )
        assert metrics["pretrained"] == str(encoder) and metrics["fold"] == fold
    same = ["--data", data, "--out", exp, "--folds", 3, "--variants", "bt", "--epochs", 2]
    again = cli("finetune", *same, "--wait", *TINY)
    assert again.count("is complete") == 3 and "submitted" not in again
    # the same folders asked for with another option: refused before anything is queued
    other = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", "finetune", *map(str, same[:-1]), "3", *TINY],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert other.returncode == 2 and "epochs: 2 (run) vs 3 (now)" in other.stderr


@pytest.mark.timeout(600)
def test_two_node_contrastive_pair_on_image_level_labels(tmp_path):
    """The second method as a SLURM job over 2 nodes: the pairs of the global batch shared by
    the ranks, both networks' weights and the scored test split."""
    from conftest import pack_lesions

    data = pack_lesions(tmp_path / "lesions", n=40, seed=3)
    exp = tmp_path / "exp"
    out = cli("contrastive", "--data", data, "--out", exp, "--steps", 3, "--log-every", 1,
              "--nodes", 2, "--tasks-per-node", 1, "--wait", *TINY)  # fmt: skip
    assert "2 node(s) x 1 task(s)" in out and "contrastive: 1 job(s) completed" in out, out
    run = exp / "contrastive" / "pair" / "unet_plus_plus"
    assert "global_batch: 8" in (run / "config.yaml").read_text(), "2 ranks x batch 4"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["test_images"]["abnormal"] > 0
    for name in ("a", "b"):
        torch.load(run / f"{name}.pt", weights_only=True)
    logs = list((exp / "logs" / "contrastive").glob(f"{job_id(out)}/*_log.out"))
    assert len(logs) == 2 and "2 rank(s)" in "".join(p.read_text() for p in logs)


@pytest.mark.timeout(600)
def test_two_node_deepspeed_pretrain_saves_every_rank_partition(data, tmp_path):
    exp = tmp_path / "exp"
    out = cli(
        "pretrain",
        "--data",
        data,
        "--out",
        exp,
        "--steps",
        4,
        "--checkpoint-every",
        2,
        "--nodes",
        2,
        "--engine",
        "deepspeed",
        "--zero-stage",
        2,
        "--wait",
        *TINY,
    )
    assert "pretrain: 1 job(s) completed" in out
    run = exp / "pretrain" / "unet"
    last = list_checkpoints(run / "checkpoints")[-1]
    partitions = sorted(p.name for p in last.glob("zero_pp_rank_*_optim_states.pt"))
    assert partitions == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    marker = json.loads((last / "complete.json").read_text())
    assert marker["engine"] == "deepspeed" and marker["world_size"] == 2
    assert json.loads((run / "deepspeed.json").read_text())["train_batch_size"] == 8
    encoder = torch.load(run / "encoder.pt", weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in encoder.values())


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "engine", [[], ["--engine", "deepspeed", "--zero-stage", 1]], ids=["ddp", "deepspeed"]
)
def test_usr2_checkpoints_requeues_and_resumes(data, tmp_path, engine):
    exp = tmp_path / "exp"
    steps = 150
    out = cli(
        "pretrain",
        "--data",
        data,
        "--out",
        exp,
        "--steps",
        steps,
        "--checkpoint-every",
        5,
        "--log-every",
        1,
        "--nodes",
        2,
        "--tasks-per-node",
        1,
        *engine,
        *TINY,
    )
    jid = job_id(out)
    try:
        _preempt_and_check(jid, exp, steps)
    finally:
        subprocess.run(["scancel", jid], check=False)  # nothing left running if the test fails


def _preempt_and_check(jid: str, exp, steps: int) -> None:
    run = exp / "pretrain" / "unet"
    _wait_for(lambda: list_checkpoints(run / "checkpoints"), 240, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    # the job saves at the next step boundary and asks SLURM to requeue it
    _wait_for(lambda: int(_job_state(jid).get("Restarts", 0)) >= 1, 120, "the requeue")
    time.sleep(3)  # a requeued job waits for its BeginTime; release it (not at once: credentials)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=False)
    _wait_for(lambda: (run / "encoder.pt").exists(), 400, "the resumed job to finish", poll=1)
    logs = "".join(p.read_text() for p in (exp / "logs" / "pretrain").glob(f"{jid}/*_log.out"))
    m = re.search(r"preempted at step (\d+): checkpoint saved", logs)
    assert m, logs[-3000:]
    stopped = int(m.group(1))
    assert (
        f"resuming from {run / 'checkpoints' / f'step-{stopped:08d}'} (step {stopped} of {steps})"
        in logs
    )
    steps_logged = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_logged == list(range(1, steps + 1)), "the step counter continues where it stopped"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--partition", "gpu"],
            "--partition 'gpu' is unknown to this cluster: choose one of debug",
        ),
        (["--after", "999999"], "--after 999999: SLURM knows no job with this id"),
        (
            ["--profile", "local", "--nodes", "3"],
            "--nodes 3 is more than the cluster profile allows (2)",
        ),
        (["--time", "2h"], "--time '2h' is not a SLURM time"),
    ],
)
def test_requests_slurm_cannot_satisfy_stop_before_submission(data, tmp_path, args, message):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "hpc_btunet.submit",
            "pretrain",
            "--data",
            str(data),
            "--out",
            str(tmp_path),
            "--executor",
            "slurm",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    assert set(after.split()) <= set(before.split()), "no new job"


@pytest.mark.timeout(300)
def test_a_dead_rank_ends_a_two_node_job_at_once(data, tmp_path):
    """Rank 1 of a 2-node job fails on a damaged sample only it reads; srun --kill-on-bad-exit
    ends rank 0 too (not after --dist-timeout), and the error is in the main log and printed."""
    import shutil

    from conftest import flip_sample_byte

    from hpc_btunet.data.loader import plan_epoch
    from hpc_btunet.data.manifest import load_manifest

    damaged = tmp_path / "data"
    shutil.copytree(data, damaged)
    manifest = load_manifest(damaged)
    shards = manifest.shards_of("train")
    ref = plan_epoch(shards, None, batch_size=4, world_size=2, seed=0, epoch=0).rank_refs(1)[0]
    key = shards[ref.shard].keys[ref.pos]
    flip_sample_byte(damaged, manifest, key)
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hpc_btunet.submit", "pretrain", "--data", str(damaged)]
        + ["--out", str(tmp_path / "exp"), "--steps", "500", "--nodes", "2", "--wait"]
        + ["--tasks-per-node", "1", "--dist-timeout", "600", *map(str, TINY)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    took = time.monotonic() - start
    assert done.returncode == 2 and took < 60, (took, done.stdout, done.stderr)
    assert "failed (rank 1)" in done.stderr and key in done.stderr, done.stderr
    pre = job_id(done.stdout)
    main_log = next((tmp_path / "exp" / "logs" / "pretrain").glob(f"{pre}/{pre}_0_log.err"))
    assert "rank 1 failed: ShardError" in main_log.read_text()


@pytest.mark.timeout(300)
def test_a_job_after_one_that_then_fails_is_cancelled_not_pending(data, tmp_path):
    """The README's two-step workflow (``finetune --after J``) when J fails after the
    submission: SLURM cancels the dependent job (``--kill-on-invalid-dep``) instead of leaving
    it pending for good (DependencyNeverSatisfied)."""
    first = subprocess.run(
        ["sbatch", "--parsable", "-p", "debug", "-o", str(tmp_path / "j.out")]
        + ["--wrap", "sleep 8; exit 1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    failing = first.stdout.strip().split(";")[0]
    out = cli(
        "finetune", "--data", data, "--out", tmp_path / "exp", "--folds", 1,
        "--variants", "scratch", "--epochs", 1, "--after", failing, *TINY,
    )  # fmt: skip
    dependent = job_id(out)
    assert (
        "KillOInInvalidDependent=Yes"
        in subprocess.run(
            ["scontrol", "show", "job", dependent], capture_output=True, text=True
        ).stdout
    )
    _wait_for(lambda: _job_state(failing).get("JobState") == "FAILED", 120, "the job to fail")
    state = _wait_for(
        lambda: (s := _job_state(dependent).get("JobState")) not in ("PENDING", None) and s,
        120,
        "the dependent job to leave PENDING",
    )
    assert state == "CANCELLED", _job_state(dependent)
