"""FolderSource and the image helpers under it, on tiny folders built in tmp_path."""

from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from hpc_btunet.data.folder import MAX_LISTED, FolderSource
from hpc_btunet.data.imageio import binarise_mask, read_image, to_channels, to_uint8
from hpc_btunet.errors import DataError, UserError

H, W = 20, 24


def _gray(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (H, W), dtype=np.uint8)


def _blob_mask(h: int = H, w: int = W) -> np.ndarray:
    """A 12 x 12 square of 255 at rows 4..15, columns 6..17."""
    mask = np.zeros((h, w), np.uint8)
    mask[4:16, 6:18] = 255
    return mask


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):
        tifffile.imwrite(path, array)
    else:
        Image.fromarray(array).save(path)


def _dataset(root: Path, images: dict[str, np.ndarray], masks: dict[str, np.ndarray]) -> Path:
    for name, array in images.items():
        _write(root / "images" / name, array)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for name, array in masks.items():
        _write(root / "masks" / name, array)
    return root


def _error(source: FolderSource) -> str:
    """The message of the DataError that listing and validating ``source`` raise."""
    with pytest.raises(DataError) as info:
        source.validate(source.entries())
    return str(info.value)


def test_happy_path_gray(tmp_path: Path) -> None:
    ramp = np.linspace(1000, 3000, H * W).reshape(H, W).astype(np.uint16)
    root = _dataset(
        tmp_path,
        {"a.png": _gray(1), "b.jpg": _gray(2), "c.tif": ramp},
        {"a.png": _blob_mask(), "b.png": _blob_mask(), "c.png": _blob_mask(), "zzz.png": _gray()},
    )
    (root / "images" / "notes.txt").write_text("not an image")
    (root / "images" / ".DS_Store").write_bytes(b"\0")
    (root / "images" / "sub").mkdir()
    _write(root / "images" / "sub" / "d.png", _gray())

    source = FolderSource(root)
    entries = source.entries()
    assert [e.key for e in entries] == ["a", "b", "c"]
    assert [e.group for e in entries] == ["a", "b", "c"]
    assert all(e.has_mask for e in entries)
    assert source.channels == 1
    assert any("zzz.png" in w for w in source.warnings)
    assert any("notes.txt" in w for w in source.warnings)
    source.validate(entries)

    a = source.load(entries[0], 10)
    assert a.key == "a" and a.group == "a"
    assert a.image.shape == (10, 10) and a.image.dtype == np.uint8
    assert a.mask is not None and a.mask.shape == (10, 10) and a.mask.dtype == np.uint8
    assert set(np.unique(a.mask)) == {0, 1}
    # The 12 x 12 blob covers rows 4..15 of 20 and columns 6..17 of 24: rows 2..7, columns 2..7.
    rows, cols = np.nonzero(a.mask)
    assert abs(rows.min() - 2) <= 1 and abs(rows.max() - 7) <= 1
    assert abs(cols.min() - 2.5) <= 1 and abs(cols.max() - 7.5) <= 1
    assert abs(a.mask.mean() - 144 / (H * W)) < 0.08

    c = source.load(entries[2], 16)  # 16-bit TIFF, rescaled per image to the full uint8 range
    assert c.image.dtype == np.uint8 and c.image.shape == (16, 16)
    assert c.image.min() <= 10 and c.image.max() >= 245

    same = source.load(entries[0], 20)
    assert same.image.shape == (20, 20)
    assert source.describe() == {
        "kind": "folder",
        "root": str(root.resolve()),
        "channels": 1,
        "unlabelled": False,
        "mask_suffix": "",
        "group_regex": None,
    }


def test_happy_path_colour_and_mask_suffix(tmp_path: Path) -> None:
    rgb = np.stack([_gray(1), _gray(2), _gray(3)], axis=2)
    root = _dataset(
        tmp_path,
        {"a.jpg": _gray(), "b.png": rgb},
        {"a_mask.png": _blob_mask(), "b_mask.tif": _blob_mask() > 0},
    )
    source = FolderSource(root, mask_suffix="_mask")
    entries = source.entries()
    assert source.channels == 3
    source.validate(entries)
    for entry in entries:
        sample = source.load(entry, 8)
        assert sample.image.shape == (8, 8, 3) and sample.image.dtype == np.uint8
        assert sample.mask is not None and set(np.unique(sample.mask)) == {0, 1}

    gray = FolderSource(root, channels=1, mask_suffix="_mask")
    assert gray.load(gray.entries()[1], 8).image.shape == (8, 8)


def test_missing_masks_named_or_allowed_when_unlabelled(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path, {"a.png": _gray(), "b.png": _gray(), "c.png": _gray()}, {"a.png": _blob_mask()}
    )
    message = _error(FolderSource(root))
    assert "missing mask (2)" in message
    assert "images/b.png" in message and "images/c.png" in message
    assert "images/a.png" not in message
    assert "--unlabelled" in message

    source = FolderSource(root, unlabelled=True)
    entries = source.entries()
    assert [e.has_mask for e in entries] == [True, False, False]
    source.validate(entries)
    assert source.load(entries[1], 8).mask is None
    assert source.load(entries[0], 8).mask is not None


def test_missing_masks_folder(tmp_path: Path) -> None:
    _write(tmp_path / "images" / "a.png", _gray())
    with pytest.raises(DataError, match="masks/"):
        FolderSource(tmp_path).entries()
    source = FolderSource(tmp_path, unlabelled=True)
    entries = source.entries()
    source.validate(entries)
    assert not entries[0].has_mask


def test_mask_size_mismatch(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        {"a.png": _gray(), "b.png": _gray()},
        {"a.png": _blob_mask(10, 12), "b.png": _blob_mask()},
    )
    message = _error(FolderSource(root))
    assert "masks/a.png is 10x12 but images/a.png is 20x24" in message
    assert "resize the mask" in message
    assert "b.png" not in message


def test_truncated_and_garbage_files(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        {"ok.png": _gray(), "cut.png": _gray(), "junk.png": _gray()},
        {"ok.png": _blob_mask(), "cut.png": _blob_mask(), "junk.png": _blob_mask()},
    )
    cut = root / "images" / "cut.png"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    (root / "masks" / "junk.png").write_bytes(b"this is not a png at all")
    message = _error(FolderSource(root))
    assert (
        "unreadable image (1)" in message and "images/cut.png: image file is truncated" in message
    )
    assert "unreadable mask (1)" in message and "masks/junk.png" in message
    assert "re-export or remove" in message
    assert "ok.png" not in message


def test_duplicate_stems(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        {
            "a.png": _gray(),
            "a.tif": _gray(),
            "x y.png": _gray(),
            "x-y.png": _gray(),
            "x.y.png": _gray(),
        },
        {},
    )
    with pytest.raises(DataError) as info:
        FolderSource(root, unlabelled=True).entries()
    message = str(info.value)
    assert "duplicate name (2)" in message
    assert "images/a.png, images/a.tif" in message
    assert "images/x y.png, images/x.y.png" in message
    assert "x-y.png" not in message


def test_no_images(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "README.txt").write_text("scans go here")
    with pytest.raises(DataError, match=r"no images(.|\n)*README\.txt"):
        FolderSource(tmp_path).entries()

    (tmp_path / "images" / "README.txt").unlink()
    (tmp_path / "images").rmdir()
    with pytest.raises(DataError, match=r"missing folder(.|\n)*images/"):
        FolderSource(tmp_path).entries()

    with pytest.raises(DataError, match="does not exist"):
        FolderSource(tmp_path / "nowhere").entries()


def test_several_problems_in_one_error(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        {"p1_s0.png": _gray(), "p1_s1.png": _gray(), "p2_s0.png": _gray(), "loose.png": _gray()},
        {"p1_s0.png": _blob_mask(10, 10), "loose.png": _blob_mask()},
    )
    cut = root / "images" / "p2_s0.png"
    cut.write_bytes(cut.read_bytes()[:40])
    message = _error(FolderSource(root, group_regex=r"^(p\d+)_s\d+$"))
    assert "(5 problems)" in message
    for expected in [
        "missing mask (2)",
        "images/p1_s1.png",
        "images/p2_s0.png",
        "name does not match group_regex (1)",
        "images/loose.png",
        "unreadable image (1)",
        "mask size differs from image (1)",
        "masks/p1_s0.png is 10x10",
    ]:
        assert expected in message


def test_group_regex(tmp_path: Path) -> None:
    names = ["p1_slice0.png", "p1_slice1.png", "p2_slice0.png"]
    root = _dataset(tmp_path, dict.fromkeys(names, _gray()), dict.fromkeys(names, _blob_mask()))
    source = FolderSource(root, group_regex=r"^(.*)_slice\d+$")
    entries = source.entries()
    assert [(e.key, e.group) for e in entries] == [
        ("p1_slice0", "p1"),
        ("p1_slice1", "p1"),
        ("p2_slice0", "p2"),
    ]
    source.validate(entries)
    assert source.load(entries[1], 8).group == "p1"

    _write(root / "images" / "scout.png", _gray())
    _write(root / "masks" / "scout.png", _blob_mask())
    message = _error(FolderSource(root, group_regex=r"^(.*)_slice\d+$"))
    assert "name does not match group_regex (1)" in message and "images/scout.png" in message

    with pytest.raises(UserError, match="group_regex"):
        FolderSource(root, group_regex=r"^(.*_slice")
    with pytest.raises(UserError, match="no capture group"):
        FolderSource(root, group_regex=r"_slice\d+")


def test_keys_sanitised(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"case.01.png": _gray()}, {"case.01.png": _blob_mask()})
    source = FolderSource(root)
    entries = source.entries()
    assert [(e.key, e.has_mask) for e in entries] == [("case_01", True)]
    source.validate(entries)
    assert source.load(entries[0], 8).key == "case_01"


def test_long_lists_are_cut(tmp_path: Path) -> None:
    tiny = np.zeros((2, 2), np.uint8)
    root = _dataset(tmp_path, {f"img{i:03d}.png": tiny for i in range(MAX_LISTED + 7)}, {})
    message = _error(FolderSource(root))
    assert f"missing mask ({MAX_LISTED + 7})" in message
    assert "... and 7 more" in message
    assert message.count("images/img") == MAX_LISTED


def test_looping_and_broken_links_are_problems(tmp_path: Path) -> None:
    root = _dataset(
        tmp_path,
        {"ok.png": _gray(), "m.png": _gray()},
        {"ok.png": _blob_mask()},
    )
    (root / "images" / "x.png").symlink_to("x.png")  # a link to itself
    (root / "images" / "y.png").symlink_to("z.png")  # y -> z -> y
    (root / "images" / "z.png").symlink_to("y.png")
    (root / "images" / "gone.png").symlink_to("nowhere.png")
    (root / "masks" / "m.png").symlink_to("m.png")
    (root / "images" / "loop.txt").symlink_to("loop.txt")  # not an image name: only ignored
    source = FolderSource(root, unlabelled=True)
    entries = source.entries()  # listing names no problem and raises nothing
    assert [e.key for e in entries] == ["gone", "m", "ok", "x", "y", "z"]
    assert any("loop.txt" in w for w in source.warnings)
    with pytest.raises(DataError) as info:
        source.validate(entries)
    message = str(info.value)
    assert "(5 problems)" in message and "inaccessible file (5)" in message
    for line in [
        "images/x.png: symbolic link loops",
        "images/y.png: symbolic link loops",
        "images/z.png: symbolic link loops",
        "images/gone.png: symbolic link points to nothing",
        "masks/m.png: symbolic link loops",
    ]:
        assert line in message
    assert "fix or remove the link" in message and "ok.png" not in message


def _link_to_itself(path: Path) -> None:
    path.symlink_to(path.name)


def _link_to_a_loop(path: Path) -> None:
    """``path -> a``, ``a -> b``, ``b -> a``."""
    path.symlink_to("a")
    (path.parent / "a").symlink_to("b")
    (path.parent / "b").symlink_to("a")


def _broken_link(path: Path) -> None:
    path.symlink_to("nowhere")


def _plain_file(path: Path) -> None:
    path.write_text("not a folder")


@pytest.mark.parametrize("folder", ["images", "masks"])
@pytest.mark.parametrize(
    "make,reason",
    [
        (_link_to_itself, "symbolic link loops"),
        (_link_to_a_loop, "symbolic link loops"),
        (_broken_link, "symbolic link points to nothing"),
        (_plain_file, "not a folder"),
    ],
)
def test_unusable_images_or_masks_folder(tmp_path: Path, folder: str, make, reason: str) -> None:
    root = _dataset(tmp_path, {"a.png": _gray()}, {"a.png": _blob_mask()})
    target = root / folder
    for p in target.iterdir():
        p.unlink()
    target.rmdir()
    make(target)
    for unlabelled in (False, True):  # a masks/ that exists but cannot be listed is never skipped
        with pytest.raises(DataError) as info:
            FolderSource(root, unlabelled=unlabelled).entries()
        message = str(info.value)
        assert "unusable folder (1)" in message and f"{folder}/: {reason}" in message
        assert "missing folder" not in message and "no images" not in message


def test_looping_dataset_root(tmp_path: Path) -> None:
    (tmp_path / "ds").symlink_to("ds")
    with pytest.raises(DataError, match="symbolic link that loops"):
        FolderSource(tmp_path / "ds").entries()


def _make_unreadable(path: Path) -> None:
    """Take every permission from ``path``; skip the test where that does not stop reading it."""
    path.chmod(0)
    try:
        path.open("rb").close()
    except PermissionError:
        return
    pytest.skip("this user reads files whatever their permission bits (root)")


def test_file_without_read_permission(tmp_path: Path) -> None:
    root = _dataset(tmp_path, {"a.png": _gray(), "b.png": _gray()}, {"a.png": _blob_mask()})
    _make_unreadable(root / "images" / "b.png")
    _make_unreadable(root / "masks" / "a.png")
    message = _error(FolderSource(root, unlabelled=True))
    assert "inaccessible file (2)" in message and "chmod a+r" in message
    assert "images/b.png: permission denied" in message
    assert "masks/a.png: permission denied" in message


def test_file_without_read_permission_as_seen_by_open(tmp_path: Path, monkeypatch) -> None:
    """The same as above for any user, root included: ``open`` fails as it would with mode 0."""
    root = _dataset(tmp_path, {"a.png": _gray(), "b.png": _gray()}, {"a.png": _blob_mask()})
    denied = {root / "images" / "b.png", root / "masks" / "a.png"}
    real_open = builtins.open

    def open_(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) in denied:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    message = _error(FolderSource(root, unlabelled=True))
    assert "(2 problems)" in message and "inaccessible file (2)" in message
    assert "images/b.png: permission denied" in message
    assert "masks/a.png: permission denied" in message


def test_bad_options() -> None:
    with pytest.raises(UserError, match="channels"):
        FolderSource(".", channels=2)
    with pytest.raises(UserError, match="channels"):
        FolderSource(".", channels="rgb")


def test_image_conversions(tmp_path: Path) -> None:
    assert to_uint8(np.array([[True, False]])).tolist() == [[255, 0]]
    assert to_uint8(np.array([[-1.0, 1.0, np.nan]])).tolist() == [[0, 255, 0]]
    assert to_uint8(np.full((2, 2), 7, np.uint16)).tolist() == [[0, 0], [0, 0]]
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 3] = 255  # opaque alpha must not make a mask all foreground
    rgba[0, 0, 1] = 9
    assert binarise_mask(rgba).tolist() == [[True, False], [False, False]]
    assert to_channels(rgba, 3).shape == (2, 2, 3)
    assert to_channels(np.full((2, 2, 3), 200, np.uint8), 1).tolist() == [[200, 200], [200, 200]]
    assert to_channels(np.zeros((2, 2), np.uint8), 3).shape == (2, 2, 3)

    palette = Image.new("P", (2, 2))
    palette.putdata([0, 1, 1, 0])
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(tmp_path / "p.png")
    assert read_image(tmp_path / "p.png").shape == (2, 2, 3)
