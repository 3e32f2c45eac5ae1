"""A pretrain job's wandb offline run holds its loss history and config (so `wandb sync` can
upload it later), and a resumed job continues the same wandb run id."""

import json
import struct

import pytest

from hpc_btunet.train import pretrain


def wandb_records(path, block=32768):
    """Records of a wandb run file (``run-<id>.wandb``): a 7-byte header, then LevelDB-style
    blocks of [crc32, length, type] framed chunks holding protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, buf, records = 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            r = pb.Record()
            r.ParseFromString(buf)
            records.append(r)
            buf = b""
    return records


def history_and_config(run_file):
    records = wandb_records(run_file)
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            history.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "run":
            config |= {i.key: json.loads(i.value_json) for i in r.run.config.update}
        if r.WhichOneof("record_type") == "config":
            config |= {i.key: json.loads(i.value_json) for i in r.config.update}
    return history, config


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_offline_run_holds_loss_history_and_config(toy_pack, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    data, _ = toy_pack(n=60, image_size=32)
    cfg = pretrain.PretrainConfig(
        data=data,
        out=tmp_path / "exp",
        steps=6,
        checkpoint_every=3,
        log_every=1,
        base_width=4,
        depth=2,
        batch_size=8,
        device="cpu",
        lr=2e-3,
    )
    pretrain.run(cfg)
    runs = sorted((cfg.run_dir() / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run_id = (cfg.run_dir() / "wandb-id").read_text().strip()
    history, config = history_and_config(runs[0] / f"run-{run_id}.wandb")
    losses = [h["loss"] for h in history if "loss" in h]
    local = [
        json.loads(line)["loss"]
        for line in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == len(local) == 6, (losses, local)
    assert losses == pytest.approx(local)
    assert config["lr"] == 2e-3 and config["model"] == "unet" and config["global_batch"] == 8
    assert not any("key" in k.lower() for k in config)

    # a rerun forced to more steps resumes the checkpoint and the same wandb run id
    (cfg.run_dir() / "encoder.pt").unlink()
    pretrain.run(pretrain.PretrainConfig(**{**cfg.__dict__, "steps": 8, "force_resume": True}))
    assert (cfg.run_dir() / "wandb-id").read_text().strip() == run_id
    assert all(run_id in p.name for p in (cfg.run_dir() / "wandb").glob("offline-run-*"))


def _values(items) -> dict:
    """Logged values by key; a dict value (an image list) arrives as one item per field."""
    values = {}
    for i in items:
        if i.key:
            values[i.key] = json.loads(i.value_json)
        elif len(i.nested_key) == 1:
            values[i.nested_key[0]] = json.loads(i.value_json)
        else:
            values.setdefault(i.nested_key[0], {})[i.nested_key[1]] = json.loads(i.value_json)
    return values


def _finetune_config(data, out, wandb, **kw):
    from hpc_btunet.train import finetune

    return finetune.FinetuneConfig(
        data=data, out=out, batch_size=4, base_width=4, depth=2, device="cpu", wandb=wandb, **kw
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_finetune_offline_run_shows_validation_images_and_test_metrics(
    toy_pack, tmp_path, monkeypatch
):
    from hpc_btunet.data import make_loader
    from hpc_btunet.train import finetune

    monkeypatch.setenv("WANDB_MODE", "offline")
    data, manifest = toy_pack(n=60, image_size=16, folds=3)
    cfg = _finetune_config(
        data, tmp_path / "exp", "offline", epochs=4, log_images_every=2, log_images=2
    )
    result = json.loads(finetune.run(cfg).read_text())
    runs = sorted((cfg.run_dir() / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # wandb writes each image and each mask overlay as a PNG file of the offline run
    media = runs[0] / "files" / "media" / "images"
    assert len(list((media / "val").glob("predictions_*.png"))) == 2 * 2  # epochs 2 and 4
    # the true masks differ between the images; predicted masks that repeat are stored once
    assert len(list((media / "mask" / "val").glob("predictions_*.mask.png"))) >= 2 * 2

    run_id = (cfg.run_dir() / "wandb-id").read_text().strip()
    shown, summary = {}, {}
    for r in wandb_records(runs[0] / f"run-{run_id}.wandb"):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            items = _values(r.history.item)
            if "val/predictions" in items:
                shown[r.history.step.num] = items["val/predictions"]
        elif kind == "summary":
            summary |= _values(r.summary.update)
    assert sorted(shown) == [2, 4]
    _, val_keys = manifest.fold_keys(0)
    loader = make_loader(data, "train", keys=val_keys, batch_size=4, shuffle=False, drop_last=False)
    first = next(iter(loader))["key"][:2]  # the validation order's first images, every time
    for logged in shown.values():
        assert logged["_type"] == "images/separated" and logged["count"] == 2
        assert logged["captions"] == first
        assert set(logged["all_masks"][0]) == {"prediction", "ground_truth"}
    for metric in ("precision", "dice", "iou"):
        assert summary[f"test/{metric}"] == pytest.approx(result["test"]["mean"][metric])
        assert summary[f"test/pooled_{metric}"] == pytest.approx(result["test"]["pooled"][metric])
        assert summary[f"test_{metric}"] == summary[f"test/{metric}"]  # the older names stay
    assert summary["test/loss"] == summary["test_loss"] == pytest.approx(result["test"]["loss"])
    assert summary["test/images"] == result["test"]["images"]
    # images go to wandb alone: the local log keeps numbers
    log = (cfg.run_dir() / "metrics.jsonl").read_text()
    assert "predictions" not in log and len(log.splitlines()) == 4


def test_finetune_with_wandb_disabled_writes_no_wandb_files_and_gathers_no_images(
    toy_pack, tmp_path, monkeypatch
):
    from hpc_btunet.train import finetune

    def refuse(*_):
        raise AssertionError("images gathered for a disabled wandb")

    monkeypatch.setattr(finetune.FirstImages, "add", refuse)
    data, _ = toy_pack(n=60, image_size=16, folds=3)
    cfg = _finetune_config(data, tmp_path / "exp", "disabled", epochs=2, log_images_every=1)
    finetune.run(cfg)
    assert not (cfg.run_dir() / "wandb").exists() and not (cfg.run_dir() / "wandb-id").exists()
    assert not list(tmp_path.rglob("*wandb*"))


# --- the run id file and an unreachable service -------------------------------------------------


def _refused_port() -> int:
    """A loopback port nothing listens on (bound, then closed)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_run_id_is_written_once_and_kept(tmp_path, capsys):
    from hpc_btunet.tracking import RUN_ID, run_id

    first = run_id(tmp_path)
    assert RUN_ID.fullmatch(first) and (tmp_path / "wandb-id").read_text() == first
    assert run_id(tmp_path) == first
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    "damage",
    ["binary", "huge", "garbage", "empty", "fifo", "device-link"],
)
def test_a_damaged_run_id_starts_a_new_wandb_run_with_a_warning(tmp_path, capsys, damage):
    import os

    from hpc_btunet.tracking import RUN_ID, run_id

    id_file = tmp_path / "wandb-id"
    if damage == "binary":
        id_file.write_bytes(b"\x00\xff\xfe\x13" * 3)
    elif damage == "huge":
        with open(id_file, "wb") as f:
            f.truncate(64 << 20)  # sparse
    elif damage == "garbage":
        id_file.write_text("../../../../etc/passwd; rm -rf ~\n")
    elif damage == "empty":
        id_file.write_text("")
    elif damage == "fifo":
        os.mkfifo(id_file)  # reading it would block until a writer came
    else:
        os.symlink("/dev/zero", id_file)  # reading it would never end
    new = run_id(tmp_path)
    assert RUN_ID.fullmatch(new)
    assert id_file.is_file() and not id_file.is_symlink() and id_file.read_text() == new
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and len(err.splitlines()) == 1, err
    assert f"{id_file} is damaged" in err and f"starting a new wandb run {new}" in err
    assert "earlier wandb run of this folder is not continued" in err
    assert run_id(tmp_path) == new, "the new id is kept for the next resume"


def test_a_folder_in_place_of_the_run_id_is_refused(tmp_path):
    from hpc_btunet.errors import UserError
    from hpc_btunet.tracking import run_id

    (tmp_path / "wandb-id").mkdir()
    with pytest.raises(UserError, match="wandb-id is a folder"):
        run_id(tmp_path)


def test_an_unreachable_server_is_found_within_the_bound():
    import time

    from hpc_btunet.tracking import unreachable

    start = time.monotonic()
    why = unreachable(f"http://127.0.0.1:{_refused_port()}", timeout=2)
    assert why is not None and "refused" in why.lower()
    assert time.monotonic() - start < 3.5
    assert unreachable("ftp://127.0.0.1/") is not None


def test_a_server_that_answers_is_reachable_whatever_its_status():
    import http.server
    import threading

    from hpc_btunet.tracking import unreachable

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the handler's name
            self.send_response(401)
            self.end_headers()

        def log_message(self, *_):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert unreachable(f"http://127.0.0.1:{server.server_port}", timeout=2) is None
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fresh_wandb():
    """wandb's settings are loaded once per process and kept: a test that changes the variables
    they come from starts and ends without them (so no later test talks to the default
    server)."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def test_the_base_url_is_wandb_base_url_else_wandb_settings(monkeypatch, fresh_wandb):
    from hpc_btunet.tracking import base_url, shown_url

    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert base_url() == "http://127.0.0.1:9"
    monkeypatch.delenv("WANDB_BASE_URL")
    assert base_url().startswith("https://")
    assert shown_url("https://user:s3cret@example.org:8443/path?k=v") == "https://example.org:8443"


def test_warnings_never_show_the_api_key(monkeypatch, capsys):
    from hpc_btunet.tracking import _warn

    key = "k" * 40
    monkeypatch.setenv("WANDB_API_KEY", key)
    _warn(f"failed with {key} at https://user:{key}@host/x\nsecond line")
    err = capsys.readouterr().err
    assert key not in err and "s3cret" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    ("flag", "env", "mode"),
    [
        ("offline", None, "offline"),
        ("offline", "online", "online"),
        ("online", "dryrun", "offline"),
        ("disabled", "online", "disabled"),
    ],
)
def test_the_mode_is_the_flag_or_wandb_mode(monkeypatch, flag, env, mode):
    from hpc_btunet.tracking import resolve_mode

    if env is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", env)
    assert resolve_mode(flag) == mode


def test_an_unknown_wandb_mode_is_refused(monkeypatch):
    from hpc_btunet.errors import UserError
    from hpc_btunet.tracking import resolve_mode

    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UserError, match="WANDB_MODE 'sometimes' is not a wandb mode: choose one"):
        resolve_mode("offline")


def _online_env(monkeypatch, tmp_path, url):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", url)
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef" * 2 + "01234567")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB__STATS_COREWEAVE_METADATA_BASE_URL", url)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_online_start_that_wandb_refuses_logs_offline(
    tmp_path, monkeypatch, capsys, fresh_wandb
):
    """The server answers (the check passes) but refuses the key: wandb.init fails online, and
    the run logs offline under the same id."""
    import http.server
    import threading
    import time

    from hpc_btunet.tracking import Tracker
    from hpc_btunet.train.run import RunDir

    class Refuse(http.server.BaseHTTPRequestHandler):
        def _refuse(self):
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET = do_POST = _refuse

        def log_message(self, *_):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _online_env(monkeypatch, tmp_path, f"http://127.0.0.1:{server.server_port}")
    start = time.monotonic()
    try:
        rundir = RunDir(tmp_path / "run")
        tracker = Tracker(rundir, {"lr": 0.1}, stage="pretrain", name="unet", group="g")
        tracker.log({"loss": 1.0}, 1)
        tracker.finish()
    finally:
        server.shutdown()
        server.server_close()
    assert time.monotonic() - start < 30, "the refusal was not waited out"
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "wandb.init failed online" in warnings[0], err
    assert "wandb sync" in warnings[0] and "0123456789abcdef" not in err
    run_id = (rundir.path / "wandb-id").read_text()
    assert [p.name.endswith(run_id) for p in (rundir.path / "wandb").glob("offline-run-*")] == [
        True
    ]
