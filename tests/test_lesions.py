"""The built-in lesion dataset (hpc_btunet.data.lesions) and what it adds to a packed dataset:
image-level labels in the manifest, an organ mask per sample through pack, the loader and the
webdataset pipeline, checked by the sample CRC; its options on the command line."""

from __future__ import annotations

import json
import tarfile

import numpy as np
import pytest
from conftest import submit_cli
from scipy import ndimage

from hpc_btunet.data import load_manifest, make_loader, webdataset_pipeline
from hpc_btunet.data.lesions import (
    LESION_RADIUS,
    REFERENCE_SIZE,
    LesionSource,
    abnormal,
    generate_lesion_image,
)
from hpc_btunet.data.manifest import MANIFEST_NAME
from hpc_btunet.data.pack import PackConfig, pack
from hpc_btunet.data.sources import build_source
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.errors import ShardError, UserError


def best_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """Dice of ``image >= t`` or ``image <= t`` against ``mask``, for the best of every threshold
    and both polarities (an oracle: it knows the mask)."""
    best = 0.0
    for values in (image, 255 - image):
        inside = np.bincount(values[mask == 1], minlength=256)
        outside = np.bincount(values[mask == 0], minlength=256)
        true_pos = np.append(np.cumsum(inside[::-1])[::-1], 0)
        false_pos = np.append(np.cumsum(outside[::-1])[::-1], 0)
        best = max(best, float(np.max(2 * true_pos / (true_pos + false_pos + inside.sum()))))
    return best


@pytest.fixture(scope="module")
def corpus() -> list[tuple]:
    """24 abnormal slices at 128 x 128: (image, lesion mask, organ mask, scene)."""
    return [generate_lesion_image((9, i), 128, True, return_scene=True) for i in range(24)]


# --- the generator ----------------------------------------------------------------------------


def test_same_seed_same_slice_and_image_i_ignores_the_dataset_size():
    small, large = LesionSource(6, seed=3), LesionSource(40, seed=3)
    assert [e.label for e in small.entries()] == [e.label for e in large.entries()[:6]]
    for entry in small.entries()[::2]:
        a, b = small.load(entry, 48), large.load(entry, 48)
        assert a.label == b.label and a.group == b.group
        for x, y in ((a.image, b.image), (a.mask, b.mask), (a.organ, b.organ)):
            assert np.array_equal(x, y)
    other = LesionSource(6, seed=4).load(small.entries()[0], 48)
    assert not np.array_equal(other.image, small.load(small.entries()[0], 48).image)
    first, second = (small.load(e, 48) for e in small.entries()[:2])
    assert not np.array_equal(first.organ, second.organ), "each image its own anatomy"


@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.5, 0.8])
def test_label_counts_follow_the_abnormal_fraction(fraction):
    flags = abnormal(np.arange(500), fraction, seed=7)
    counts = np.cumsum(flags)
    n = np.arange(1, 501)
    assert np.all(np.abs(counts - fraction * n) <= 2.5), "every prefix holds the fraction"
    entries = LesionSource(200, seed=7, abnormal_fraction=fraction).entries()
    assert [e.label == "abnormal" for e in entries] == flags[:200].tolist()
    assert abnormal(np.arange(500), fraction, seed=8).tolist() != flags.tolist()


@pytest.mark.parametrize("size", [32, 47, 128])
def test_lesions_lie_in_the_organ_and_every_label_matches_its_mask(size):
    """Normal slices have empty masks; an abnormal slice keeps each of its lesions, even the
    smallest at 32 x 32 (the pixel nearest a lesion's centre is always in its mask)."""
    source = LesionSource(40, seed=1, abnormal_fraction=0.6)
    for entry in source.entries():
        index = int(entry.key.split("-")[1])
        sample = source.load(entry, size)
        assert sample.image.shape == sample.mask.shape == sample.organ.shape == (size, size)
        assert {sample.mask.dtype, sample.organ.dtype} == {np.dtype(np.uint8)}
        assert set(np.unique(sample.organ)) == {0, 1} and set(np.unique(sample.mask)) <= {0, 1}
        assert not np.any(sample.mask > sample.organ), "every lesion pixel is an organ pixel"
        if entry.label == "normal":
            assert not sample.mask.any()
            continue
        *_, scene = generate_lesion_image(
            (1, 0, index), size, True, source.style(index), return_scene=True
        )
        for lesion in scene.lesions:
            x, y = (np.array(lesion.shape.centre) * size / REFERENCE_SIZE).astype(int)
            assert sample.mask[y, x] == 1, f"{entry.key}: a lesion left no pixel at {size}"


def test_organs_cover_a_quarter_to_most_of_the_image_and_vary(corpus):
    areas = np.array([organ.mean() for _, _, organ, _ in corpus])
    assert areas.min() > 0.2 and areas.max() < 0.65
    assert areas.min() < 0.35 and areas.max() > 0.45
    for _, _, organ, _ in corpus:  # one closed region, no holes
        assert ndimage.label(organ)[1] == 1
        assert np.array_equal(ndimage.binary_fill_holes(organ), organ.astype(bool))


def test_lesion_counts_sizes_and_contrasts_vary(corpus):
    scenes = [scene for *_, scene in corpus]
    assert {len(s.lesions) for s in scenes} == {1, 2, 3}
    radii = np.array([lesion.shape.radius for s in scenes for lesion in s.lesions])
    assert LESION_RADIUS[0] * 0.7 < radii.min() < 6 and 15 < radii.max() < LESION_RADIUS[1] * 1.3
    # contrast as measured in the images: the lesion's mean against the organ around it
    measured = []
    for image, mask, organ, _ in corpus:
        components, n = ndimage.label(mask)
        for c in range(1, n + 1):
            lesion = components == c
            ring = ndimage.binary_dilation(lesion, iterations=4) & ~mask.astype(bool) & (organ == 1)
            if lesion.sum() >= 12 and ring.sum() >= 12:
                around = image[ring].mean()
                measured.append((image[lesion].mean() - around) / max(around, 1))
    measured = np.array(measured)
    assert (measured < -0.1).any() and (measured > 0.1).any(), "hypo- and hyper-intense"
    assert np.sum(np.abs(measured) < 0.08) >= 3, "some lesions barely differ from the organ"
    assert np.abs(measured).max() > 0.25


def test_no_global_threshold_segments_the_lesions(corpus):
    """An honest check of difficulty: the best threshold over the whole image, or over the organ
    alone (told where the organ is), chosen per image with the mask known, stays far from 1."""
    whole = [best_threshold_dice(image, mask) for image, mask, _, _ in corpus]
    in_organ = [
        best_threshold_dice(image[organ == 1], mask[organ == 1]) for image, mask, organ, _ in corpus
    ]
    assert np.mean(whole) < 0.35 and np.median(whole) < 0.3
    assert np.mean(in_organ) < 0.5


def test_a_smaller_size_is_the_same_slice():
    large = generate_lesion_image((2, 5), 256, True)
    small = generate_lesion_image((2, 5), 64, True)
    for big, little in zip(large[1:], small[1:], strict=True):  # lesion and organ masks
        shrunk = big.reshape(64, 4, 64, 4).mean(axis=(1, 3)) > 0.5
        assert np.mean(shrunk == little) > 0.97


@pytest.mark.parametrize(
    "options, words",
    [
        ({"abnormal_fraction": 0}, "--abnormal-fraction must lie strictly between 0 and 1"),
        ({"abnormal_fraction": 1.0}, "strictly between"),
        ({"abnormal_fraction": True}, "strictly between"),
        ({"num_images": 0}, "num_images"),
        ({"group_size": 1.5}, "group_size"),
        ({"seed": -2}, "seed"),
    ],
)
def test_bad_options_are_user_errors(options, words):
    with pytest.raises(UserError, match=words):
        LesionSource(**({"num_images": 4} | options))


def test_images_below_32_pixels_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="at least 32"):
        generate_lesion_image(0, 24)
    cfg = PackConfig(out=tmp_path / "ds", image_size=24, splits=SplitConfig(folds=2))
    with pytest.raises(UserError, match="--image-size must be at least 32"):
        pack(LesionSource(20), cfg, log=lambda _: None)
    assert not (tmp_path / "ds").exists()


def test_groups_share_a_scanner_and_the_source_describes_itself():
    source = LesionSource(5, seed=2, group_size=2, abnormal_fraction=0.4)
    entries = source.entries()
    assert [e.group for e in entries] == ["patient-000000"] * 2 + ["patient-000001"] * 2 + [
        "patient-000002"
    ]
    assert source.style(0) == source.style(0) != source.style(1)
    assert source.describe() == {
        "kind": "synthetic",
        "task": "lesion",
        "num_images": 5,
        "channels": 1,
        "seed": 2,
        "group_size": 2,
        "abnormal_fraction": 0.4,
    }
    built = build_source("synthetic", root=None, num_images=5, channels="auto", seed=2,
                         group_size=2, task="lesion", abnormal_fraction=0.4)  # fmt: skip
    assert built.describe() == source.describe()


# --- packed: manifest, loader, webdataset pipeline, CRC -----------------------------------------


@pytest.fixture(scope="module", params=["png", "npy"])
def packed(request, tmp_path_factory):
    """40 lesion slices of 32 x 32 in shards of 8, and the source they came from."""
    out = tmp_path_factory.mktemp("lesions") / request.param
    source = LesionSource(40, seed=5)
    cfg = PackConfig(
        out=out, image_size=32, shard_size=8, encoding=request.param, splits=SplitConfig(folds=2)
    )
    return out, pack(source, cfg, log=lambda _: None), source


def test_manifest_holds_labels_and_the_organ_flag(packed):
    out, m, source = packed
    content = json.loads((out / MANIFEST_NAME).read_text())
    assert content["organ"] is True and m.has_organ
    assert content["labels"] == {e.key: e.label for e in source.entries()} == m.labels
    assert list(content)[-3:] == ["labels", "organ", "checksum"]
    assert load_manifest(out).to_json() == content
    assert m.source["task"] == "lesion" and m.source["abnormal_fraction"] == 0.5


def test_each_sample_stores_its_organ_between_mask_and_json(packed):
    out, m, _ = packed
    with tarfile.open(out / m.shards[0].name) as tar:
        names = tar.getnames()
    key = m.shards[0].keys[0]
    enc = m.encoding
    assert names[:4] == [f"{key}.image.{enc}", f"{key}.mask.{enc}", f"{key}.organ.{enc}",
                         f"{key}.json"]  # fmt: skip


@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_reads_organ_masks_through_its_batch_slots(packed, workers):
    out, m, source = packed
    by_key = {e.key: e for e in source.entries()}
    loader = make_loader(out, "test", batch_size=4, shuffle=False, drop_last=False,
                         num_workers=workers, with_organ=True)  # fmt: skip
    seen = 0
    for batch in loader:
        organ, mask = batch["organ"], batch["mask"]
        assert organ.dtype == mask.dtype == batch["image"].dtype
        assert organ.shape == mask.shape == (len(batch["key"]), 1, 32, 32)
        for i, key in enumerate(batch["key"]):
            if batch["pad"][i]:
                continue
            want = source.load(by_key[key], 32)
            assert np.array_equal(organ[i, 0].numpy(), want.organ)
            assert np.array_equal(mask[i, 0].numpy(), want.mask)
            assert np.array_equal(batch["image"][i, 0].numpy(), want.image)
            assert mask[i].any() == (m.labels[key] == "abnormal")
            seen += 1
    assert seen == len(m.splits["test"])
    plain = next(iter(make_loader(out, "test", batch_size=4, shuffle=False)))
    assert "organ" not in plain and "mask" in plain, "organ masks are read only when asked for"


def test_the_webdataset_pipeline_yields_organ_masks(packed, toy_pack):
    out, m, source = packed
    by_key = {e.key: e for e in source.entries()}
    samples = list(webdataset_pipeline(out, fold=1, part="val"))
    assert sorted(s["key"] for s in samples) == m.fold_keys(1)[1]
    for s in samples:
        want = source.load(by_key[s["key"]], 32)
        assert s["organ"].dtype == np.uint8 and s["organ"].shape == (32, 32)
        assert np.array_equal(s["organ"], want.organ) and np.array_equal(s["mask"], want.mask)
        assert s["label"] == m.labels[s["key"]]
    toy, _ = toy_pack(n=20, folds=2)
    assert all(s["organ"] is None for s in webdataset_pipeline(toy))


def test_organ_masks_from_a_dataset_without_them_is_one_clear_error(toy_pack):
    toy, _ = toy_pack(n=20, folds=2)
    with pytest.raises(UserError) as err:
        make_loader(toy, batch_size=2, with_organ=True)
    message = str(err.value)
    assert str(toy) in message and "stores no organ masks" in message
    assert "pack --source synthetic --task lesion" in message


def _flip_organ_byte(out, m, key: str) -> None:
    shard = next(s for s in m.shards if key in s.keys)
    path = out / shard.name
    with tarfile.open(path) as tar:
        info = tar.getmember(f"{key}.organ.{m.encoding}")
    data = bytearray(path.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_a_flipped_organ_byte_fails_the_sample_checksum(tmp_path, encoding):
    cfg = PackConfig(out=tmp_path / "ds", image_size=32, shard_size=8, encoding=encoding,
                     splits=SplitConfig(folds=2))  # fmt: skip
    m = pack(LesionSource(24, seed=2), cfg, log=lambda _: None)
    key = m.splits["test"][0]
    _flip_organ_byte(tmp_path / "ds", m, key)
    for with_organ in (True, False):  # covered whether or not the organ is read
        loader = make_loader(tmp_path / "ds", "test", batch_size=1, shuffle=False,
                             with_organ=with_organ)  # fmt: skip
        with pytest.raises(ShardError, match="fails its checksum") as err:
            list(loader)
        assert repr(key) in str(err.value)
    with pytest.raises(ShardError, match="fails its checksum"):
        list(webdataset_pipeline(tmp_path / "ds", "test"))


def test_an_edited_label_fails_the_manifest_checksum(packed, tmp_path):
    out, m, _ = packed
    content = json.loads((out / MANIFEST_NAME).read_text())
    key = next(k for k, v in m.labels.items() if v == "normal")
    content["labels"][key] = "abnormal"
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(content))
    with pytest.raises(UserError, match="corrupted or was edited"):
        load_manifest(tmp_path)


# --- the command line -------------------------------------------------------------------------


def test_cli_packs_lesions_and_nuclei_stay_the_default(tmp_path):
    done = submit_cli("pack", "--task", "lesion", "--num-images", 30, "--image-size", 32,
                      "--abnormal-fraction", 0.3, "--folds", 2, "--out", tmp_path / "l")  # fmt: skip
    assert "packed 30 32x32 images" in done.stdout
    m = load_manifest(tmp_path / "l")
    expected = abnormal(np.arange(30), 0.3, seed=0)  # --seed 0
    assert m.has_organ and sum(v == "abnormal" for v in m.labels.values()) == expected.sum()
    assert abs(expected.sum() - 9) <= 2
    common = ["--num-images", 12, "--image-size", 32, "--folds", 2, "--labelled-fraction", 1]
    submit_cli("pack", *common, "--out", tmp_path / "default")
    submit_cli("pack", *common, "--task", "nuclei", "--out", tmp_path / "nuclei")
    for name in ("manifest.json", *(s.name for s in load_manifest(tmp_path / "nuclei").shards)):
        assert (tmp_path / "default" / name).read_bytes() == (
            tmp_path / "nuclei" / name
        ).read_bytes()
    nuclei = load_manifest(tmp_path / "nuclei")
    assert nuclei.labels == {} and not nuclei.has_organ and "task" not in nuclei.source


@pytest.mark.parametrize(
    "args, words",
    [
        (["--task", "lesion", "--abnormal-fraction", 0], "--abnormal-fraction must lie strictly"),
        (["--task", "lesion", "--abnormal-fraction", 1.5], "between 0 and 1"),
        (["--task", "nope"], "unknown --task 'nope' for --source synthetic: choose nuclei or"),
        (["--abnormal-fraction", 0.2], "--abnormal-fraction is an option of --task lesion"),
        (["--task", "lesion", "--channels", 3], "--task lesion makes grey images"),
        (["--task", "lesion", "--image-size", 16], "--image-size must be at least 32"),
        (["--task", "lesion", "--source", "folder", "--root", "."], "--task is an option of"),
    ],
)
def test_cli_refuses_bad_options_with_one_message(tmp_path, args, words):
    done = submit_cli("pack", *args, "--num-images", 10, "--out", tmp_path / "ds", check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()
