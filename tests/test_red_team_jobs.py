"""Red team, jobs and tracking: what a job reads or meets (its options, its inputs, its run
folder's records, the tracking service) through the real command line, on tiny data.

A refusal (``REFUSED``) must be made before submission: exit status 2, exactly one ``error:``
line naming the thing and the fix, no traceback, and nothing written or lost below the folder
holding the inputs (:func:`redteam.refused`). Where refusing is not what a user wants, the stated
safe behaviour is checked instead: a job whose wandb server cannot be reached trains and logs
offline with one warning saying how to upload later; a resumed run whose ``wandb-id`` is damaged
starts a new wandb run with one warning. A few cases of the same readers run in-process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ToySource
from redteam import cli, refused

from hpc_btunet.data.manifest import load_manifest
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.errors import UserError
from hpc_btunet.models import build_model, model_signature
from hpc_btunet.train.checkpoint import (
    MARKER,
    latest_intact_checkpoint,
    load_weights,
    read_marker,
    save_weights,
)

TINY = ["--base-width", "4", "--depth", "2"]
# the run every run-folder case starts from: 2 steps, a checkpoint after each
RUN = ["--batch-size", "4", "--steps", "2"]
API_KEY = "0123456789abcdef" * 2 + "01234567"  # 40 characters, as wandb's keys


def _pretrain(data, out, *extra) -> list[str]:
    return ["pretrain", "--data", data, "--out", out, *TINY, *RUN, *extra]


def _rewrite_manifest(folder: Path, **changes) -> None:
    """A manifest another tool (or an older version) could have written: consistent, with its
    checksum, and with ``changes``."""
    m = load_manifest(folder)
    m = dataclasses.replace(m, **changes, counts={})
    (folder / "manifest.json").write_text(json.dumps(m.to_json()))


def _encoder(path: Path, poison: float | None = None) -> Path:
    unet = build_model("unet", in_channels=1, base_width=4, depth=2)
    state = unet.encoder.state_dict()
    if poison is not None:
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name] = torch.full_like(state[name], poison)
    signature = model_signature("unet", in_channels=1, base_width=4, depth=2)
    save_weights(path, state, signature | {"image_size": 32})
    return path


def _make_world(root: Path) -> dict[str, Path]:
    w: dict[str, Path] = {}
    w["data"] = root / "data"
    pack(
        ToySource(n=40),
        PackConfig(out=w["data"], image_size=32, shard_size=15, splits=SplitConfig(folds=3)),
        log=lambda _: None,
    )
    manifest = load_manifest(w["data"])
    w["emptyfold"] = root / "emptyfold"
    shutil.copytree(w["data"], w["emptyfold"])
    f = manifest.folds
    _rewrite_manifest(w["emptyfold"], folds=[f[0], sorted(f[1] + f[2]), []])
    w["emptytest"] = root / "emptytest"
    shutil.copytree(w["data"], w["emptytest"])
    test = set(manifest.splits["test"])
    _rewrite_manifest(
        w["emptytest"],
        splits={"train": manifest.splits["train"], "test": []},
        shards=[s for s in manifest.shards if s.split != "test"],
        groups={k: g for k, g in manifest.groups.items() if k not in test},
    )

    w["nan_encoder"] = _encoder(root / "nan" / "encoder.pt", float("nan"))
    w["inf_encoder"] = _encoder(root / "inf" / "encoder.pt", float("-inf"))
    w["dup_signature"] = _encoder(root / "dup" / "encoder.pt")
    (root / "dup" / "encoder.json").write_text('{"model": "unet", "model": "attention_unet"}')
    w["list_signature"] = _encoder(root / "list" / "encoder.pt")
    (root / "list" / "encoder.json").write_text("[1, 2]")

    for name, text in {
        "ds_offload": '{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}',
        "ds_cpu_offload": '{"zero_optimization": {"cpu_offload": true}}',
        "ds_duplicate": '{"gradient_clipping": 0.0, "gradient_clipping": 1.0}',
    }.items():
        w[name] = root / f"{name}.json"
        w[name].write_text(text + "\n")

    # an interrupted run (its encoder removed) that logged to wandb offline
    started = root / "started"
    done = cli(
        [*_pretrain(w["data"], started), "--checkpoint-every", "1"]
        + ["--executor", "debug", "--wandb", "offline"],
        cwd=root,
        env={"WANDB_MODE": "offline", **_wandb_sandbox(root)},
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    run = started / "pretrain" / "unet"
    for name in ("encoder.pt", "encoder.json"):
        (run / name).unlink()
    assert (run / "checkpoints" / "step-00000002" / MARKER).is_file()
    assert (run / "wandb-id").is_file()
    w["started"] = started

    def damaged(name: str, damage) -> None:
        copy = root / name
        shutil.copytree(started, copy, symlinks=True)
        damage(copy / "pretrain" / "unet")
        w[name] = copy

    def write(rel: str, content: bytes):
        return lambda run: (run / rel).write_bytes(content)

    def huge(rel: str, size: int):
        def make(run: Path) -> None:
            with open(run / rel, "wb") as f:
                f.truncate(size)  # sparse: no disk, no memory

        return make

    def fifo(rel: str):
        def make(run: Path) -> None:
            (run / rel).unlink()
            os.mkfifo(run / rel)

        return make

    config = (run / "config.yaml").read_text()
    damaged("config_dup", write("config.yaml", (config + "config: {}\n").encode()))
    damaged("config_binary", write("config.yaml", b"\x00\xff\xfe\x13" * 64))
    damaged("config_huge", huge("config.yaml", 64 << 20))
    step = "checkpoints/step-00000002/" + MARKER
    damaged("marker_garbage", write(step, b'{"engine": "ddp", "files": {"engine.pt": 1'))
    escape = {"engine": "ddp", "world_size": 1, "files": {"../../../../../etc/hostname": 1}}
    damaged("marker_escape", write(step, json.dumps(escape).encode()))
    damaged("metrics_fifo", fifo("metrics.jsonl"))
    return w


def _wandb_sandbox(root: Path) -> dict[str, str]:
    """wandb's configuration, error reports and metadata probes kept off this user's settings
    and off the network."""
    return {
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_ERROR_REPORTING": "false",
        "WANDB__STATS_COREWEAVE_METADATA_BASE_URL": "http://127.0.0.1:9",
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam-jobs")
    return root, _make_world(root)


PRE = ["pretrain", "--data", "{data}", "--out", "{root}/exp", *TINY, "--batch-size", "4"]
PRE += ["--executor", "local"]
DS = [*PRE, "--engine", "deepspeed"]
FT = ["finetune", "--data", "{data}", "--out", "{root}/exp", *TINY, "--executor", "local"]
RESUME = ["pretrain", "--data", "{data}", "--out", "{%s}", *TINY, *RUN, "--executor", "local"]


def _resume(name: str) -> list[str]:
    return [a.replace("{%s}", "{" + name + "}") for a in RESUME]


REFUSED: dict[str, tuple[list[str], list[str], dict[str, str]]] = {
    # --device: checked where the config is built, and against this machine before submission
    "device-unknown": ([*PRE, "--device", "foo"], ["--device 'foo'", "auto", "cuda:N"], {}),
    "device-bad-index": ([*PRE, "--device", "cuda:x"], ["--device 'cuda:x'", "cuda:N"], {}),
    "finetune-device-unknown": ([*FT, "--device", "gpu"], ["--device 'gpu'", "cpu"], {}),
    # no GPU here, or not that many: either way the GPU asked for is not on this machine
    "device-gpu-not-here": ([*PRE, "--device", "cuda:99"], ["--device cuda:99"], {}),
    # the job reads WANDB_MODE: an unknown one is refused now, not in the job
    "wandb-mode-unknown": (PRE, ["WANDB_MODE 'sometimes'", "offline"], {"WANDB_MODE": "sometimes"}),
    # --deepspeed-config
    "deepspeed-zero-offload": (
        [*DS, "--zero-stage", "1", "--deepspeed-config", "{ds_offload}"],
        ["zero_optimization.offload_optimizer", "ZeRO-Offload", "remove offload_optimizer"],
        {},
    ),
    "deepspeed-cpu-offload": (
        [*DS, "--zero-stage", "2", "--deepspeed-config", "{ds_cpu_offload}"],
        ["zero_optimization.cpu_offload = true", "remove cpu_offload"],
        {},
    ),
    "deepspeed-config-duplicate-key": (
        [*DS, "--deepspeed-config", "{ds_duplicate}"],
        ["ds_duplicate.json", "'gradient_clipping' twice", "fix the file"],
        {},
    ),
    # --pretrained
    "pretrained-nan": (
        [*FT, "--pretrained", "{nan_encoder}"],
        ["nan/encoder.pt", "NaN weights", "diverged"],
        {},
    ),
    "pretrained-inf": (
        [*FT, "--pretrained", "{inf_encoder}"],
        ["inf/encoder.pt", "infinite weights"],
        {},
    ),
    "pretrained-signature-duplicate-key": (
        [*FT, "--pretrained", "{dup_signature}"],
        ["--pretrained: ", "dup/encoder.json", "'model' twice"],
        {},
    ),
    "pretrained-signature-not-an-object": (
        [*FT, "--pretrained", "{list_signature}"],
        ["list/encoder.json", "not a model signature"],
        {},
    ),
    # the dataset's folds and splits
    "validation-fold-empty": (
        ["finetune", "--data", "{emptyfold}", *FT[3:], "--fold", "2"],
        ["validation fold 2", "is empty", "fewer --folds"],
        {},
    ),
    "test-split-empty": (
        ["finetune", "--data", "{emptytest}", *FT[3:]],
        ["test split", "is empty", "--test-fraction"],
        {},
    ),
    # a run folder's records, read back before submission
    "run-config-duplicate-key": (
        _resume("config_dup"),
        ["config.yaml", "'config' is given twice", "remove the run folder"],
        {},
    ),
    "run-config-binary": (
        _resume("config_binary"),
        ["config.yaml", "not UTF-8 text", "remove the run folder"],
        {},
    ),
    "run-config-huge": (
        _resume("config_huge"),
        ["config.yaml", "more than a run record"],
        {},
    ),
    "checkpoint-marker-damaged": (
        _resume("marker_garbage"),
        ["step-00000002", "complete.json is not valid JSON", "the one before it"],
        {},
    ),
    "checkpoint-marker-points-outside": (
        _resume("marker_escape"),
        ["complete.json lists '../../../../../etc/hostname'", "not a file inside"],
        {},
    ),
    "metrics-log-a-fifo": (
        _resume("metrics_fifo"),
        ["metrics.jsonl is a named pipe", "not a regular file"],
        {},
    ),
}


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_before_submission(world, case):
    root, inputs = world
    args, words, env = REFUSED[case]
    argv = [a.format(root=root, **inputs) for a in args]
    refused(argv, words, root=root, cwd=root, env=env)


def _free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _without_network(argv: list[str]) -> list[str]:
    """``argv`` in a network namespace of its own holding only loopback (an offline compute
    node), where this machine allows it; as it is otherwise (every address wandb is given is
    on loopback then)."""
    probe = (
        subprocess.run(["unshare", "-n", "true"], capture_output=True)
        if shutil.which("unshare") and shutil.which("ip")
        else None
    )
    if probe is None or probe.returncode != 0:
        return argv
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *argv]


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_an_online_job_on_a_node_without_network_trains_and_logs_offline(world):
    root, inputs = world
    out = root / "online"
    env = dict(os.environ) | _wandb_sandbox(root)
    env |= {
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": f"http://127.0.0.1:{_free_port()}",
        "WANDB_API_KEY": API_KEY,
    }
    argv = [sys.executable, "-m", "hpc_btunet.submit"]
    argv += _pretrain(inputs["data"], out, "--executor", "debug", "--wandb", "online")
    start = time.monotonic()
    done = subprocess.run(
        _without_network([str(a) for a in argv]),
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    took = time.monotonic() - start
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert took < 60, f"{took:.0f} s: wandb's own timeout was waited out"
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    assert "cannot be reached" in warnings[0] and "logs offline" in warnings[0]
    run = out / "pretrain" / "unet"
    assert f"wandb sync {run / 'wandb'}/offline-run-*" in warnings[0]
    assert (run / "encoder.pt").is_file()
    run_id = (run / "wandb-id").read_text()
    offline = list((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 1 and (offline[0] / f"run-{run_id}.wandb").is_file()
    # the key is nowhere: not in what was printed, not in a file of the run folder
    assert API_KEY not in done.stdout + done.stderr
    for p in run.rglob("*"):
        if p.is_file():
            assert API_KEY.encode() not in p.read_bytes(), p


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_a_resumed_run_with_a_damaged_wandb_id_starts_a_new_wandb_run(world):
    root, inputs = world
    out = root / "id_damaged"
    shutil.copytree(inputs["started"], out, symlinks=True)
    run = out / "pretrain" / "unet"
    old_id = (run / "wandb-id").read_text()
    (run / "wandb-id").write_bytes(b"\x00\xff" * 4096 + b"\n" * 10)
    done = cli(
        _pretrain(inputs["data"], out, "--executor", "debug", "--wandb", "offline"),
        cwd=root,
        env={"WANDB_MODE": "offline", **_wandb_sandbox(root)},
    )
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, done.stderr
    new_id = (run / "wandb-id").read_text()
    assert new_id != old_id and len(new_id) == 12
    assert f"{run / 'wandb-id'} is damaged" in warnings[0]
    assert f"starting a new wandb run {new_id}" in warnings[0]
    assert "earlier wandb run of this folder is not continued" in warnings[0]
    assert "resuming from" in done.stdout and (run / "encoder.pt").is_file()
    assert list((run / "wandb").glob(f"offline-run-*-{new_id}"))
    assert list((run / "wandb").glob(f"offline-run-*-{old_id}")), "the earlier one is kept"


# --- the same readers, in-process --------------------------------------------------------------


def _checkpoint(folder: Path, step: int, marker: bytes) -> Path:
    path = folder / f"step-{step:08d}"
    path.mkdir(parents=True)
    torch.save({"x": torch.zeros(2)}, path / "job.pt")
    (path / MARKER).write_bytes(marker)
    return path


def _marker(**files) -> bytes:
    return json.dumps({"engine": "ddp", "world_size": 1, "files": files}).encode()


@pytest.mark.parametrize(
    ("marker", "words"),
    [
        (b'{"engine": "ddp", "files": {}, "files": {"job.pt": 1}}', "'files' twice"),
        (b"\xff" * 100, "not UTF-8 text"),
        (_marker(**{"/etc/hostname": 1}), "not a file inside the checkpoint"),
        (_marker(**{"job.pt": "1k"}), "no byte count"),
        (b'{"engine": "ddp"}', "no file list"),
    ],
    ids=["duplicate-key", "binary", "absolute-path", "size-not-a-number", "no-file-list"],
)
def test_a_damaged_marker_is_set_aside_and_the_one_before_it_used(tmp_path, capsys, marker, words):
    folder = tmp_path / "checkpoints"
    good = _checkpoint(folder, 1, b"")
    (good / MARKER).write_bytes(_marker(**{"job.pt": (good / "job.pt").stat().st_size}))
    bad = _checkpoint(folder, 2, marker)
    with pytest.raises(UserError, match="cannot be resumed") as e:
        read_marker(bad)
    assert words in str(e.value) and str(bad / MARKER) in str(e.value)
    assert latest_intact_checkpoint(folder) == good
    assert bad.with_name(bad.name + ".corrupt").is_dir()
    err = capsys.readouterr().err
    assert f"checkpoint {bad} is damaged" in err and words in err


def test_a_marker_of_enormous_size_is_refused_unread(tmp_path):
    bad = _checkpoint(tmp_path, 1, b"")
    with open(bad / MARKER, "wb") as f:
        f.truncate(1 << 30)  # sparse
    with pytest.raises(UserError, match="more than a checkpoint marker may be"):
        read_marker(bad)


def test_finite_weights_load_and_non_finite_ones_are_refused(tmp_path):
    state, signature = load_weights(_encoder(tmp_path / "ok.pt"), "--pretrained")
    assert signature["name"] == "unet" and signature["image_size"] == 32 and state
    with pytest.raises(UserError, match="NaN weights"):
        load_weights(_encoder(tmp_path / "nan.pt", float("nan")), "--pretrained")
    with pytest.raises(UserError, match="infinite weights"):
        load_weights(_encoder(tmp_path / "inf.pt", float("inf")), "--pretrained")


def test_a_weight_file_that_is_no_regular_file_is_refused(tmp_path):
    os.mkfifo(tmp_path / "encoder.pt")
    with pytest.raises(UserError, match="named pipe"):
        load_weights(tmp_path / "encoder.pt", "--pretrained")


def test_a_config_yaml_is_written_so_that_it_reads_back_strictly(tmp_path):
    """The record survives the strict reader, for values PyYAML 1.1 would leave unquoted."""
    from hpc_btunet.train.run import RunDir

    rundir = RunDir(tmp_path)
    values = {"note": "1e-3", "octal": "0o17", "lr": 1e-3}
    rundir.write_config(values, {"options": values}, "0" * 64)
    assert rundir.recorded()["identity"]["options"] == values
    assert yaml.safe_load(rundir.config_file.read_text())["config"] == values
