"""The public 2-D dataset adapters, on small trees generated in the real layouts and formats.

Every tree is written with Pillow in the formats of the download (KDSB18: RGBA PNG images and one
PNG per nucleus; ISIC 2018: JPEG images, PNG masks; BUSI: PNG, RGB or grayscale; BUSIS: BMP, JPEG
or PNG with ``_GT`` masks) and every pack is read back with the package's own tar reader, decoder
and ``ShardStream``, never by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import submit_cli
from PIL import Image

from hpc_btunet.data.codec import decode_array, iter_members, payload_crc, split_member_name
from hpc_btunet.data.loader import ShardStream
from hpc_btunet.data.manifest import Manifest, load_manifest
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.public import ADAPTERS, decode_rle
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.errors import DataError


def _save(path: Path, array: np.ndarray, mode: str | None = None, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path, **options)


def _blob(h: int, w: int, y: int, x: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - y) ** 2 + (xx - x) ** 2) <= r * r).astype(np.uint8) * 255


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _gray(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (h, w), dtype=np.uint8)


def _pack(source, tmp_path: Path, size: int = 32, folds: int = 2):
    cfg = PackConfig(
        out=tmp_path / "out",
        image_size=size,
        shard_size=100,
        workers=2,
        splits=SplitConfig(test_fraction=0.3, labelled_fraction=0.5, folds=folds),
    )
    return pack(source, cfg, log=lambda _: None)


def _read(out: Path) -> tuple[Manifest, dict[str, dict]]:
    """The manifest of ``out`` and, by key, every packed sample as stored: ``image`` (uint8 HxW or
    HxWx3), ``mask`` (bool HxW, None without one) and ``json``. Read with the package's tar reader
    and decoder from the offset the manifest gives, each sample's CRC-32 checked against it."""
    m = load_manifest(out)
    found: dict[str, dict] = {}
    for shard in m.shards:
        raw = memoryview((out / shard.name).read_bytes())
        ends = [*shard.offsets[1:], shard.bytes]
        for key, start, end, crc in zip(
            shard.keys, shard.offsets, ends, shard.checksums, strict=True
        ):
            members = {}
            for name, payload in iter_members(raw[start:end]):
                owner, ext = split_member_name(name)
                assert owner == key, f"{shard.name}: {name} lies where {key} should"
                members[ext] = payload
            assert payload_crc(members.values()) == crc, f"{key}: checksum"
            mask = members.get(f"mask.{m.encoding}")
            if mask is not None:
                mask = decode_array(mask, m.encoding)
                assert set(np.unique(mask)) <= {0, 255}, f"{key}: masks are stored as 0/255"
            found[key] = {
                "image": decode_array(members[f"image.{m.encoding}"], m.encoding),
                "mask": None if mask is None else mask > 0,
                "json": json.loads(bytes(members["json"])),
            }
    return m, found


def _samples(out: Path) -> dict[str, dict]:
    """key -> {"image", "mask", "json"} of every packed sample (see ``_read``)."""
    return _read(out)[1]


def _streamed(out: Path, m: Manifest) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """key -> (image C x H x W, mask H x W or None) as ``ShardStream`` yields both splits (masks
    only for a split without unlabelled samples, as the loader decides)."""
    got = {}
    for split in ("train", "test"):
        keys = m.splits[split]
        stream = ShardStream(out, split, batch_size=len(keys), shuffle=False, drop_last=False)
        for batch in stream:
            for i, key in enumerate(batch["key"]):
                mask = batch["mask"][i, 0].numpy() if "mask" in batch else None
                got[key] = (batch["image"][i].numpy(), mask)
    return got


def _check_groups(m: Manifest, source) -> None:
    """The manifest's groups are the adapter's (one per image for these datasets), and no group
    is on both sides of train/test or in two folds."""
    said = {e.key: e.group for e in source.entries()}
    assert m.groups == said
    assert said == {k: k for k in said}, "each image is its own group"
    side: dict[str, str] = {}
    for split in ("train", "test"):
        for key in m.splits[split]:
            assert side.setdefault(m.groups[key], split) == split, f"{key}'s group on both sides"
    fold_of: dict[str, int] = {}
    for i, fold in enumerate(m.folds):
        for key in fold:
            assert fold_of.setdefault(m.groups[key], i) == i, f"{key}'s group in two folds"
    assert sorted(k for fold in m.folds for k in fold) == m.labelled
    assert set(m.labelled) <= set(m.splits["train"])


def _nothing_written(out: Path) -> bool:
    return not out.exists() or not any(out.iterdir())


def _pack_fails(source, tmp_path: Path) -> str:
    """The message of the one DataError that packing ``source`` raises; --out (made empty
    beforehand) must stay empty."""
    (tmp_path / "out").mkdir(exist_ok=True)
    with pytest.raises(DataError) as e:
        _pack(source, tmp_path)
    assert _nothing_written(tmp_path / "out"), "nothing may be written for bad input"
    return str(e.value)


# --- KDSB18 ---------------------------------------------------------------------------------------


def _kdsb(
    root: Path, n: int = 6, test: int = 0, hw: tuple[int, int] = (40, 48), alpha=None
) -> dict[str, Path]:
    """``n`` stage1_train samples (RGBA PNG; 1, 2 or 3 nucleus PNGs, by i % 3) and ``test``
    stage1_test images (RGB PNG, no masks); returns key -> image file."""
    h, w = hw
    r = min(h, w) // 8
    nuclei = ((h // 4, w // 5), (3 * h // 4, 3 * w // 4), (h // 2, w // 2))
    made = {}
    for i in range(n):
        sid = f"{i:02d}ab" + "c" * 10
        a = np.full((h, w), 255, np.uint8) if alpha is None else alpha
        made[sid] = root / "stage1_train" / sid / "images" / f"{sid}.png"
        _save(made[sid], np.dstack([_rgb(h, w, i), a]), "RGBA")
        for k, (y, x) in enumerate(nuclei[: 1 + i % 3]):
            _save(root / "stage1_train" / sid / "masks" / f"m{k}.png", _blob(h, w, y, x, r))
    for i in range(test):
        sid = f"t{i:02d}" + "d" * 10
        made[sid] = root / "stage1_test" / sid / "images" / f"{sid}.png"
        _save(made[sid], _rgb(h, w, 100 + i))
    return made


def test_kdsb18_unions_the_nuclei_and_keeps_rgb(tmp_path):
    _kdsb(tmp_path / "kdsb", n=6, test=2)
    m = _pack(ADAPTERS["kdsb18"](tmp_path / "kdsb"), tmp_path, size=40)
    assert m.channels == 3 and m.counts["total"] == 8
    assert len(m.unlabelled) == 2, "stage1_test without a solution file: unlabelled"
    got = _samples(tmp_path / "out")
    key = "02ab" + "c" * 10  # three nuclei
    # at 48 -> 40 wide the blobs shrink; every nucleus is in the union
    assert got[key]["mask"].sum() > 2 * np.pi * 4**2
    assert got[key]["image"].shape == (40, 40, 3)


def test_kdsb18_grayscale_and_solution_file(tmp_path):
    _kdsb(tmp_path / "kdsb", n=4, test=1)
    sid = "t00" + "d" * 10
    (tmp_path / "kdsb" / "stage1_solution.csv").write_text(
        f"ImageId,EncodedPixels,Height,Width,Usage\n{sid},1 5 41 5,40,48,Public\n"
    )
    m = _pack(ADAPTERS["kdsb18"](tmp_path / "kdsb", channels=1), tmp_path, size=40)
    assert m.channels == 1 and not m.unlabelled
    mask = decode_rle("1 5 41 5", (40, 48))
    assert mask[:5, 0].all() and mask[:5, 1].all() and mask.sum() == 10


@pytest.mark.parametrize("channels", ["auto", 3, 1])
def test_kdsb18_rgba_pngs_and_nucleus_unions_at_native_size(channels, tmp_path):
    # a random alpha channel: dropped, not composited (a real download's alpha is all 255)
    alpha = np.random.default_rng(7).integers(0, 256, (24, 24), dtype=np.uint8)
    files = _kdsb(tmp_path / "kdsb", n=6, hw=(24, 24), alpha=alpha)
    assert {Image.open(p).mode for p in files.values()} == {"RGBA"}
    src = ADAPTERS["kdsb18"](tmp_path / "kdsb", channels=channels)
    m = _pack(src, tmp_path, size=24)  # the images' own size: no resampling
    got = _samples(tmp_path / "out")
    assert sorted(got) == sorted(files) and m.counts["total"] == 6
    want = 1 if channels == 1 else 3
    assert m.channels == m.source["channels"] == src.channels == want
    for key, path in files.items():
        rgb = Image.open(path).convert("RGB")
        image = got[key]["image"]
        if want == 3:
            assert np.array_equal(image, np.asarray(rgb)), key
        else:  # ITU-R 601-2 luma, as Pillow's RGB -> L (which rounds in fixed point: +-1)
            luma = np.asarray(rgb.convert("L")).astype(int)
            assert image.shape == (24, 24) and np.abs(image.astype(int) - luma).max() <= 1, key
        nuclei = sorted((path.parent.parent / "masks").glob("*.png"))
        assert len(nuclei) == 1 + int(key[:2]) % 3
        union = np.zeros((24, 24), bool)
        for f in nuclei:
            one = np.asarray(Image.open(f)) > 0
            assert not (one <= union).all(), f"{f.name} adds to the union"
            union |= one
        assert np.array_equal(got[key]["mask"], union), key


def test_kdsb18_bad_input(tmp_path):
    _kdsb(tmp_path / "kdsb", n=3)
    victim = next((tmp_path / "kdsb" / "stage1_train").iterdir())
    for f in (victim / "masks").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="missing masks"):
        ADAPTERS["kdsb18"](tmp_path / "kdsb").entries()
    isic = tmp_path / "isic" / "ISIC2018_Task1-2_Training_Input"
    _save(isic / "ISIC_0000001.jpg", _rgb(20, 20, 0))
    with pytest.raises(DataError, match="looks like --source isic2018"):
        ADAPTERS["kdsb18"](tmp_path / "isic").entries()


def test_kdsb18_truncated_mask_png_is_named_and_nothing_is_written(tmp_path):
    files = _kdsb(tmp_path / "kdsb", n=4)
    sid = sorted(files)[2]  # three nuclei
    bad = tmp_path / "kdsb" / "stage1_train" / sid / "masks" / "m1.png"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    msg = _pack_fails(ADAPTERS["kdsb18"](tmp_path / "kdsb"), tmp_path)
    assert msg.startswith(f"--source kdsb18: {tmp_path / 'kdsb'} is not usable (1 problem(s)):")
    assert "- unreadable mask (1). Fix: download the file again" in msg
    assert f"\n    stage1_train/{sid}/masks/m1.png: " in msg
    assert "m0.png" not in msg and "m2.png" not in msg


# --- ISIC 2018 ------------------------------------------------------------------------------------


def _isic(root: Path, n: int = 5, hw: tuple[int, int] | None = None) -> dict[str, Path]:
    """``n`` Training JPEGs with PNG ground truth (``hw``, default (30 + i) x 50), the extras of
    the download, and one Validation JPEG without ground truth; returns key -> image file."""
    made = {}
    for i in range(n):
        key = f"ISIC_{i:07d}"
        h, w = hw or (30 + i, 50)
        made[key] = root / "ISIC2018_Task1-2_Training_Input" / f"{key}.jpg"
        _save(made[key], _rgb(h, w, i))
        _save(
            root / "ISIC2018_Task1_Training_GroundTruth" / f"{key}_segmentation.png",
            _blob(h, w, h // 2, w // 2, min(h, w) // 4),
        )
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("licence")
    (root / "ISIC2018_Task1-2_Training_Input" / "ATTRIBUTION.txt").write_text("who")
    (root / "ISIC2018_Task1_Training_GroundTruth" / "LICENSE.txt").write_text("licence")
    h, w = hw or (30, 50)
    _save(root / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000000_superpixels.png", _rgb(h, w, 8))
    made["ISIC_0100000"] = root / "ISIC2018_Task1-2_Validation_Input" / "ISIC_0100000.jpg"
    _save(made["ISIC_0100000"], _rgb(h, w, 9))
    return made


def test_isic2018_parts_extras_and_padding(tmp_path):
    _isic(tmp_path / "isic")
    src = ADAPTERS["isic2018"](tmp_path / "isic", resize="pad")
    m = _pack(src, tmp_path, size=32)
    assert m.counts["total"] == 6 and m.unlabelled == ["ISIC_0100000"]
    meta = _samples(tmp_path / "out")["ISIC_0000000"]["json"]
    assert meta["size"] == [30, 50] and meta["pad"] == [10, 10, 0, 0]


def test_isic2018_missing_mask_is_named(tmp_path):
    _isic(tmp_path / "isic", n=3)
    (tmp_path / "isic/ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png").unlink()
    with pytest.raises(DataError, match=r"ISIC_0000001\.jpg: no ISIC2018_Task1_Training_Ground"):
        ADAPTERS["isic2018"](tmp_path / "isic").entries()


def test_isic2018_jpeg_images_with_png_masks_at_native_size(tmp_path):
    files = _isic(tmp_path / "isic", n=5, hw=(24, 24))
    assert {Image.open(p).format for p in files.values()} == {"JPEG"}
    truth = tmp_path / "isic" / "ISIC2018_Task1_Training_GroundTruth"
    assert {Image.open(p).format for p in truth.glob("*.png")} == {"PNG"}
    m = _pack(ADAPTERS["isic2018"](tmp_path / "isic"), tmp_path, size=24)
    got = _samples(tmp_path / "out")
    assert sorted(got) == sorted(files), "superpixels, licence and attribution are not samples"
    assert m.channels == m.source["channels"] == 3 and m.unlabelled == ["ISIC_0100000"]
    for key, path in files.items():
        assert np.array_equal(got[key]["image"], np.asarray(Image.open(path))), key
        if key == "ISIC_0100000":
            assert got[key]["mask"] is None
            continue
        mask = np.asarray(Image.open(truth / f"{key}_segmentation.png")) > 0
        assert mask.any() and np.array_equal(got[key]["mask"], mask), key


@pytest.mark.parametrize("fault", ["jpeg without its mask", "truncated jpeg"])
def test_isic2018_bad_input_is_named_and_nothing_is_written(fault, tmp_path):
    _isic(tmp_path / "isic", n=4)
    image = tmp_path / "isic" / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000002.jpg"
    if fault == "truncated jpeg":
        image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
        kind, line = "unreadable image", "ISIC2018_Task1-2_Training_Input/ISIC_0000002.jpg: "
    else:
        (
            tmp_path / "isic/ISIC2018_Task1_Training_GroundTruth/ISIC_0000002_segmentation.png"
        ).unlink()
        kind = "missing mask"
        line = (
            "ISIC2018_Task1-2_Training_Input/ISIC_0000002.jpg: no "
            "ISIC2018_Task1_Training_GroundTruth/ISIC_0000002_segmentation.png"
        )
    msg = _pack_fails(ADAPTERS["isic2018"](tmp_path / "isic"), tmp_path)
    assert "(1 problem(s))" in msg and f"- {kind} (1). Fix: " in msg
    assert f"\n    {line}" in msg
    assert "ISIC_0000001" not in msg and "ISIC_0000003" not in msg


# --- BUSI -----------------------------------------------------------------------------------------

_BUSI_MASKS = {"benign (1)": 2, "malignant (1)": 3, "normal (1)": 1, "normal (2)": 0}


def _busi(root: Path, hw: tuple[int, int] = (36, 44), gray=()) -> dict[str, Path]:
    """Dataset_BUSI_with_GT/{benign (1..3), malignant (1..2), normal (1..2)}: PNG images, RGB with
    gray content as in the download (mode L for the stems in ``gray``); one ``_mask.png`` each,
    plus ``_mask_1`` (and ``_mask_2``) as ``_BUSI_MASKS`` says; ``normal (1)``'s mask is all
    zeros and ``normal (2)`` has none. Returns key -> image file."""
    h, w = hw
    r = min(h, w) // 7
    spots = [(int(h * fy), int(w * fx)) for fy, fx in ((0.28, 0.23), (0.7, 0.68), (0.22, 0.77))]
    base = root / "Dataset_BUSI_with_GT"
    made = {}
    for label, n in (("benign", 3), ("malignant", 2), ("normal", 2)):
        for i in range(1, n + 1):
            stem = f"{label} ({i})"
            pixels = _gray(h, w, 10 * i + len(label))
            if stem not in gray:
                pixels = np.repeat(pixels[:, :, None], 3, axis=2)
            made[f"{label}_{i}"] = base / label / f"{stem}.png"
            _save(made[f"{label}_{i}"], pixels)
            if label == "normal":
                if i == 1:
                    _save(base / label / f"{stem}_mask.png", np.zeros((h, w), np.uint8))
                continue
            for k, (y, x) in enumerate(spots[: _BUSI_MASKS.get(stem, 1)]):
                name = f"{stem}_mask.png" if k == 0 else f"{stem}_mask_{k}.png"
                blob = _blob(h, w, y, x, r)
                _save(base / label / name, np.dstack([blob] * 3) if k == 2 else blob)  # RGB too
    return made


def test_busi_labels_unions_and_empty_normal_masks(tmp_path):
    _busi(tmp_path / "busi")
    m = _pack(ADAPTERS["busi"](tmp_path / "busi"), tmp_path, size=36)
    got = _samples(tmp_path / "out")
    assert len(got) == 7 and not m.unlabelled
    assert {k: v["json"]["label"] for k, v in got.items()}["malignant_2"] == "malignant"
    assert m.labels == {k: v["json"]["label"] for k, v in got.items()}, "the manifest's labels"
    assert not m.has_organ
    two = got["benign_1"]["mask"].sum()
    assert two > 1.5 * got["benign_2"]["mask"].sum(), "benign (1) has _mask and _mask_1"
    assert got["normal_1"]["mask"].sum() == 0 and got["normal_2"]["mask"].sum() == 0


def test_busi_missing_mask_is_named(tmp_path):
    _busi(tmp_path / "busi")
    (tmp_path / "busi/Dataset_BUSI_with_GT/malignant/malignant (2)_mask.png").unlink()
    with pytest.raises(DataError, match=r"malignant \(2\)\.png: no malignant \(2\)_mask\.png"):
        ADAPTERS["busi"](tmp_path / "busi").entries()


def test_busi_class_folders_label_and_mask_files_unite_at_native_size(tmp_path):
    files = _busi(tmp_path / "busi", hw=(32, 32))
    m = _pack(ADAPTERS["busi"](tmp_path / "busi"), tmp_path, size=32)
    got = _samples(tmp_path / "out")
    names = ["benign_1", "benign_2", "benign_3", "malignant_1", "malignant_2", "normal_1"]
    assert sorted(got) == sorted(files) == [*names, "normal_2"]
    assert not m.unlabelled, "normal images are labelled: their mask is empty"
    for key, path in files.items():
        assert got[key]["json"]["label"] == path.parent.name == key.split("_")[0]
        masks = sorted(path.parent.glob(f"{path.stem}_mask*.png"))
        assert len(masks) == _BUSI_MASKS.get(path.stem, 1), key
        union = np.zeros((32, 32), bool)
        for f in masks:
            union |= (np.asarray(Image.open(f)) > 0).reshape(32, 32, -1).any(axis=2)
        assert np.array_equal(got[key]["mask"], union), key
        assert union.any() == (path.parent.name != "normal")
    assert got["malignant_1"]["mask"].sum() > got["benign_1"]["mask"].sum()
    assert got["benign_1"]["mask"].sum() > got["benign_2"]["mask"].sum()


_BUSI_STEMS = [
    f"{label} ({i})"
    for label, n in (("benign", 3), ("malignant", 2), ("normal", 2))
    for i in range(1, n + 1)
]


@pytest.mark.parametrize(
    "gray,channels,want",
    [
        (_BUSI_STEMS, "auto", 1),  # every PNG grayscale
        ([s for s in _BUSI_STEMS if s != "benign (2)"], "auto", 3),  # one RGB PNG: all RGB
        ([], "auto", 3),  # RGB PNGs of gray content, as downloaded: RGB by their header
        ([], 1, 1),
    ],
)
def test_busi_grayscale_and_rgb_pngs(gray, channels, want, tmp_path):
    files = _busi(tmp_path / "busi", hw=(32, 32), gray=gray)
    modes = {Image.open(p).mode for p in files.values()}
    assert modes == ({"L"} if len(gray) == 7 else {"RGB"} if not gray else {"L", "RGB"})
    m = _pack(ADAPTERS["busi"](tmp_path / "busi", channels=channels), tmp_path, size=32)
    assert m.channels == m.source["channels"] == want
    for key, s in _samples(tmp_path / "out").items():
        stored = np.asarray(Image.open(files[key]))
        gray_of = stored if stored.ndim == 2 else stored[:, :, 0]
        want_image = gray_of if want == 1 else np.dstack([gray_of] * 3)
        assert s["image"].shape == want_image.shape and np.array_equal(s["image"], want_image), key


def test_busi_mask_of_another_size_is_named_and_nothing_is_written(tmp_path):
    _busi(tmp_path / "busi")
    base = tmp_path / "busi" / "Dataset_BUSI_with_GT"
    _save(base / "benign" / "benign (1)_mask_1.png", _blob(35, 44, 25, 30, 5))
    msg = _pack_fails(ADAPTERS["busi"](tmp_path / "busi"), tmp_path)
    assert msg.startswith(f"--source busi: {tmp_path / 'busi'} is not usable (1 problem(s)):")
    assert "- mask size differs from image (1). Fix: " in msg
    assert (
        "\n    Dataset_BUSI_with_GT/benign/benign (1)_mask_1.png: 35x44, its image benign (1).png "
        "is 36x44" in msg
    )


# --- BUSIS ----------------------------------------------------------------------------------------

# (image, mask) suffixes of the samples case0, case1, ...
_BUSIS_FILES = (
    ("bmp", "bmp"),
    ("bmp", "png"),
    ("jpg", "bmp"),
    ("png", "png"),
    ("jpeg", "tif"),
    ("png", "bmp"),
)


def _busis(
    root: Path,
    folders: tuple[str, str] = ("org", "gt"),
    files=_BUSIS_FILES,
    hw: tuple[int, int] | None = None,
    colour=(),
) -> dict[str, Path]:
    """BUSIS: ``<folders[0]>/case<i>.<ext>`` (grayscale; RGB for the stems in ``colour``) with
    ``<folders[1]>/case<i>_GT.<ext>``, suffixes from ``files``, size ``hw`` (default
    (26 + 2 i) x 44). Returns key -> image file."""
    made = {}
    for i, (image_ext, mask_ext) in enumerate(files):
        h, w = hw or (26 + 2 * i, 44)
        stem = f"case{i}"
        made[stem] = root / folders[0] / f"{stem}.{image_ext}"
        _save(made[stem], _rgb(h, w, i) if stem in colour else _gray(h, w, i))
        mask = _blob(h, w, h // 2, w // 2 - i, min(h, w) // 4)
        _save(root / folders[1] / f"{stem}_GT.{mask_ext}", mask)
    return made


def test_busis_bmp_pairs_and_a_mask_of_another_size(tmp_path):
    root = tmp_path / "busis"
    for i in range(5):
        _save(root / "org" / f"case{i}.bmp", _rgb(30, 40, i)[:, :, 0])
        _save(root / "gt" / f"case{i}_GT.bmp", _blob(30, 40, 15, 20, 6))
    m = _pack(ADAPTERS["busis"](root), tmp_path, size=32)
    assert m.channels == 1 and m.counts["total"] == 5
    _save(root / "gt" / "case3_GT.bmp", _blob(31, 40, 15, 20, 6))
    with pytest.raises(DataError, match=r"mask size differs.*\n.*case3_GT\.bmp: 31x40"):
        src = ADAPTERS["busis"](root)
        src.validate(src.entries())


@pytest.mark.parametrize("folders", [("org", "gt"), ("Original", "GT"), (".", ".")])
def test_busis_bmp_jpeg_png_images_with_gt_masks_of_each_suffix(folders, tmp_path):
    root = tmp_path / "busis"
    files = _busis(root, folders=folders, hw=(24, 24))
    assert {Image.open(p).format for p in files.values()} == {"BMP", "JPEG", "PNG"}
    m = _pack(ADAPTERS["busis"](root), tmp_path, size=24)
    got = _samples(tmp_path / "out")
    assert sorted(got) == sorted(files) and m.counts["total"] == len(_BUSIS_FILES)
    assert m.channels == m.source["channels"] == 1
    for key, path in files.items():
        assert np.array_equal(got[key]["image"], np.asarray(Image.open(path))), key
        (gt,) = (root / folders[1]).glob(f"{key}_GT.*")
        mask = np.asarray(Image.open(gt)) > 0
        assert mask.any() and np.array_equal(got[key]["mask"], mask), key


def test_busis_one_colour_image_makes_the_dataset_rgb(tmp_path):
    files = _busis(tmp_path / "busis", hw=(24, 24), colour=("case3",))
    m = _pack(ADAPTERS["busis"](tmp_path / "busis"), tmp_path, size=24)
    assert m.channels == m.source["channels"] == 3
    got = _samples(tmp_path / "out")
    assert np.array_equal(got["case3"]["image"], np.asarray(Image.open(files["case3"])))
    gray = np.asarray(Image.open(files["case0"]))
    assert np.array_equal(got["case0"]["image"], np.dstack([gray] * 3)), "gray replicated"


def test_busis_jpeg_gt_mask_keeps_its_shape(tmp_path):
    root = tmp_path / "busis"
    _busis(root, files=(("bmp", "jpg"),), hw=(32, 32))
    stored = np.asarray(Image.open(root / "gt" / "case0_GT.jpg"))
    drawn = _blob(32, 32, 16, 16, 8) > 0
    assert np.array_equal(stored >= 128, drawn), "the JPEG is the drawn mask, up to its ringing"
    src = ADAPTERS["busis"](root)
    (entry,) = src.entries()
    mask = src.load(entry, 32).mask
    assert np.array_equal(mask, drawn), f"{mask.sum()} foreground pixels, {drawn.sum()} drawn"


def test_busis_unreadable_bmp_is_named_and_nothing_is_written(tmp_path):
    _busis(tmp_path / "busis")
    bad = tmp_path / "busis" / "org" / "case1.bmp"
    bad.write_bytes(bad.read_bytes()[:300])
    msg = _pack_fails(ADAPTERS["busis"](tmp_path / "busis"), tmp_path)
    assert msg.startswith(f"--source busis: {tmp_path / 'busis'} is not usable (1 problem(s)):")
    assert "- unreadable image (1). Fix: " in msg and "\n    org/case1.bmp: " in msg
    assert "case0" not in msg and "case1_GT" not in msg


# --- every adapter --------------------------------------------------------------------------------


def _mask_files(name: str, image: Path) -> list[Path]:
    """The mask files of the sample whose image file is ``image``, as each layout pairs them."""
    if name == "kdsb18":
        return sorted((image.parent.parent / "masks").glob("*.png"))
    if name == "isic2018":
        truth = image.parent.parent / "ISIC2018_Task1_Training_GroundTruth"
        return sorted(truth.glob(f"{image.stem}_segmentation.png"))
    if name == "busi":
        return sorted(image.parent.glob(f"{image.stem}_mask*.png"))
    return sorted((image.parent.parent / "gt").glob(f"{image.stem}_GT.*"))


# name -> (builder of a small tree in the download layout, its unlabelled keys, channels)
TREES = {
    "kdsb18": (lambda root: _kdsb(root, n=6, test=2), ["t00" + "d" * 10, "t01" + "d" * 10], 3),
    "isic2018": (_isic, ["ISIC_0100000"], 3),
    "busi": (_busi, [], 3),
    "busis": (_busis, [], 1),
}


@pytest.mark.parametrize("name", sorted(TREES))
def test_every_adapter_packs_square_samples_with_its_channels_and_groups(name, tmp_path):
    build, unlabelled, channels = TREES[name]
    files = build(tmp_path / name)
    src = ADAPTERS[name](tmp_path / name)
    m = _pack(src, tmp_path, size=32, folds=2)
    _, got = _read(tmp_path / "out")
    assert sorted(got) == sorted(files) == sorted(m.groups)
    assert m.counts["total"] == len(files) and m.unlabelled == unlabelled
    assert m.counts["test"] >= 1 and len(m.folds) == 2 and all(m.folds)
    assert m.image_size == 32 and m.channels == m.source["channels"] == channels
    assert m.source["kind"] == name and m.source["resize"] == "squash"
    streamed = _streamed(tmp_path / "out", m)
    assert sorted(streamed) == sorted(files)
    for key, s in got.items():
        image, meta = s["image"], s["json"]
        assert image.shape == ((32, 32, 3) if channels == 3 else (32, 32)), key
        assert meta["key"] == key and meta["group"] == m.groups[key]
        assert meta["label"] == (key.split("_")[0] if name == "busi" else None)
        assert "pad" not in meta and "size" not in meta, "squash has no padding to record"
        if key in unlabelled:
            assert s["mask"] is None
        else:
            assert s["mask"].shape == (32, 32)
            assert s["mask"].any() == (not key.startswith("normal")), key
        from_stream, stream_mask = streamed[key]
        assert np.array_equal(from_stream, image.reshape(32, 32, -1).transpose(2, 0, 1)), key
        if stream_mask is not None:
            assert np.array_equal(stream_mask, s["mask"]), key
    _check_groups(m, src)


@pytest.mark.parametrize("name", sorted(TREES))
def test_pad_records_the_padding_that_restores_the_aspect_ratio(name, tmp_path):
    files = TREES[name][0](tmp_path / name)
    size = 32
    m = _pack(ADAPTERS[name](tmp_path / name, resize="pad"), tmp_path, size=size)
    assert m.source["resize"] == "pad"
    got = _samples(tmp_path / "out")
    n_padded = 0
    for key, path in files.items():
        w, h = Image.open(path).size
        meta = got[key]["json"]
        top, bottom, left, right = meta["pad"]
        side = max(h, w)
        assert meta["size"] == [h, w], key
        assert h + top + bottom == w + left + right == side, key
        assert abs(top - bottom) <= 1 and abs(left - right) <= 1, "centred"
        n_padded += top + bottom + left + right > 0
        # the content (no row or column of it all black) spans h x w scaled by size / side,
        # where the padding puts it
        image = got[key]["image"].reshape(size, size, -1).any(axis=2)
        rows, cols = np.flatnonzero(image.any(axis=1)), np.flatnonzero(image.any(axis=0))
        scale = size / side
        # (Pillow's antialiased bilinear kernel reaches one output pixel either side)
        for found, start, length in ((rows, top, h), (cols, left, w)):
            assert start * scale - 1.5 <= found[0] <= start * scale + 0.5, key
            assert (start + length) * scale - 0.5 <= found[-1] + 1, key
            assert found[-1] + 1 <= (start + length) * scale + 1.5, key
        mask = got[key]["mask"]
        if mask is None:
            continue
        # the mask is padded as its image: it matches the union of its files padded by the
        # recorded padding and area-averaged down to size x size
        union = np.zeros((h, w), bool)
        for f in _mask_files(name, path):
            union |= (np.asarray(Image.open(f)) > 0).reshape(h, w, -1).any(axis=2)
        padded = np.pad(union, ((top, bottom), (left, right))).astype(np.float32)
        want = np.asarray(Image.fromarray(padded).resize((size, size), Image.Resampling.BOX)) >= 0.5
        if not want.any():  # BUSI's normal images
            assert not mask.any(), key
            continue
        iou = (mask & want).sum() / (mask | want).sum()
        assert iou >= 0.8, f"{key}: IoU {iou:.2f} with the padded mask files"
    assert n_padded == len(files), "every image of these trees is oblong"


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_an_empty_or_missing_root_says_what_was_expected(name, tmp_path):
    (tmp_path / "empty").mkdir()
    msg = _pack_fails(ADAPTERS[name](tmp_path / "empty"), tmp_path)
    assert msg == (
        f"--source {name}: {tmp_path / 'empty'} does not hold the {name} layout. Expected "
        f"{ADAPTERS[name].layout}; found an empty folder"
    )
    with pytest.raises(DataError, match=f"--root {tmp_path / 'nowhere'} does not exist"):
        ADAPTERS[name](tmp_path / "nowhere").entries()


@pytest.mark.parametrize(
    "tree,given",
    [("busi", "kdsb18"), ("kdsb18", "busis"), ("busis", "isic2018"), ("isic2018", "busi")],
)
def test_a_tree_given_as_another_source_names_its_layout_and_the_right_source(
    tree, given, tmp_path
):
    TREES[tree][0](tmp_path / tree)
    msg = _pack_fails(ADAPTERS[given](tmp_path / tree), tmp_path)
    assert msg.startswith(
        f"--source {given}: {tmp_path / tree} does not hold the {given} layout. Expected "
        f"{ADAPTERS[given].layout}; found "
    )
    assert msg.endswith(f"; it looks like --source {tree}")


@pytest.mark.parametrize(
    "name,inner", [("kdsb18", "stage1_train"), ("busi", "Dataset_BUSI_with_GT")]
)
def test_root_may_be_the_folder_inside_the_download(name, inner, tmp_path):
    TREES[name][0](tmp_path / name)
    whole = ADAPTERS[name](tmp_path / name).entries()
    inside = ADAPTERS[name](tmp_path / name / inner).entries()
    # all but kdsb18's stage1_test (unlabelled), which lies beside stage1_train
    assert inside and inside == [e for e in whole if e.has_mask]


# --- the command line -----------------------------------------------------------------------------


def test_pack_busi_from_the_command_line(tmp_path):
    _busi(tmp_path / "busi")
    args = ["pack", "--source", "busi", "--root", tmp_path / "busi", "--image-size", 32]
    args += ["--folds", 2, "--labelled-fraction", 0.5, "--resize", "pad", "--workers", 2]
    done = submit_cli(*args, "--out", tmp_path / "out")
    assert "packed 7 32x32 images (3 channel(s), png) from busi" in done.stdout
    m, got = _read(tmp_path / "out")
    assert m.source["kind"] == "busi" and m.source["resize"] == "pad" and len(got) == 7
    assert got["benign_1"]["json"]["pad"] == [4, 4, 0, 0]

    base = tmp_path / "busi" / "Dataset_BUSI_with_GT"
    _save(base / "benign" / "benign (1)_mask_1.png", _blob(35, 44, 25, 30, 5))
    bad = submit_cli(*args, "--out", tmp_path / "bad", check=False)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("hpc-btunet pack: error: --source busi: "), bad.stderr
    assert "benign/benign (1)_mask_1.png: 35x44, its image benign (1).png is 36x44" in bad.stderr
    assert "Traceback" not in bad.stderr, bad.stderr
    assert _nothing_written(tmp_path / "bad")
