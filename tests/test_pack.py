import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import webdataset as wds
from conftest import ToySource

from hpc_btunet.data.codec import payload_crc, split_member_name
from hpc_btunet.data.manifest import JOURNAL_NAME, MANIFEST_NAME, load_manifest, verify_shards
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.errors import ShardError, UserError


def test_manifest_describes_shards_and_splits(toy_pack):
    out, m = toy_pack(n=60, shard_size=10)
    on_disk = load_manifest(out)
    assert on_disk.to_json() == m.to_json()
    assert m.schema == "hpc_btunet.manifest/2"
    assert (m.image_size, m.channels, m.encoding) == (16, 1, "png")
    assert m.counts["total"] == 60 and m.counts["train"] == 42 and m.counts["test"] == 18
    names = [s.name for s in m.shards]
    assert names == [f"train-{i:06d}.tar" for i in range(5)] + [
        f"test-{i:06d}.tar" for i in range(2)
    ]
    for split in ("train", "test"):
        keys = [k for s in m.shards_of(split) for k in s.keys]
        assert sorted(keys) == m.splits[split]
    for s in m.shards:
        assert s.count == len(s.keys) == len(s.offsets) == len(s.checksums)
        assert s.bytes == (out / s.name).stat().st_size
        assert 8 <= s.count <= 10  # near-equal shards of about --shard-size
    verify_shards(out, m.shards)
    assert not list(out.glob("*.tmp-*")) and not (out / JOURNAL_NAME).exists()


def test_shards_open_with_tar_and_webdataset(toy_pack):
    out, m = toy_pack(n=40, shard_size=15)
    shard = m.shards[0]
    listing = subprocess.run(
        ["tar", "-tf", str(out / shard.name)], check=True, capture_output=True, text=True
    )
    names = listing.stdout.split()
    assert names[:3] == [
        f"{shard.keys[0]}.image.png",
        f"{shard.keys[0]}.mask.png",
        f"{shard.keys[0]}.json",
    ]
    assert len(names) == 3 * shard.count
    urls = [str(out / s.name) for s in m.shards_of("train")]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("l8")
    seen = []
    for sample in ds:
        i = int(sample["__key__"].split("-")[1])
        image, mask = sample["image.png"], sample["mask.png"]
        assert image.shape == (16, 16) and set(np.unique(mask)) <= {0, 255}
        assert (image[mask > 0] == i % 256).all()
        assert sample["json"]["key"] == sample["__key__"]
        seen.append(sample["__key__"])
    assert sorted(seen) == m.splits["train"]


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_checksums_are_crc32_of_member_payloads_in_stored_order(toy_pack, encoding):
    unl = {f"toy-{i:04d}" for i in range(0, 40, 5)}
    out, m = toy_pack(encoding=encoding, shard_size=15, unlabelled=unl)
    for shard in m.shards:
        payloads: dict[str, list[bytes]] = {}
        with tarfile.open(out / shard.name) as tar:
            for info in tar:
                key, _ = split_member_name(info.name)
                payloads.setdefault(key, []).append(tar.extractfile(info).read())
        assert list(payloads) == shard.keys
        assert [len(p) for p in payloads.values()] == [2 if k in unl else 3 for k in shard.keys]
        assert shard.checksums == [payload_crc(payloads[k]) for k in shard.keys]


@pytest.mark.parametrize("encoding", ["png", "npy"])
@pytest.mark.parametrize("channels", [1, 3])
def test_packing_is_deterministic(toy_pack, encoding, channels):
    _, a = toy_pack(encoding=encoding, channels=channels, name="a")
    _, b = toy_pack(encoding=encoding, channels=channels, name="b")
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert a.channels == channels


def test_complete_dataset_is_not_overwritten_without_flag(toy_pack, tmp_path):
    out, m = toy_pack()
    before = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(UserError, match="--overwrite"):
        toy_pack()
    assert (out / MANIFEST_NAME).read_bytes() == before
    cfg = PackConfig(out=out, image_size=16, overwrite=True, splits=SplitConfig(seed=5))
    m2 = pack(ToySource(n=40), cfg, log=lambda _: None)
    assert m2.seed == 5 and load_manifest(out).seed == 5


def test_out_with_foreign_files_is_refused(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(UserError, match="notes.txt"):
        pack(ToySource(), PackConfig(out=out, image_size=16), log=lambda _: None)
    assert (out / "notes.txt").read_text() == "precious"


def test_killed_pack_leaves_no_manifest_and_rerun_resumes(tmp_path):
    out = tmp_path / "ds"
    cfg = PackConfig(out=out, image_size=16, shard_size=8, workers=1)
    # 28 train samples -> 4 shards of 7, 12 test samples -> 2 shards of 6; load 25 is in the 4th
    crashing = ToySource(n=40, fail_at=25)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pack(crashing, cfg, log=lambda _: None)
    assert not (out / MANIFEST_NAME).exists()
    assert not list(out.glob("*.tmp-*")), "a partial shard must not stay behind"
    complete = sorted(p.name for p in out.glob("*.tar"))
    assert complete == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with pytest.raises(UserError, match="incomplete"):
        load_manifest(out)

    journal = json.loads((out / JOURNAL_NAME).read_text())
    for name in complete:  # the journal holds all the manifest says of a shard, checksums too
        record = journal["shards"][name]
        assert len(record["checksums"]) == len(record["keys"]) == record["count"] == 7

    logs = []
    rerun = ToySource(n=40)
    m = pack(rerun, cfg, log=logs.append)
    assert "3 of 6 shards already complete" in logs[0]
    assert rerun.loads == 40 - 21  # the three complete shards were not re-encoded
    fresh_cfg = PackConfig(out=tmp_path / "fresh", image_size=16, shard_size=8, workers=1)
    fresh = pack(ToySource(n=40), fresh_cfg, log=lambda _: None)
    assert m.to_json() == fresh.to_json()
    assert (out / MANIFEST_NAME).read_bytes() == (tmp_path / "fresh" / MANIFEST_NAME).read_bytes()
    assert not (out / JOURNAL_NAME).exists()


@pytest.mark.parametrize(
    "damage",
    [
        lambda j: [r.pop("checksums") for r in j["shards"].values()],  # an older version's journal
        lambda j: [r["checksums"].pop() for r in j["shards"].values()],
        lambda j: j.update(shards=["train-000000.tar"]),
        lambda j: j.clear(),
    ],
)
def test_journal_without_valid_records_is_not_trusted(tmp_path, damage):
    out = tmp_path / "ds"
    cfg = PackConfig(out=out, image_size=16, shard_size=8, workers=1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        pack(ToySource(n=40, fail_at=25), cfg, log=lambda _: None)
    journal = json.loads((out / JOURNAL_NAME).read_text())
    damage(journal)
    (out / JOURNAL_NAME).write_text(json.dumps(journal))
    rerun = ToySource(n=40)
    m = pack(rerun, cfg, log=lambda _: None)
    assert rerun.loads == 40, "no shard is reused on a record that does not describe it fully"
    assert load_manifest(out).to_json() == m.to_json()


def test_journal_of_other_inputs_is_ignored(tmp_path):
    out = tmp_path / "ds"
    with pytest.raises(RuntimeError):
        pack(
            ToySource(n=40, fail_at=25),
            PackConfig(out=out, image_size=16, shard_size=8),
            log=lambda _: None,
        )
    source = ToySource(n=40)
    pack(source, PackConfig(out=out, image_size=24, shard_size=8), log=lambda _: None)
    assert source.loads == 40
    assert load_manifest(out).image_size == 24


def test_verify_names_corrupt_and_truncated_shards(toy_pack):
    out, m = toy_pack(n=60, shard_size=10)
    first, second = out / m.shards[0].name, out / m.shards[1].name
    data = bytearray(first.read_bytes())
    data[2000] ^= 0xFF
    first.write_bytes(bytes(data))
    second.write_bytes(second.read_bytes()[:3000])
    with pytest.raises(ShardError) as err:
        verify_shards(out, m.shards)
    assert first.name in str(err.value) and second.name in str(err.value)
    assert "corrupt" in str(err.value) and "truncated" in str(err.value)


def test_manifest_records_groups_and_unlabelled(toy_pack):
    unl = {f"toy-{i:04d}" for i in range(0, 100, 4)}
    out, m = toy_pack(n=100, group_size=2, unlabelled=unl)
    assert set(m.unlabelled) == unl
    assert m.groups["toy-0003"] == "g0001"
    raw = json.loads((out / MANIFEST_NAME).read_text())
    assert raw["folds"] == m.folds and raw["labelled"] == m.labelled
    assert unl.isdisjoint(m.labelled) and unl.isdisjoint(m.splits["test"])


def test_pack_and_verify_start_without_importing_torch(tmp_path):
    code = (
        "import sys\n"
        "from hpc_btunet.submit import main\n"
        f"assert main(['pack', '--num-images', '12', '--image-size', '32', '--out', {str(tmp_path / 'd')!r},"
        " '--folds', '2', '--labelled-fraction', '0.5']) == 0\n"
        f"assert main(['verify', '--data', {str(tmp_path / 'd')!r}]) == 0\n"
        "assert 'torch' not in sys.modules, 'pack imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
