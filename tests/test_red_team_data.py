"""Red team of the data package: datasets, shards and manifests as untrusted input.

Each case runs the real command line (``tests/redteam.py``) on inputs made once by the module's
fixture and asserts what every refusal promises: exit status 2, one ``error:`` line naming the
thing and the fix, no traceback, nothing written below the input. The decompression bombs are
measured too: the refused command's peak memory stays near that of the same command on a normal
input, though the bomb would decode to a gigabyte or more.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import ToySource
from PIL import Image
from redteam import assert_refused, cli, cli_peak, refused, snapshot

from hpc_btunet.data.codec import add_member, payload_crc, split_member_name
from hpc_btunet.data.loader import ShardStream
from hpc_btunet.data.manifest import MANIFEST_NAME, manifest_checksum, sha256_file
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.phantoms import affine, write_brats_tree, write_decathlon_tree
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.data.wds import webdataset_pipeline
from hpc_btunet.errors import ShardError

pytestmark = pytest.mark.slow

BOMB_SIDE = 32768  # a 1 GiB grey image: the bombs below cost that much if decoded
HEADROOM = 150 * 2**20  # what a refused bomb may cost beyond the same command on normal input
FIFO_TIMEOUT = 30  # seconds: a reader that opens a named pipe would wait for ever
PRE = ["--base-width", "4", "--depth", "2", "--batch-size", "4", "--steps", "1"]
PRE += ["--executor", "debug", "--num-workers", "0", "--wandb", "disabled"]
FOLDER_PACK = ["--image-size", "32", "--folds", "2", "--labelled-fraction", "1"]


# --- inputs ----------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_bomb(side: int = BOMB_SIDE) -> bytes:
    """A valid grey PNG of ``side`` x ``side`` zeros (about 1 MB for 1 GiB of pixels)."""
    rows = (b"\0" * (side + 1)) * 256  # filter byte 0, then the row
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(rows) for _ in range(side // 256)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _tiff_bomb(path: Path, side: int = BOMB_SIDE) -> None:
    """A zlib-compressed TIFF of ``side`` x ``side`` zeros, written tile by tile."""
    tile = np.zeros((1024, 1024), np.uint8)
    tiles = (tile for _ in range((side // 1024) ** 2))
    tifffile.imwrite(path, tiles, shape=(side, side), dtype="uint8", tile=(1024, 1024),
                     compression="zlib")  # fmt: skip


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _blank(rng: np.random.Generator, hw=(20, 24)) -> np.ndarray:
    return rng.integers(1, 256, hw, dtype=np.uint8)


def _folder_tree(root: Path, n: int = 6, first: str = "a.png") -> Path:
    """``images/`` + ``masks/`` of ``n`` small samples; the first image is named ``first``."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        name = first if i == 0 else f"s{i}.png"
        image = _blank(rng)
        if name.endswith((".tif", ".tiff")):
            tifffile.imwrite(root / "images" / name, image)
        else:
            Image.fromarray(image).save(root / "images" / name)
        mask = (image > 128).astype(np.uint8) * 255
        Image.fromarray(mask).save(root / "masks" / f"{Path(name).stem}.png")
    return root


def _kdsb_tree(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(1)
    for i in range(n):
        sid = f"{i:02d}" + "ab" * 6
        sample = root / "stage1_train" / sid
        (sample / "images").mkdir(parents=True)
        (sample / "masks").mkdir()
        Image.fromarray(_blank(rng)).save(sample / "images" / f"{sid}.png")
        Image.fromarray((_blank(rng) > 128).astype(np.uint8) * 255).save(
            sample / "masks" / "m0.png"
        )
    return root


def _busi_tree(root: Path) -> Path:
    rng = np.random.default_rng(2)
    base = root / "Dataset_BUSI_with_GT"
    for label, n in (("benign", 3), ("malignant", 2), ("normal", 2)):
        (base / label).mkdir(parents=True)
        for i in range(1, n + 1):
            stem = f"{label} ({i})"
            Image.fromarray(_blank(rng)).save(base / label / f"{stem}.png")
            mask = np.zeros((20, 24), np.uint8) if label == "normal" else _blank(rng) // 129 * 255
            Image.fromarray(mask).save(base / label / f"{stem}_mask.png")
    return root


def _rewrite_shard(data: Path, shard_name: str, edit) -> None:
    """Rewrite one shard with ``edit(member name, payload) -> payload`` applied, and the manifest
    to match it (offsets, CRC-32s, size, sha256, its own checksum): the bytes a reader meets are
    then exactly the edited ones, with every check before decoding passing."""
    path = data / shard_name
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    content = json.loads((data / MANIFEST_NAME).read_text())
    entry = next(s for s in content["shards"] if s["name"] == shard_name)
    offsets, checksums, payloads = [], [], []
    with open(path, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, payload in members:
            key, ext = split_member_name(name)
            if ext.startswith("image."):
                offsets.append(tar.offset)
                payloads = []
            payload = edit(name, payload)
            payloads.append(payload)
            add_member(tar, name, payload)
            if ext == "json":
                checksums.append(payload_crc(payloads))
    entry.update(offsets=offsets, checksums=checksums, bytes=path.stat().st_size)
    entry["sha256"] = sha256_file(path)
    _reseal(data, content)


def _reseal(data: Path, content: dict) -> None:
    content["checksum"] = manifest_checksum(content)
    (data / MANIFEST_NAME).write_text(json.dumps(content))


def _copy(world: dict, name: str, of: str = "data") -> Path:
    shutil.copytree(world[of], world["root"] / name)
    return world["root"] / name


def _write_volume(path: Path, shape: tuple[int, ...], dtype) -> None:
    import nibabel

    nibabel.save(nibabel.Nifti1Image(np.zeros(shape, dtype), affine(shape[:3])), path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("redteam_data")
    w: dict = {"root": root}
    splits = SplitConfig(folds=2, labelled_fraction=0.5)
    for name, encoding in (("data", "png"), ("npy", "npy")):
        w[name] = root / name
        pack(ToySource(n=20), PackConfig(out=w[name], image_size=32, shard_size=100,
             encoding=encoding, splits=splits), log=lambda _: None)  # fmt: skip

    # shards: a PNG bomb in every train sample, CRCs and sha256 matching; an npy header claiming
    # another shape; a named pipe in a shard's place and in the manifest's
    bomb = _png_bomb()
    w["bomb_shard"] = _copy(w, "bomb_shard")
    _rewrite_shard(w["bomb_shard"], "train-000000.tar",
                   lambda n, p: bomb if n.endswith(".image.png") else p)  # fmt: skip
    w["npy_header"] = _copy(w, "npy_header", of="npy")

    def wrong_header(name: str, payload: bytes) -> bytes:
        if not name.endswith(".image.npy"):
            return payload
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": "|u1", "fortran_order": False, "shape": (65536, 65536)}
        )
        return buf.getvalue() + b"\0" * 1024

    _rewrite_shard(w["npy_header"], "train-000000.tar", wrong_header)
    w["fifo_shard"] = _copy(w, "fifo_shard")
    (w["fifo_shard"] / "train-000000.tar").unlink()
    os.mkfifo(w["fifo_shard"] / "train-000000.tar")
    w["fifo_manifest"] = _copy(w, "fifo_manifest")
    (w["fifo_manifest"] / MANIFEST_NAME).unlink()
    os.mkfifo(w["fifo_manifest"] / MANIFEST_NAME)

    # manifests: a key given twice (the checksum still passes: the last value wins), a claim
    # of 65536-pixel images with a valid checksum
    text = (w["data"] / MANIFEST_NAME).read_text()
    w["dup_key"] = _copy(w, "dup_key")
    assert text.count('"schema"') == 1
    (w["dup_key"] / MANIFEST_NAME).write_text(text.replace('"schema"', '"seed": 7, "schema"'))
    w["huge_size"] = _copy(w, "huge_size")
    _reseal(w["huge_size"], json.loads(text) | {"image_size": 65536})

    # dataset trees at pack time
    w["plain_tree"] = _folder_tree(root / "plain_tree", first="a.tif")
    w["tiff_bomb"] = _folder_tree(root / "tiff_bomb", first="a.tif")
    _tiff_bomb(w["tiff_bomb"] / "images" / "a.tif")
    w["png_bomb"] = _folder_tree(root / "png_bomb")
    (w["png_bomb"] / "images" / "a.png").write_bytes(bomb)
    w["jpeg_claim"] = _folder_tree(root / "jpeg_claim", first="a.jpg")
    (w["jpeg_claim"] / "images" / "a.jpg").write_bytes(_jpeg_claiming(60000, 60000))
    w["folder_fifo"] = _folder_tree(root / "folder_fifo")
    (w["folder_fifo"] / "masks" / "s1.png").unlink()
    os.mkfifo(w["folder_fifo"] / "masks" / "s1.png")
    w["kdsb_fifo"] = _kdsb_tree(root / "kdsb_fifo")
    os.mkfifo(next((w["kdsb_fifo"] / "stage1_train").iterdir()) / "masks" / "m1.png")

    w["busi_skips"] = _busi_tree(root / "busi_skips")
    base = w["busi_skips"] / "Dataset_BUSI_with_GT"
    shutil.copy(base / "benign" / "benign (1)_mask.png", base / "benign" / "benign (8)_mask.png")
    (base / "benign" / "Thumbs.db").write_bytes(b"\0" * 16)
    (base / "Benign").mkdir()
    shutil.copy(base / "benign" / "benign (1).png", base / "Benign" / "benign (1).png")
    w["busi_newline"] = _busi_tree(root / "busi_newline")
    base = w["busi_newline"] / "Dataset_BUSI_with_GT" / "benign"
    shutil.copy(base / "benign (1).png", base / "benign\n(9).png")
    shutil.copy(base / "benign (1)_mask.png", base / "benign\n(9)_mask.png")

    shape = (24, 20, 12)
    w["brats_zero"] = root / "brats_zero"
    names = write_brats_tree(w["brats_zero"], subjects=3, shape=shape)
    subject = w["brats_zero"] / "HGG" / names[0]
    for mod, dtype in (("flair", np.int16), ("seg", np.uint8)):
        (subject / f"{names[0]}_{mod}.nii.gz").unlink()
        _write_volume(subject / f"{names[0]}_{mod}.nii", (24, 20, 0), dtype)
    w["brats_zero_file"] = f"{names[0]}_flair.nii"
    w["brats_fifo"] = root / "brats_fifo"
    names = write_brats_tree(w["brats_fifo"], subjects=3, shape=shape)
    flair = w["brats_fifo"] / "LGG" / names[1] / f"{names[1]}_flair.nii.gz"
    flair.unlink()
    os.mkfifo(flair)
    w["brats_fifo_file"] = flair.name
    w["decathlon_dup"] = root / "decathlon_dup"
    write_decathlon_tree(w["decathlon_dup"], cases=3, shape=shape)
    meta = w["decathlon_dup"] / "dataset.json"
    assert meta.read_text().startswith('{\n "name"')
    meta.write_text(meta.read_text().replace('{\n "name"', '{\n "labels": {}, "name"', 1))
    return w


def _args(args: list[str], world: dict) -> list[str]:
    return [a.format(**{k: v for k, v in world.items() if isinstance(v, Path | str)}) for a in args]


# --- refusals --------------------------------------------------------------------------------

OUT = ["--out", "{root}/out"]
CASES = {
    # options that the chosen source would ignore
    "clip-with-synthetic": (["pack", "--clip", "1,99", *OUT], ["--clip is not used", "drop it"]),
    "modality-with-synthetic": (
        ["pack", "--modality", "flair", *OUT],
        ["--modality is not used with --source synthetic", "brats"],
    ),
    "resize-with-folder": (
        ["pack", "--source", "folder", "--root", "{plain_tree}", "--resize", "pad", *OUT],
        ["--resize is not used with --source folder", "drop it"],
    ),
    "num-images-with-busi": (
        ["pack", "--source", "busi", "--root", "{busi_skips}", "--num-images", "5", *OUT],
        ["--num-images is not used with --source busi", "synthetic"],
    ),
    "slices-with-kdsb18": (
        ["pack", "--source", "kdsb18", "--root", "{kdsb_fifo}", "--slices", "all", *OUT],
        ["--slices is not used with --source kdsb18", "brats, decathlon"],
    ),
    # counts bounded before anything is listed or allocated
    "a-billion-images": (
        ["pack", "--num-images", "1000000000", *OUT],
        ["--num-images", "1,000,000", "MAX_NUM_IMAGES"],
    ),
    "huge-image-size": (["pack", "--image-size", "65536", *OUT], ["--image-size", "4096"]),
    "huge-shard-size": (
        ["pack", "--shard-size", "1000000000", *OUT],
        ["--shard-size", "100,000", "MAX_SHARD_SIZE"],
    ),
    "a-thousand-folds": (["pack", "--folds", "1000", *OUT], ["--folds", "at most 100"]),
    "huge-workers": (["pack", "--workers", "100000", *OUT], ["--workers", "256"]),
    # splits
    "test-split-rounds-to-nothing": (
        ["pack", "--num-images", "20", "--test-fraction", "0.01", "--folds", "2", *OUT],
        ["test split would be empty", "rounds to 0", "--test-fraction"],
    ),
    "test-split-groups-too-large": (
        ["pack", "--num-images", "10", "--group-size", "5", "--labelled-fraction", "1"]
        + ["--folds", "2", *OUT],
        ["test split would be empty", "smallest group", "smaller groups"],
    ),
    # manifests and shards
    "manifest-key-twice": (
        ["verify", "--data", "{dup_key}"],
        ["manifest.json", "'seed' twice", "repack"],
    ),
    "manifest-claims-huge-images": (
        ["verify", "--data", "{huge_size}"],
        ["image_size", "at most 4096", "MAX_IMAGE_SIZE", "repack"],
    ),
    # dataset trees
    "jpeg-header-claims-huge": (
        ["pack", "--source", "folder", "--root", "{jpeg_claim}", *FOLDER_PACK, *OUT],
        ["images/a.jpg", "3,600,000,000 pixels", "MAX_IMAGE_PIXELS", "downscale"],
    ),
    "brats-zero-length-axis": (
        ["pack", "--source", "brats", "--root", "{brats_zero}", "--image-size", "32", *OUT],
        ["{brats_zero_file}", "an axis of length 0", "--modality"],
    ),
    "decathlon-json-key-twice": (
        ["pack", "--source", "decathlon", "--root", "{decathlon_dup}", *OUT],
        ["dataset.json", "'labels' twice", "download the dataset again"],
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_data_gets_one_clear_error(world, case):
    args, words = CASES[case]
    refused(_args(args, world), _args(words, world), root=world["root"], cwd=world["root"])


# named pipes: answered within seconds, each named
FIFOS = {
    "fifo-in-kdsb18-masks": (
        ["pack", "--source", "kdsb18", "--root", "{kdsb_fifo}", *OUT],
        ["masks/m1.png", "named pipe", "not a regular file"],
    ),
    "fifo-in-folder-masks": (
        ["pack", "--source", "folder", "--root", "{folder_fifo}", *FOLDER_PACK, *OUT],
        ["masks/s1.png", "named pipe", "not a regular file"],
    ),
    "fifo-as-brats-volume": (
        ["pack", "--source", "brats", "--root", "{brats_fifo}", "--image-size", "32", *OUT],
        ["{brats_fifo_file}", "named pipe", "not a regular file"],
    ),
    "fifo-as-shard": (
        ["verify", "--data", "{fifo_shard}"],
        ["train-000000.tar", "named pipe", "repack"],
    ),
    "fifo-as-manifest": (
        ["verify", "--data", "{fifo_manifest}"],
        ["manifest.json", "named pipe", "not a regular file"],
    ),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", list(FIFOS))
def test_named_pipes_are_refused_by_name_without_waiting(world, case):
    args, words = FIFOS[case]
    refused(_args(args, world), _args(words, world), root=world["root"], timeout=FIFO_TIMEOUT)


@pytest.mark.timeout(120)
def test_stage_to_inside_data_is_refused_naming_both(world):
    data = world["data"]
    args = ["pretrain", "--data", data, "--out", world["root"] / "exp-stage", *PRE]
    # refused before submission: nothing is written anywhere
    words = ["--stage-to", "lies inside --data"]
    err = refused([*args, "--stage-to", data / "node"], words, root=world["root"])
    assert f"{data}/node" in err and f"--data {data}" in err


# --- what used to be skipped, or a traceback -------------------------------------------------


@pytest.mark.timeout(120)
def test_files_the_adapter_skips_are_named_in_one_warning(world):
    out = world["root"] / "busi-skips-out"
    args = ["pack", "--source", "busi", "--root", world["busi_skips"], "--out", out]
    done = cli([*args, "--image-size", "32", "--folds", "2", "--labelled-fraction", "1"])
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert len(warnings) == 1, done.stderr
    line = warnings[0]
    assert line.startswith("hpc-btunet pack: warning: skipped 3 file(s)"), line
    for name in ("Dataset_BUSI_with_GT/Benign", "benign/Thumbs.db", "benign (8)_mask.png"):
        assert name in line, line
    assert "a mask without its image" in line and "not a class folder" in line


@pytest.mark.timeout(120)
def test_newline_in_a_busi_file_name_is_packed_safely(world):
    out = world["root"] / "busi-newline-out"
    args = ["pack", "--source", "busi", "--root", world["busi_newline"], "--out", out]
    done = cli([*args, "--image-size", "32", "--folds", "2", "--labelled-fraction", "1"])
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    groups = json.loads((out / MANIFEST_NAME).read_text())["groups"]
    assert "benign_9" in groups, sorted(groups)


@pytest.mark.timeout(60)
def test_a_shard_deleted_while_reading_is_a_shard_error(world):
    data = _copy(world, "deleted")
    stream = ShardStream(data, "train", batch_size=4, shuffle=False)  # the files check passes
    (data / "train-000000.tar").unlink()
    with pytest.raises(ShardError) as err:
        next(iter(stream))
    message = str(err.value)
    assert "train-000000.tar is missing" in message and "restore it" in message
    assert "repack" in message


@pytest.mark.timeout(60)
def test_npy_header_of_another_shape_is_refused_before_decoding(world):
    stream = ShardStream(world["npy_header"], "train", batch_size=4, shuffle=False)
    with pytest.raises(ShardError) as err:
        next(iter(stream))
    message = str(err.value)
    assert "image header says 65536 x 65536 uint8" in message and "32 x 32" in message
    assert "nothing was decoded" in message and "repack" in message


@pytest.mark.timeout(60)
def test_png_bomb_in_a_shard_is_refused_by_the_webdataset_pipeline(world):
    pytest.importorskip("webdataset")
    with pytest.raises(ShardError) as err:
        next(iter(webdataset_pipeline(world["bomb_shard"], "train")))
    message = str(err.value)
    assert f"header says {BOMB_SIDE} x {BOMB_SIDE} uint8" in message
    assert "nothing was decoded" in message and "repack" in message


# --- decompression bombs: refused from the header, memory near the normal command's ------------


@pytest.fixture(scope="module")
def folder_baseline(world) -> int:
    """Peak memory of a pack of the normal folder tree (the bombs' trees are the same but for
    their first image)."""
    out = world["root"] / "plain-out"
    args = ["pack", "--source", "folder", "--root", world["plain_tree"], "--out", out]
    done, peak = cli_peak([*args, *FOLDER_PACK])
    assert done.returncode == 0, done.stderr
    return peak


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tree, name", [("tiff_bomb", "a.tif"), ("png_bomb", "a.png")])
def test_image_bomb_in_a_dataset_tree_costs_no_memory(world, folder_baseline, tree, name):
    before = snapshot(world[tree])
    out = world["root"] / f"{tree}-out"
    args = ["pack", "--source", "folder", "--root", world[tree], "--out", out, *FOLDER_PACK]
    done, peak = cli_peak(args)
    assert_refused(done, [f"images/{name}", "MAX_IMAGE_PIXELS", "nothing was decoded"])
    assert snapshot(world[tree]) == before and not out.exists()
    assert peak < folder_baseline + HEADROOM, (peak >> 20, folder_baseline >> 20)
    assert BOMB_SIDE**2 >= 6 * HEADROOM, "decoded, the bomb would cost far more than that"


@pytest.mark.timeout(180)
def test_png_bomb_in_a_shard_costs_no_memory(world):
    root = world["root"]
    base = ["pretrain", "--out", root / "exp-plain", "--data", world["data"], *PRE]
    done, baseline = cli_peak(base)
    assert done.returncode == 0, done.stderr
    before = snapshot(world["bomb_shard"])
    done, peak = cli_peak(["pretrain", "--out", root / "exp-bomb", "--data",
                           world["bomb_shard"], *PRE])  # fmt: skip
    assert_refused(
        done, ["train-000000.tar", f"{BOMB_SIDE} x {BOMB_SIDE}", "nothing was decoded", "repack"]
    )
    assert snapshot(world["bomb_shard"]) == before
    assert peak < baseline + HEADROOM, (peak >> 20, baseline >> 20)


def test_the_data_red_team_is_large_enough():
    assert len(CASES) + len(FIFOS) + 9 >= 14
