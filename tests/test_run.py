"""A run folder's identity: a rerun with other options is refused, or continued on purpose and
recorded; what a killed run left behind is cleaned up by the next writer, under the lock."""

import json

import pytest
import torch
import yaml

from hpc_btunet.errors import UserError
from hpc_btunet.folder_lock import FolderLock, FolderLocked
from hpc_btunet.train import pretrain
from hpc_btunet.train.checkpoint import list_checkpoints
from hpc_btunet.train.preemption import Preempted, PreemptionWatcher


@pytest.fixture
def data(toy_pack):
    out, _ = toy_pack(n=60, image_size=32, shard_size=15)
    return out


def config(data, out, **kw):
    base = dict(
        data=data, out=out, steps=8, checkpoint_every=4, batch_size=8, base_width=4, depth=2
    )
    return pretrain.PretrainConfig(**base | kw)


def test_identity_holds_result_options_and_inputs_by_content(data, tmp_path):
    a = config(data, tmp_path).identity(1)
    assert a["options"]["lr"] == 1e-3 and a["batch"] == {"global": 8, "batchnorm": 8}
    assert "checkpoint_every" not in a["options"] and "out" not in a["options"]
    assert "data" not in a["options"] and len(a["dataset_manifest_sha256"]) == 64
    assert config(data, tmp_path / "elsewhere", checkpoint_every=2).identity(1) == a
    assert config(data, tmp_path, lambd=0.01).identity(1) != a
    # the batch layout counts by what it amounts to: the global batch and BatchNorm's batch
    assert config(data, tmp_path).identity(2) != a  # 2 x 8: another global batch
    assert config(data, tmp_path, batch_size=4).identity(2) == a  # 2 x 4, global BatchNorm
    assert config(data, tmp_path, batch_size=4, bn_scope="local").identity(2) != a
    local = config(data, tmp_path, batch_size=4, bn_scope="local").identity(2)
    assert config(data, tmp_path, batch_size=4, accumulate=2, bn_scope="local").identity(1) == local
    assert config(data, tmp_path, num_workers=3).identity(1) == a  # the order does not change


def test_forced_resume_continues_and_records_the_change(data, tmp_path):
    pretrain.run(config(data, tmp_path, steps=4, log_every=1))
    (config(data, tmp_path).run_dir() / "encoder.pt").unlink()
    with pytest.raises(UserError, match=r"steps: 4 \(run\) vs 8 \(now\).*--force-resume"):
        pretrain.run(config(data, tmp_path, steps=8, log_every=1))
    pretrain.run(config(data, tmp_path, steps=8, log_every=1, force_resume=True))
    record = yaml.safe_load((config(data, tmp_path).run_dir() / "config.yaml").read_text())
    assert record["identity"]["options"]["steps"] == 8
    assert record["history"][0]["identity"]["options"]["steps"] == 4
    log = (config(data, tmp_path).run_dir() / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == list(range(1, 9))


def test_rerun_after_the_final_checkpoint_writes_the_encoder(data, tmp_path, capsys):
    cfg = config(data, tmp_path, steps=4, checkpoint_every=4)
    encoder = pretrain.run(cfg)
    first = torch.load(encoder, weights_only=True)
    encoder.unlink()  # killed after the last checkpoint, before encoder.pt
    assert pretrain.run(cfg) == encoder
    assert "(step 4 of 4)" in capsys.readouterr().out
    again = torch.load(encoder, weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_a_job_refuses_a_folder_another_process_writes(data, tmp_path):
    cfg = config(data, tmp_path)
    with FolderLock(cfg.run_dir()), pytest.raises(FolderLocked, match="being written by"):
        pretrain.run(cfg)


def test_a_fresh_start_drops_the_log_of_a_run_killed_before_its_first_checkpoint(data, tmp_path):
    cfg = config(data, tmp_path, steps=3, checkpoint_every=10, log_every=1)
    cfg.run_dir().mkdir(parents=True)
    (cfg.run_dir() / "metrics.jsonl").write_text('{"step": 1, "loss": 9}\n{"step": 2, "lo')
    pretrain.run(cfg)
    log = (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3]
    assert json.loads(log[0])["loss"] != 9


def _stop_at(monkeypatch, call: int) -> None:
    """SLURM's warning, seen at the ``call``-th check (deterministic, no real signal)."""
    calls = {"n": 0}

    def should_stop(self):
        calls["n"] += 1
        if calls["n"] >= call:
            self.received = 12
        return self.received is not None

    monkeypatch.setattr(PreemptionWatcher, "should_stop", should_stop)


def test_preemption_is_seen_while_verifying_shards(data, tmp_path, monkeypatch):
    _stop_at(monkeypatch, 1)
    cfg = config(data, tmp_path, verify=True)
    with pytest.raises(Preempted, match="verifying shards"):
        pretrain.run(cfg)
    assert not list_checkpoints(cfg.run_dir() / "checkpoints")


def test_resuming_mid_epoch_reads_no_batch_before_the_checkpoint(data, tmp_path, monkeypatch):
    from hpc_btunet.data.loader import ShardStream

    cfg = config(data, tmp_path, steps=8, checkpoint_every=3)  # 5 steps per epoch: 3 is mid-epoch
    _stop_at(monkeypatch, 3)
    with pytest.raises(Preempted, match="step 3"):
        pretrain.run(cfg)
    assert [p.name for p in list_checkpoints(cfg.run_dir() / "checkpoints")] == ["step-00000003"]
    monkeypatch.undo()
    decoded = []
    real = ShardStream._decode
    monkeypatch.setattr(
        ShardStream, "_decode", lambda self, *a: decoded.append(1) or real(self, *a)
    )
    pretrain.run(cfg)
    assert len(decoded) == 5 * 8, "steps 4-8 only: 2 batches of epoch 0, 3 of epoch 1"


def test_accumulation_reads_only_the_batches_that_make_whole_steps(data, tmp_path, monkeypatch):
    from hpc_btunet.data.loader import ShardStream

    decoded = []
    real = ShardStream._decode
    monkeypatch.setattr(
        ShardStream, "_decode", lambda self, *a: decoded.append(1) or real(self, *a)
    )
    # 42 images, micro-batches of 8: 5 per epoch, 2 steps of 2 micro-batches, 1 left over
    pretrain.run(config(data, tmp_path, steps=4, accumulate=2))
    assert len(decoded) == 4 * 2 * 8, "the leftover micro-batch of each epoch is not read"


# --- records read back: config.yaml and metrics.jsonl ------------------------------------------


def test_config_yaml_reads_back_what_was_written(data, tmp_path):
    """Strings a YAML 1.2 reader takes for numbers are quoted when written."""
    from hpc_btunet.train.run import RunDir

    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    config = {"lr": 1e-3, "name": "1e-3", "mode": "0o17", "clock": "1:30", "big": 1e20}
    rundir.write_config(config, {"options": config}, "0" * 64)
    assert rundir.recorded()["config"] == config
    assert rundir.recorded()["identity"] == {"options": config}


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"identity: {a: 1}\nidentity: {a: 2}\n", "'identity' is given twice"),
        (b"\x00\xff\x13garbage", "not UTF-8 text"),
        (b"- a list\n", "must hold a mapping"),
        (b"identity: [unclosed\n", "not valid YAML"),
    ],
    ids=["duplicate-key", "binary", "list", "broken"],
)
def test_a_damaged_config_yaml_is_refused_naming_it(tmp_path, content, words):
    from hpc_btunet.train.run import RunDir

    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    rundir.config_file.write_bytes(content)
    with pytest.raises(UserError) as e:
        rundir.check_records()
    assert str(rundir.config_file) in str(e.value) and words in str(e.value)
    assert "remove the run folder" in str(e.value)


def test_config_yaml_of_enormous_size_is_refused_before_it_is_read(tmp_path):
    import os

    from hpc_btunet.train.run import CONFIG_LIMIT, RunDir

    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    with open(rundir.config_file, "wb") as f:  # sparse: no disk, no memory
        f.truncate(CONFIG_LIMIT + 1)
    with pytest.raises(UserError, match="bytes, more than a run record"):
        rundir.recorded()
    os.unlink(rundir.config_file)
    os.mkfifo(rundir.config_file)  # opening it for reading would block without O_NONBLOCK
    with pytest.raises(UserError, match="named pipe"):
        rundir.recorded()


def test_a_metrics_log_that_is_no_file_is_refused_before_submission(tmp_path):
    import os

    from hpc_btunet.train.run import RunDir

    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    os.mkfifo(rundir.metrics_log)
    with pytest.raises(UserError, match="metrics.jsonl is a named pipe"):
        rundir.check_records()


def test_resume_drops_damaged_log_lines_with_one_warning(tmp_path, capsys):
    from hpc_btunet.train.run import RunDir

    rundir = RunDir(tmp_path / "run")
    rundir.path.mkdir()
    lines = [
        b'{"step": 1, "loss": 1.0}',
        b'{"step": 2, "loss": 0.9, "loss": 5.0}',  # a key twice: edited
        b"\xff\xfe binary",
        b'{"step": "three"}',
        b"x" * (2 << 20),  # a line longer than a record
        b'{"step": 4, "loss": 0.7}',
        b'{"step": 5, "loss": 0.6}',  # after the checkpoint: logged again
        b'{"step": 6, "lo',  # cut short by a kill: dropped silently
    ]
    rundir.metrics_log.write_bytes(b"\n".join(lines))
    rundir.truncate_log(4)
    kept = rundir.metrics_log.read_text().splitlines()
    assert [json.loads(line)["step"] for line in kept] == [1, 4]
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and str(rundir.metrics_log) in err
    assert "4 damaged line(s) dropped (line 2: not a JSON record)" in err


def test_resume_keeps_an_intact_log_silently(tmp_path, capsys):
    from hpc_btunet.train.run import RunDir

    rundir = RunDir(tmp_path / "run")
    for step in range(1, 5):
        rundir.log({"step": step, "loss": 1.0 / step})
    rundir.truncate_log(3)
    assert [json.loads(x)["step"] for x in rundir.metrics_log.read_text().splitlines()] == [1, 2, 3]
    assert capsys.readouterr().err == ""
