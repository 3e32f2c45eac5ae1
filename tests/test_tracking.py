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
