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
