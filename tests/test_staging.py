"""Node-local staging (``--stage-to``): one checked copy per node, reused, repaired, or refused
with one message and then a fallback or a stop."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import flip_sample_byte, submit_cli

from hpc_btunet.atomic import TMP_MARK
from hpc_btunet.data import make_loader, staging
from hpc_btunet.data.manifest import MANIFEST_NAME, load_manifest, verify_shards
from hpc_btunet.data.staging import (
    STAMP_NAME,
    StageError,
    expand,
    file_system_type,
    is_network,
    stage_dataset,
)
from hpc_btunet.errors import UserError
from hpc_btunet.folder_lock import FolderLock


@pytest.fixture
def dataset(toy_pack):
    """A packed dataset of 3 train and 2 test shards."""
    data, manifest = toy_pack(n=40, shard_size=10, image_size=16, folds=2)
    return data, manifest


@pytest.fixture
def job(monkeypatch):
    """``job(id)`` makes this process a process of SLURM job ``id``."""
    monkeypatch.delenv("SUBMITIT_LOCAL_JOB_ID", raising=False)
    return lambda job_id: monkeypatch.setenv("SLURM_JOB_ID", str(job_id))


@pytest.fixture
def hashes(monkeypatch):
    """The names of the staged files whose sha256 staging computed (not counting copies)."""
    seen: list[str] = []
    real = staging.sha256_file

    def counted(path, *args, **kwargs):
        seen.append(Path(path).name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(staging, "sha256_file", counted)
    return seen


def stage(data, to, splits=("train",), **kw):
    """``stage_dataset`` with its log lines kept: ``(result, lines)``."""
    lines: list[str] = []
    result = stage_dataset(data, to, splits, log=lines.append, **kw)
    return result, lines


def inodes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_ino for p in folder.glob("*.tar")}


def temporaries(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TMP_MARK}*"))


def test_a_copy_is_reused_by_its_job_without_hashing_and_rehashed_once_by_a_new_job(
    dataset, tmp_path, job, hashes
):
    data, manifest = dataset
    job(101)
    first, lines = stage(data, tmp_path / "local")
    assert first.staged and first.copied == 3 and first.reused == 0
    assert first.data.parent == tmp_path / "local" and first.data.name.startswith("hpc_btunet-")
    assert first.bytes_copied == sum(s.bytes for s in manifest.shards_of("train"))
    assert "3 shard(s) copied" in lines[0] and "MB/s" in lines[0]
    assert sorted(p.name for p in first.data.glob("*.tar")) == [
        s.name for s in manifest.shards_of("train")
    ]
    verify_shards(first.data, manifest.shards_of("train"))
    before = inodes(first.data)

    hashes.clear()
    again, lines = stage(data, tmp_path / "local")  # another rank of the same job
    assert again.data == first.data and again.copied == 3  # the node's figures, from the stamp
    assert hashes == [], "a stamp of this job is trusted without hashing"
    assert inodes(first.data) == before

    job(102)  # a later job on the same node
    later, lines = stage(data, tmp_path / "local")
    assert later.copied == 0 and later.reused == 3
    assert sorted(hashes) == [s.name for s in manifest.shards_of("train")], "each hashed once"
    assert inodes(first.data) == before, "no shard copied a second time"
    assert "0 shard(s) copied" in lines[0] and "3 reused" in lines[0]


def test_another_split_is_added_to_the_copy(dataset, tmp_path, job, hashes):
    data, manifest = dataset
    job(1)
    stage(data, tmp_path / "local", ("train",))
    hashes.clear()
    both, _ = stage(data, tmp_path / "local", ("train", "test"))  # the same job, fine-tuning
    assert both.copied == 2 and both.reused == 3
    assert hashes == [], "the train shards this job verified are not hashed again"
    verify_shards(both.data, manifest.shards)
    assert load_manifest(both.data).shards == manifest.shards


def test_an_interrupted_copy_is_never_complete_and_is_finished_later(
    dataset, tmp_path, job, monkeypatch
):
    data, manifest = dataset
    job(1)
    real, calls = staging._copy_shard, []

    def dies_at_second(source, target, shard, data):
        calls.append(shard.name)
        if len(calls) == 2:  # a temporary file half-written, then the process is gone
            (target.parent / f"{target.name}{TMP_MARK}dead").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        return real(source, target, shard, data)

    monkeypatch.setattr(staging, "_copy_shard", dies_at_second)
    with pytest.raises(KeyboardInterrupt):
        stage(data, tmp_path / "local")
    folder = next((tmp_path / "local").glob("hpc_btunet-*"))
    assert not (folder / MANIFEST_NAME).exists() and not (folder / STAMP_NAME).exists()
    with pytest.raises(UserError, match="incomplete|no packed dataset"):
        load_manifest(folder)
    assert temporaries(folder) and len(list(folder.glob("*.tar"))) == 1

    monkeypatch.setattr(staging, "_copy_shard", real)
    job(2)  # the requeued job, or the next one
    done, _ = stage(data, tmp_path / "local")
    assert done.copied == 2 and done.reused == 1
    assert not temporaries(folder)
    verify_shards(folder, manifest.shards_of("train"))
    assert (folder / MANIFEST_NAME).read_bytes() == (data / MANIFEST_NAME).read_bytes()


def test_a_missing_shard_is_copied_even_under_the_jobs_own_stamp(dataset, tmp_path, job):
    data, manifest = dataset
    job(1)
    first, _ = stage(data, tmp_path / "local")
    (first.data / "train-000001.tar").unlink()
    again, _ = stage(data, tmp_path / "local")
    assert again.copied == 1 and again.reused == 2
    verify_shards(first.data, manifest.shards_of("train"))


def test_a_damaged_copy_is_copied_again_and_the_job_reads_correct_data(dataset, tmp_path, job):
    data, manifest = dataset
    job(1)
    first, _ = stage(data, tmp_path / "local")
    key = manifest.shards_of("train")[1].keys[3]
    flip_sample_byte(first.data, manifest, key)  # same size: only its sha256 tells
    with pytest.raises(UserError, match="sha256"):
        verify_shards(first.data, manifest.shards_of("train"))

    job(2)
    repaired, _ = stage(data, tmp_path / "local")
    assert repaired.copied == 1 and repaired.reused == 2
    verify_shards(repaired.data, manifest.shards_of("train"))
    options = dict(batch_size=4, shuffle=False, drop_last=False, with_masks=False)
    staged = [b["image"] for b in make_loader(repaired.data, "train", **options)]
    original = [b["image"] for b in make_loader(data, "train", **options)]
    assert all(torch.equal(a, b) for a, b in zip(staged, original, strict=True))


def test_a_damaged_source_shard_is_refused_not_staged(dataset, tmp_path, job):
    data, manifest = dataset
    flip_sample_byte(data, manifest, manifest.shards_of("train")[0].keys[0])
    job(1)
    with pytest.raises(UserError, match=r"train-000000.tar: sha256 differs.*verify --data"):
        stage(data, tmp_path / "local")
    folder = next((tmp_path / "local").glob("hpc_btunet-*"))
    assert not (folder / "train-000000.tar").exists() and not temporaries(folder)


def _stage_in_child(data, to, job_id, start, results):
    os.environ["SLURM_JOB_ID"] = job_id
    real = staging._copy_shard

    def slow(*args):  # the others find the lock held and wait
        time.sleep(0.3)
        return real(*args)

    staging._copy_shard = slow
    start.wait(timeout=60)  # all at once, as the ranks of a node start
    try:
        result = stage_dataset(data, to, ("train", "test"), log=lambda _: None)
        results.put((os.getpid(), result.by, result.copied, result.reused))
    except BaseException as e:
        results.put((os.getpid(), f"error: {e!r}", -1, -1))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_the_processes_of_a_node_copy_once(dataset, tmp_path):
    data, manifest = dataset
    ctx = mp.get_context("spawn")
    results, start = ctx.Queue(), ctx.Barrier(3)
    procs = [
        ctx.Process(target=_stage_in_child, args=(data, tmp_path / "local", "7", start, results))
        for _ in range(3)
    ]
    for p in procs:
        p.start()
    try:
        outs = [results.get(timeout=90) for _ in procs]
    except queue.Empty:
        pytest.fail("a process did not finish staging within 90 s (hang?)")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    assert all(not by.startswith("error") for _, by, _, _ in outs), outs
    copiers = [pid for pid, by, _, _ in outs if by.startswith(f"pid {pid} ")]
    assert len(copiers) == 1, outs  # one copied, the others read its stamp
    assert {(copied, reused) for _, _, copied, reused in outs} == {(5, 0)}
    folder = next((tmp_path / "local").glob("hpc_btunet-*"))
    verify_shards(folder, manifest.shards)
    assert not temporaries(folder)


def test_a_waiter_gives_up_after_its_timeout(dataset, tmp_path, job):
    data, _ = dataset
    job(1)
    first, _ = stage(data, tmp_path / "local")
    with FolderLock(first.data, "staged dataset"):  # a copier that never finishes
        result, lines = stage(data, tmp_path / "local", wait_s=0.5)
        assert not result.staged and result.data == data
        assert "still staging it after 0.5 s" in lines[0] and "pid" in lines[0]
        with pytest.raises(StageError, match="wait for it to finish"):
            stage(data, tmp_path / "local", wait_s=0.5, on_error="stop")


# --- where the copy cannot go -----------------------------------------------------------------


def check_refusal(data, to, words, **kw):
    """Both choices: ``fallback`` reads ``data`` with the message logged; ``stop`` raises it."""
    result, lines = stage(data, to, on_error="fallback", **kw)
    assert not result.staged and result.data == data
    assert len(lines) == 1 and "reading --data" in lines[0] and "fallback" in lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert result.record()["reason"] in lines[0]
    with pytest.raises(StageError) as stop:
        stage(data, to, on_error="stop", **kw)
    for word in [*words, "--stage-on-error fallback"]:
        assert word in str(stop.value), (word, str(stop.value))


def test_a_path_that_cannot_be_created(dataset, tmp_path):
    data, _ = dataset
    (tmp_path / "a-file").write_text("not a folder")
    check_refusal(
        data, tmp_path / "a-file" / "stage", [str(tmp_path / "a-file"), "Not a directory"]
    )


def test_an_unset_variable(dataset, tmp_path, monkeypatch):
    data, _ = dataset
    monkeypatch.delenv("NOT_ON_THIS_NODE", raising=False)
    check_refusal(data, "$NOT_ON_THIS_NODE/stage", ["$NOT_ON_THIS_NODE is not set", "give a path"])


def test_variables_and_home_are_expanded_on_the_node(dataset, tmp_path, monkeypatch, job):
    data, _ = dataset
    job(4242)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "node-tmp"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert expand("$TMPDIR/hpc_btunet") == tmp_path / "node-tmp" / "hpc_btunet"
    assert expand("~/stage") == tmp_path / "home" / "stage"
    result, _ = stage(data, "$TMPDIR/$SLURM_JOB_ID")
    assert result.data.parent == tmp_path / "node-tmp" / "4242"


MOUNTS = "sysfs /sys sysfs rw 0 0\n/dev/sda1 / ext4 rw 0 0\n"


@pytest.mark.parametrize("kind", ["nfs", "nfs4", "lustre", "gpfs", "beegfs", "fuse.glusterfs"])
def test_a_network_file_system_is_refused(dataset, tmp_path, kind):
    data, _ = dataset
    table = tmp_path / "mounts"
    table.write_text(MOUNTS + f"server:/export {tmp_path / 'shared'} {kind} rw 0 0\n")
    (tmp_path / "shared").mkdir()
    to = tmp_path / "shared" / "stage"
    check_refusal(data, to, [str(to), f"{kind} file system", "node's own disk"], mounts=table)
    assert not to.exists(), "nothing is written to a network file system"


def test_the_mounts_table_is_read_by_longest_prefix(tmp_path):
    shared, local = tmp_path / "my share", tmp_path / "my share" / "scratch"
    table = tmp_path / "mounts"
    escaped = str(shared).replace(" ", "\\040")
    table.write_text(
        MOUNTS
        + f"srv:/x {escaped} nfs4 rw 0 0\n"
        + f"tmpfs {escaped}/scratch tmpfs rw 0 0\n"
        + f"srv:/y {tmp_path}/my shar lustre rw 0 0\n"  # a name prefix, not a folder prefix
    )
    assert file_system_type(shared / "a", table) == "nfs4"
    assert file_system_type(local / "a" / "b", table) == "tmpfs"
    assert file_system_type(tmp_path / "elsewhere", table) == "ext4"
    assert file_system_type(tmp_path, tmp_path / "no-such-table") is None
    assert is_network("nfs4") and is_network("fuse.sshfs") and not is_network("tmpfs")
    assert file_system_type(Path("/")) is not None  # this machine's /proc/mounts


def test_a_disk_without_room(dataset, small_disk, job):
    data, _ = dataset
    job(1)
    full = small_disk("full", size="64k")  # the train split needs 100 KiB
    check_refusal(data, full / "stage", [str(full / "stage"), "MB free", "room for the dataset"])
    assert not temporaries(full) and not list(full.rglob("*.tar")), "refused before copying"


def test_a_disk_that_fills_up_while_copying(dataset, small_disk, job, monkeypatch):
    data, _ = dataset
    job(1)
    full = small_disk("full", size="80k")  # room for two of the three train shards
    real = shutil.disk_usage
    monkeypatch.setattr(  # another job's files take the room after the check
        staging.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 40)
    )
    check_refusal(data, full / "stage", [str(full / "stage"), "No space left on device"])
    folder = next((full / "stage").glob("hpc_btunet-*"))
    assert not temporaries(full), "a failed write removes its temporary file"
    assert not (folder / MANIFEST_NAME).exists() and not (folder / STAMP_NAME).exists()


def test_a_read_only_disk(dataset, small_disk, job):
    data, _ = dataset
    job(1)
    ro = small_disk("ro", read_only=True)
    check_refusal(data, ro / "stage", [str(ro / "stage"), "Read-only file system"])


# --- the real command line --------------------------------------------------------------------

TINY = ["--base-width", "4", "--depth", "2", "--executor", "debug", "--wandb", "disabled"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pretraining_reads_the_staged_copy_and_records_it(tmp_path, monkeypatch):
    for name in ("SLURM_JOB_ID", "SUBMITIT_LOCAL_JOB_ID"):  # each command is a job of its own
        monkeypatch.delenv(name, raising=False)
    data, local = tmp_path / "shared" / "ds", tmp_path / "node"
    submit_cli(
        "pack", "--source", "synthetic", "--num-images", 40, "--image-size", 32, "--out", data
    )
    cmd = ["pretrain", "--data", data, "--batch-size", 4, "--steps", 2, *TINY]
    first = submit_cli(*cmd, "--out", tmp_path / "a", "--stage-to", local)
    folder = next(local.glob("hpc_btunet-*"))
    assert f"reading the dataset from {folder}" in first.stdout, first.stdout
    config = yaml.safe_load((tmp_path / "a" / "pretrain" / "unet" / "config.yaml").read_text())
    assert config["config"]["data"] == str(data)
    assert config["config"]["stage_to"] == str(local)
    staging = config["runtime"]["staging"]
    assert staging["staged"] and staging["data"] == str(folder) and staging["copied"] >= 1
    assert "stage_to" not in config["identity"]["options"]

    # the shared copy's shards are gone: a new job of two ranks can only read the node's copy
    for shard in data.glob("train-*.tar"):
        shard.unlink()
    two = [*cmd, "--executor", "local", "--tasks-per-node", 2, "--out", tmp_path / "b"]
    submit_cli(*two, "--stage-to", local)
    assert (tmp_path / "b" / "pretrain" / "unet" / "encoder.pt").is_file()
    (log,) = (tmp_path / "b" / "logs").rglob("*_0_log.out")
    assert f"reading the dataset from {folder}" in log.read_text()
    assert "0 shard(s) copied" in log.read_text(), log.read_text()  # re-hashed by one rank
    without = submit_cli(*cmd, "--out", tmp_path / "c", check=False)
    assert without.returncode == 2 and "train-000000.tar" in without.stderr


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_command_line_falls_back_or_stops(dataset, tmp_path):
    data, _ = dataset
    (tmp_path / "a-file").write_text("not a folder")
    bad = tmp_path / "a-file" / "stage"
    cmd = ["pretrain", "--data", data, "--batch-size", 4, "--steps", 1, *TINY, "--stage-to", bad]
    fell_back = submit_cli(*cmd, "--out", tmp_path / "a")
    assert "reading --data" in fell_back.stdout and str(bad) in fell_back.stdout
    config = yaml.safe_load((tmp_path / "a" / "pretrain" / "unet" / "config.yaml").read_text())
    assert config["runtime"]["staging"]["staged"] is False

    stopped = submit_cli(*cmd, "--out", tmp_path / "b", "--stage-on-error", "stop", check=False)
    err = stopped.stderr
    assert stopped.returncode == 2 and "Traceback" not in err, err
    assert sum("error:" in line for line in err.splitlines()) == 1, err
    assert str(bad) in err and "Not a directory" in err and "--stage-on-error fallback" in err


def _late_rank(rank: int, world: int) -> dict:
    """Rank 1 arrives 4 s late (a node still copying): a barrier on a group with a 2 s timeout
    (what the next collective would be under a short --dist-timeout) fails; wait_for_all,
    with its own longer timeout, holds the others until it arrives."""
    import datetime
    import time

    import torch.distributed as dist

    from hpc_btunet.distributed import wait_for_all

    short = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    if rank == 1:
        time.sleep(4)
    try:
        dist.barrier(group=short)
        plain = "passed"
    except RuntimeError:
        plain = "timed out"
    if rank == 1:
        time.sleep(4)
    start = time.monotonic()
    wait_for_all(30)
    return {"plain": plain, "waited": time.monotonic() - start}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ranks_wait_for_a_node_still_copying_beyond_the_collective_timeout():
    from multiproc import run_ranks

    results = run_ranks(_late_rank, 2, timeout=90)
    assert results[0]["plain"] == "timed out", "the control: a short-timeout barrier fails"
    assert results[0]["waited"] >= 3, "rank 0 waited for rank 1 in wait_for_all"
