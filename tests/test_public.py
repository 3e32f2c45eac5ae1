"""The public 2-D dataset adapters, on small trees generated in the real layouts and formats."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.public import ADAPTERS, decode_rle
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.errors import DataError


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def _blob(h: int, w: int, y: int, x: int, r: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (((yy - y) ** 2 + (xx - x) ** 2) <= r * r).astype(np.uint8) * 255


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _pack(source, tmp_path: Path, size: int = 32, folds: int = 2):
    cfg = PackConfig(
        out=tmp_path / "out",
        image_size=size,
        shard_size=100,
        workers=2,
        splits=SplitConfig(test_fraction=0.3, labelled_fraction=0.5, folds=folds),
    )
    return pack(source, cfg, log=lambda _: None)


def _samples(out: Path) -> dict[str, dict]:
    """key -> {"json": meta, "mask": uint8 array or None} of every packed sample."""
    found: dict[str, dict] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                slot = found.setdefault(key, {"mask": None})
                if ext == "json":
                    slot["json"] = json.loads(data)
                elif ext.startswith("mask"):
                    import io

                    slot["mask"] = np.asarray(Image.open(io.BytesIO(data))) > 0
                elif ext.startswith("image"):
                    import io

                    slot["image"] = np.asarray(Image.open(io.BytesIO(data)))
    return found


# --- KDSB18 ---------------------------------------------------------------------------------------


def _kdsb(root: Path, n: int = 6, test: int = 0) -> None:
    for i in range(n):
        sid = f"{i:02d}ab" + "c" * 10
        rgba = np.dstack([_rgb(40, 48, i), np.full((40, 48), 255, np.uint8)])
        _save(root / "stage1_train" / sid / "images" / f"{sid}.png", rgba, "RGBA")
        for k, (y, x) in enumerate(((10, 10), (30, 35), (20, 24))[: 1 + i % 3]):
            _save(root / "stage1_train" / sid / "masks" / f"m{k}.png", _blob(40, 48, y, x, 5))
    for i in range(test):
        sid = f"t{i:02d}" + "d" * 10
        _save(root / "stage1_test" / sid / "images" / f"{sid}.png", _rgb(40, 48, 100 + i))


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


# --- ISIC 2018 ------------------------------------------------------------------------------------


def _isic(root: Path, n: int = 5) -> None:
    for i in range(n):
        key = f"ISIC_{i:07d}"
        _save(root / "ISIC2018_Task1-2_Training_Input" / f"{key}.jpg", _rgb(30 + i, 50, i))
        _save(
            root / "ISIC2018_Task1_Training_GroundTruth" / f"{key}_segmentation.png",
            _blob(30 + i, 50, 15, 25, 8),
        )
    (root / "ISIC2018_Task1-2_Training_Input" / "LICENSE.txt").write_text("licence")
    (root / "ISIC2018_Task1-2_Training_Input" / "ATTRIBUTION.txt").write_text("who")
    _save(root / "ISIC2018_Task1-2_Validation_Input" / "ISIC_0100000.jpg", _rgb(30, 50, 9))


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


# --- BUSI -----------------------------------------------------------------------------------------


def _busi(root: Path) -> None:
    base = root / "Dataset_BUSI_with_GT"
    for label, n in (("benign", 3), ("malignant", 2), ("normal", 2)):
        for i in range(1, n + 1):
            stem = f"{label} ({i})"
            _save(base / label / f"{stem}.png", _rgb(36, 44, i))  # stored as RGB, gray content
            if label == "normal":
                if i == 1:
                    _save(base / label / f"{stem}_mask.png", np.zeros((36, 44), np.uint8))
                continue
            _save(base / label / f"{stem}_mask.png", _blob(36, 44, 10, 10, 5))
            if i == 1:
                _save(base / label / f"{stem}_mask_1.png", _blob(36, 44, 25, 30, 5))


def test_busi_labels_unions_and_empty_normal_masks(tmp_path):
    _busi(tmp_path / "busi")
    m = _pack(ADAPTERS["busi"](tmp_path / "busi"), tmp_path, size=36)
    got = _samples(tmp_path / "out")
    assert len(got) == 7 and not m.unlabelled
    assert {k: v["json"]["label"] for k, v in got.items()}["malignant_2"] == "malignant"
    two = got["benign_1"]["mask"].sum()
    assert two > 1.5 * got["benign_2"]["mask"].sum(), "benign (1) has _mask and _mask_1"
    assert got["normal_1"]["mask"].sum() == 0 and got["normal_2"]["mask"].sum() == 0


def test_busi_missing_mask_is_named(tmp_path):
    _busi(tmp_path / "busi")
    (tmp_path / "busi/Dataset_BUSI_with_GT/malignant/malignant (2)_mask.png").unlink()
    with pytest.raises(DataError, match=r"malignant \(2\)\.png: no malignant \(2\)_mask\.png"):
        ADAPTERS["busi"](tmp_path / "busi").entries()


# --- BUSIS ----------------------------------------------------------------------------------------


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
