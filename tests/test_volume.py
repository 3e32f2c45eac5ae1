"""The NIfTI adapters (``brats``, ``decathlon``) on phantom trees written in the real layouts."""

import gzip
import json

import nibabel
import numpy as np
import pytest
import webdataset as wds
from conftest import submit_cli

from hpc_btunet.data import make_loader
from hpc_btunet.data import volume as volume_module
from hpc_btunet.data.codec import decode_array
from hpc_btunet.data.pack import SCRATCH_NAME, PackConfig, pack
from hpc_btunet.data.phantoms import affine, write_brats_tree, write_decathlon_tree
from hpc_btunet.data.splits import SplitConfig
from hpc_btunet.data.volume import BratsSource, DecathlonSource, SlicePolicy
from hpc_btunet.errors import DataError, UserError

SHAPE = (32, 32, 12)  # square slices of the packed size: no resize, pixel-exact checks


def _pack(source, out, image_size=32, folds=2, labelled=1.0, test=0.3, workers=1):
    cfg = PackConfig(
        out=out,
        image_size=image_size,
        shard_size=7,
        workers=workers,
        splits=SplitConfig(test, labelled, folds, 0),
    )
    return pack(source, cfg, log=lambda _: None)


def _samples(out, manifest):
    """key -> (image, mask, meta), read back with the stock WebDataset pipeline (PNG decoded as
    the loader does: 2- and 4-channel images stay as they are)."""
    urls = [str(out / s.name) for s in manifest.shards]
    found = {}
    for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        image, mask = (decode_array(s[f"{part}.png"], "png") for part in ("image", "mask"))
        found[s["__key__"]] = (image, mask, json.loads(s["json"]))
    return found


def _read(path):
    return np.asarray(nibabel.load(path).dataobj)


@pytest.fixture(scope="module")
def brats_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("brats") / "MICCAI_BraTS_2018_Data_Training"
    names = write_brats_tree(root, subjects=6, shape=SHAPE, healthy=1, seed=3)
    return root, names


def _seg(root, name):
    grade = "HGG" if "HGG" in name else "LGG"
    return _read(root / grade / name / f"{name}_seg.nii.gz")


def test_brats_2018_slices_masks_labels_and_groups(brats_tree, tmp_path):
    root, names = brats_tree
    m = _pack(BratsSource(root), tmp_path / "out")
    # --slices lesion: exactly the slices whose label map holds tumour, each subject's own group
    expected = {}
    for name in names:
        seg = _seg(root, name)
        for k in np.flatnonzero((seg > 0).any(axis=(0, 1))):
            expected[f"{name}_{k:03d}"] = seg[:, :, k]
    assert sorted(expected) == sorted(m.splits["train"] + m.splits["test"])
    assert m.groups == {key: key.rsplit("_", 1)[0] for key in expected}
    assert m.channels == 1 and m.source["kind"] == "brats" and m.source["modality"] == "flair"
    side = {}
    for split in ("train", "test"):
        for key in m.splits[split]:
            assert side.setdefault(m.groups[key], split) == split, "a subject straddles splits"
    fold_of = {}
    for i, fold in enumerate(m.folds):
        for key in fold:
            assert fold_of.setdefault(m.groups[key], i) == i, "a subject straddles folds"
    samples = _samples(tmp_path / "out", m)
    for key, (image, mask, meta) in samples.items():
        # the phantom's affine is LPS: in RAS+ axial display, slice k is the stored slice's transpose
        want = expected[key].T > 0
        assert np.array_equal(mask > 0, want)
        assert image.shape == (32, 32) and image.dtype == np.uint8
        assert meta["label"] == "abnormal" and meta["group"] == meta["subject"]
        assert meta["grade"] == ("HGG" if "HGG" in key else "LGG")
        assert meta["slice"] == int(key.rsplit("_", 1)[1])
    # the healthy subject gave no slice under the default policy
    assert not any(k.startswith(names[-1]) for k in samples)


def test_brats_normalisation_is_per_volume_percentile_clip(brats_tree, tmp_path):
    root, names = brats_tree
    m = _pack(BratsSource(root, modality="t1ce,flair", clip="1,99"), tmp_path / "out")
    assert m.channels == 2 and m.source["modality"] == "t1ce,flair"
    key = m.splits["train"][0]
    name, k = key.rsplit("_", 1)
    grade = "HGG" if "HGG" in name else "LGG"
    image = _samples(tmp_path / "out", m)[key][0]
    assert image.shape == (32, 32, 2)
    for c, mod in enumerate(("t1ce", "flair")):
        volume = _read(root / grade / name / f"{name}_{mod}.nii.gz").astype(np.float64)
        lo, hi = np.percentile(volume[volume != 0], [1, 99])
        want = np.rint((np.clip(volume[:, :, int(k)], lo, hi) - lo) / (hi - lo) * 255).T
        assert np.abs(image[..., c].astype(int) - want).max() <= 1


@pytest.mark.parametrize(
    "policy, per_subject",
    [
        ("lesion:1", lambda seg, img: (seg.any(axis=(0, 1)) | img.any(axis=(0, 1))).sum()),
        ("all", lambda seg, img: (seg.any(axis=(0, 1)) | img.any(axis=(0, 1))).sum()),
        ("3", lambda seg, img: min(3, seg.any(axis=(0, 1)).sum())),
    ],
)
def test_slice_policies(brats_tree, tmp_path, policy, per_subject):
    root, names = brats_tree
    m = _pack(BratsSource(root, slices=policy), tmp_path / "out")
    for name in names:
        grade = "HGG" if "HGG" in name else "LGG"
        img = _read(root / grade / name / f"{name}_flair.nii.gz")
        got = [k for k in m.groups if m.groups[k] == name]
        assert len(got) == per_subject(_seg(root, name) > 0, img != 0), name


def test_lesion_fraction_draws_the_stated_share_of_tumour_free_slices():
    target = np.zeros(40, bool)
    target[10:20] = True
    content = np.ones(40, bool)
    chosen = SlicePolicy.parse("lesion:0.25").choose(target, content, np.random.default_rng(0))
    assert set(range(10, 20)) <= set(chosen) and len(chosen) == 10 + round(0.25 * 30)
    again = SlicePolicy.parse("lesion:0.25").choose(target, content, np.random.default_rng(0))
    assert np.array_equal(chosen, again)
    evenly = SlicePolicy.parse("4").choose(target, content, np.random.default_rng(0))
    assert list(evenly) == [10, 13, 16, 19]


@pytest.mark.parametrize("target, values", [("tc", (1, 4)), ("et", (4,)), ("2", (2,))])
def test_brats_targets(brats_tree, tmp_path, target, values):
    root, names = brats_tree
    m = _pack(BratsSource(root, target=target, slices="all"), tmp_path / "out")
    samples = _samples(tmp_path / "out", m)
    seen_target = False
    for key, (_, mask, meta) in samples.items():
        name, k = key.rsplit("_", 1)
        want = np.isin(_seg(root, name)[:, :, int(k)], values).T
        assert np.array_equal(mask > 0, want), key
        assert meta["label"] == ("abnormal" if want.any() else "normal")
        assert m.labels[key] == meta["label"]
        seen_target |= bool(want.any())
    assert seen_target and set(m.labels) == set(samples)


def test_brats_flat_layout_pad_and_resize(tmp_path):
    root = tmp_path / "BraTS2021"
    names = write_brats_tree(root, subjects=4, shape=(40, 24, 10), layout="flat", seed=1)
    m = _pack(BratsSource(root, resize="pad", slices="2"), tmp_path / "out", image_size=16)
    assert set(m.groups.values()) == set(names)
    for image, mask, meta in _samples(tmp_path / "out", m).values():
        assert image.shape == (16, 16) and mask.shape == (16, 16)
        # RAS+ axial slice of a 40 (x) by 24 (y) grid: 24 rows, 40 columns, padded to 40 x 40
        assert meta["size"] == [24, 40] and meta["pad"] == [8, 8, 0, 0]
        assert "grade" not in meta


def test_each_volume_is_decoded_once_and_a_rerun_reuses_the_spill(
    brats_tree, tmp_path, monkeypatch
):
    root, names = brats_tree
    decoded = []
    real = nibabel.as_closest_canonical

    def counting(img, *a, **kw):
        decoded.append(img.get_filename())
        return real(img, *a, **kw)

    monkeypatch.setattr(nibabel, "as_closest_canonical", counting)
    source = BratsSource(root, modality="flair,t2")
    source.prepare(tmp_path / "out" / SCRATCH_NAME, workers=2)  # as a killed pack leaves it
    assert sorted(decoded) == sorted(str(f) for s in source.subjects() for f in s.files()), (
        "every file decoded exactly once"
    )
    decoded.clear()
    m = _pack(BratsSource(root, modality="flair,t2"), tmp_path / "out", workers=2)
    assert decoded == [] and m.channels == 2
    assert not (tmp_path / "out" / SCRATCH_NAME).exists()
    # another option decodes again
    m = _pack(BratsSource(root, modality="flair"), tmp_path / "out2")
    assert len(decoded) == 2 * len(names)


def test_packing_with_two_workers_is_identical(brats_tree, tmp_path):
    root, _ = brats_tree
    one = _pack(BratsSource(root, slices="lesion:0.5"), tmp_path / "a", workers=1)
    two = _pack(BratsSource(root, slices="lesion:0.5"), tmp_path / "b", workers=2)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]


def test_the_loader_reads_multi_channel_volume_shards(brats_tree, tmp_path):
    root, _ = brats_tree
    m = _pack(BratsSource(root, modality="flair,t1,t1ce,t2"), tmp_path / "out")
    assert m.channels == 4
    batch = next(iter(make_loader(tmp_path / "out", "train", batch_size=4, num_workers=1)))
    assert tuple(batch["image"].shape) == (4, 4, 32, 32)


# --- decathlon -------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_decathlon_channels_targets_and_cases(tmp_path, per_channel):
    root = tmp_path / "Task01_BrainTumour"
    names = write_decathlon_tree(root, cases=5, shape=SHAPE, per_channel_files=per_channel)
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0" * 10)  # macOS litter in the tars
    source = DecathlonSource(root, modality="t2w,0", target="enhancing tumour", slices="all")
    m = _pack(source, tmp_path / "out")
    assert m.channels == 2 and m.source["modality"] == "T2w,FLAIR"
    assert m.source["target_values"] == [3]
    assert set(m.groups.values()) == set(names)
    samples = _samples(tmp_path / "out", m)
    for key, (image, mask, _) in samples.items():
        name, k = key.rsplit("_", 1)
        seg = _read(root / "labelsTr" / f"{name}.nii.gz")
        assert np.array_equal(mask > 0, (seg[:, :, int(k)] == 3).T)
        assert image.shape == (32, 32, 2)
    default = _pack(DecathlonSource(root), tmp_path / "out2")
    assert default.channels == 4 and default.source["target_values"] is None


# --- bad input ------------------------------------------------------------------------------------


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _fails(source, out, *fragments):
    with pytest.raises((DataError, UserError)) as e:
        _pack(source, out)
    for fragment in fragments:
        assert fragment in str(e.value), str(e.value)
    assert not out.exists(), "nothing may be written when the input is refused"
    return str(e.value)


def test_truncated_gzip_is_named_before_decoding(brats_tree, tmp_path, monkeypatch):
    root = _copy_tree(brats_tree[0], tmp_path / "tree")
    name = brats_tree[1][0]
    victim = root / "HGG" / name / f"{name}_flair.nii.gz"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    monkeypatch.setattr(volume_module, "spill_subject", None)  # must not get that far
    _fails(BratsSource(root), tmp_path / "out", f"HGG/{name}/{name}_flair.nii.gz", "truncated")


def test_corrupt_stream_is_named_after_decoding_and_nothing_is_left(brats_tree, tmp_path):
    root = _copy_tree(brats_tree[0], tmp_path / "tree")
    name = brats_tree[1][1]
    victim = root / "LGG" / name / f"{name}_seg.nii.gz"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 64] = bytes(64)  # damage inside the stream, trailer intact
    victim.write_bytes(bytes(raw))
    _fails(BratsSource(root), tmp_path / "out", f"LGG/{name}/{name}_seg.nii.gz", "unreadable")


def test_missing_modality_grid_mismatch_and_bad_labels_are_named_together(brats_tree, tmp_path):
    root = _copy_tree(brats_tree[0], tmp_path / "tree")
    a, b, c = brats_tree[1][:3]
    (root / "HGG" / a / f"{a}_flair.nii.gz").unlink()
    seg = _seg(root, b)
    nibabel.save(
        nibabel.Nifti1Image(seg[:, :, :-1], affine(SHAPE)), root / "LGG" / b / f"{b}_seg.nii.gz"
    )
    text = _fails(
        BratsSource(root),
        tmp_path / "out",
        f"HGG/{a}/: no {a}_flair.nii.gz",
        "subject missing a modality",
        f"LGG/{b}/{b}_seg.nii.gz",
        "label grid",
        "(2 problem(s))",
    )
    assert "32x32x11" in text
    (root / "HGG" / a).rename(tmp_path / "removed")
    # a grid that differs by its affine only, and label values BraTS does not have
    nibabel.save(nibabel.Nifti1Image(seg, affine(SHAPE) * 2), root / "LGG" / b / f"{b}_seg.nii.gz")
    weird = _seg(root, c).copy()
    weird[0, 0, 0] = 7
    nibabel.save(nibabel.Nifti1Image(weird, affine(SHAPE)), root / "HGG" / c / f"{c}_seg.nii.gz")
    text = _fails(BratsSource(root), tmp_path / "out", "affine differs", f"{b}_seg.nii.gz")
    nibabel.save(nibabel.Nifti1Image(seg, affine(SHAPE)), root / "LGG" / b / f"{b}_seg.nii.gz")
    _fails(BratsSource(root), tmp_path / "out", f"HGG/{c}/{c}_seg.nii.gz", "values [7]")


def test_wrong_source_and_empty_tree(brats_tree, tmp_path):
    dec = tmp_path / "Task01"
    write_decathlon_tree(dec, cases=2, shape=SHAPE)
    _fails(
        BratsSource(dec), tmp_path / "out", "does not hold the brats layout", "--source decathlon"
    )
    _fails(DecathlonSource(brats_tree[0]), tmp_path / "out", "dataset.json", "--source brats")
    (tmp_path / "empty").mkdir()
    _fails(BratsSource(tmp_path / "empty"), tmp_path / "out", "an empty folder")


def test_decathlon_partial_download_and_bad_json(tmp_path):
    root = tmp_path / "Task"
    write_decathlon_tree(root, cases=3, shape=SHAPE)
    (root / "imagesTr" / "BRATS_002.nii.gz").unlink()
    (root / "labelsTr" / "BRATS_003.nii.gz").unlink()
    _fails(
        DecathlonSource(root),
        tmp_path / "out",
        "labelsTr/BRATS_002.nii.gz: no imagesTr/BRATS_002",
        "listed in dataset.json but absent",
        "labelsTr/BRATS_003.nii.gz",
    )
    (root / "dataset.json").write_text("{not json")
    _fails(DecathlonSource(root), tmp_path / "out", "dataset.json is not readable JSON")


@pytest.mark.parametrize(
    "options, fragment",
    [
        ({"slices": "half"}, "--slices 'half' is not a slice policy"),
        ({"slices": "lesion:2"}, "--slices 'lesion:2'"),
        ({"clip": "99,1"}, "--clip"),
        ({"modality": "pd"}, "--modality 'pd'"),
        ({"target": "xx"}, "--target 'xx'"),
        ({"target": "0"}, "other than 0"),
        ({"target": "9"}, "no label 9; its labels are 1, 2, 3, 4"),
        ({"channels": 3}, "--channels 3 does not match --modality flair"),
    ],
)
def test_bad_options(brats_tree, tmp_path, options, fragment):
    with pytest.raises(UserError, match=None) as e:
        _pack(BratsSource(brats_tree[0], **options), tmp_path / "out")
    assert fragment in str(e.value)
    assert not (tmp_path / "out").exists()


def test_decathlon_with_more_than_four_channels_asks_for_a_choice(tmp_path):
    root = tmp_path / "Task"
    write_decathlon_tree(root, cases=2, shape=SHAPE, modalities=("a", "b", "c", "d", "e"))
    _fails(DecathlonSource(root), tmp_path / "out", "at most 4", "--modality a")


def test_non_finite_voxels_are_named(tmp_path):
    root = tmp_path / "Task"
    write_decathlon_tree(root, cases=2, shape=SHAPE, modalities=("CT",))
    path = root / "imagesTr" / "BRATS_001.nii.gz"
    data = _read(path).astype(np.float32)
    data[1, 1, 1] = np.nan
    nibabel.save(nibabel.Nifti1Image(data, affine(SHAPE)), path)
    _fails(DecathlonSource(root), tmp_path / "out", "imagesTr/BRATS_001.nii.gz", "NaN")


def test_cli_packs_brats_and_refuses_a_bad_tree_without_traceback(brats_tree, tmp_path):
    root = brats_tree[0]
    out = tmp_path / "out"
    done = submit_cli("pack", "--source", "brats", "--root", root, "--out", out, "--image-size",
                      "32", "--slices", "2", "--labelled-fraction", "1", "--folds", "2")  # fmt: skip
    assert "packed" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["slices"] == "2"
    bad = _copy_tree(root, tmp_path / "bad")
    name = brats_tree[1][0]
    victim = bad / "HGG" / name / f"{name}_seg.nii.gz"
    with gzip.open(victim, "rb") as f:
        head = f.read(1000)
    victim.write_bytes(gzip.compress(head))  # a whole gzip file of a cut NIfTI
    done = submit_cli("pack", "--source", "brats", "--root", bad, "--out", tmp_path / "o2",
                      check=False)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"{name}_seg.nii.gz" in done.stderr
    assert not (tmp_path / "o2").exists()


def test_a_whole_gzip_of_several_members_is_accepted(brats_tree, tmp_path):
    root = _copy_tree(brats_tree[0], tmp_path / "tree")
    name = brats_tree[1][0]
    path = root / "HGG" / name / f"{name}_flair.nii.gz"
    raw = gzip.decompress(path.read_bytes())
    half = len(raw) // 2
    path.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))  # as pigz may write
    m = _pack(BratsSource(root), tmp_path / "out")
    assert any(m.groups[k] == name for k in m.groups)


def test_case_names_outside_the_key_alphabet_become_keys_and_stay_groups(tmp_path):
    root = tmp_path / "Task"
    write_decathlon_tree(root, cases=3, shape=SHAPE)
    for part in ("imagesTr", "labelsTr"):
        (root / part / "BRATS_001.nii.gz").rename(root / part / "BRATS 001.v2.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][0] = {"image": "./imagesTr/BRATS 001.v2.nii.gz",
                           "label": "./labelsTr/BRATS 001.v2.nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    m = _pack(DecathlonSource(root), tmp_path / "out", folds=2, test=0.3)
    keys = [k for k, g in m.groups.items() if g == "BRATS 001.v2"]
    assert keys and all(k.startswith("BRATS_001_v2_") for k in keys)
    samples = _samples(tmp_path / "out", m)
    assert {samples[k][2]["subject"] for k in keys} == {"BRATS 001.v2"}
