"""The stock webdataset pipeline (hpc_btunet.data.wds): the keys of a split, the labelled subset
or a fold's part; the images and masks the toolkit's loader yields for them; a damaged sample
named; one message per bad input; a DataLoader with workers; no torch until it is built."""

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from hpc_btunet.data import make_loader, webdataset_pipeline
from hpc_btunet.data.manifest import load_manifest
from hpc_btunet.errors import ShardError, UserError


@pytest.fixture(scope="module", params=[("png", 1), ("npy", 3)], ids=["png-grey", "npy-rgb"])
def packed(request, tmp_path_factory):
    """A dataset of 60 samples in shards of 8, a few packed without masks."""
    from conftest import ToySource

    from hpc_btunet.data.pack import PackConfig, pack
    from hpc_btunet.data.splits import SplitConfig

    encoding, channels = request.param
    out = tmp_path_factory.mktemp("wds") / encoding
    source = ToySource(n=60, channels=channels, unlabelled={"toy-0003", "toy-0040"})
    cfg = PackConfig(
        out=out, image_size=16, shard_size=8, encoding=encoding, splits=SplitConfig(folds=3)
    )
    return out, pack(source, cfg, log=lambda _: None)


def loader_samples(data, split, keys):
    """Image (C x H x W) and mask (H x W, or None) of each key, as the toolkit's loader reads them."""
    m = load_manifest(data)
    unlabelled = set(m.unlabelled) & set(keys or m.splits[split])
    samples = {}
    loader = make_loader(
        data,
        split,
        keys=keys,
        batch_size=4,
        shuffle=False,
        drop_last=False,
        with_masks=not unlabelled,
    )
    for batch in loader:
        for i, key in enumerate(batch["key"]):
            mask = batch["mask"][i, 0].numpy() if "mask" in batch else None
            samples[key] = (batch["image"][i].numpy(), mask)
    return samples


SELECTIONS = {
    "train split": dict(split="train"),
    "test split": dict(split="test"),
    "labelled subset": dict(labelled=True),
    "fold 1 train": dict(fold=1),
    "fold 2 val": dict(fold=2, part="val"),
}


def expected_keys(m, split="train", fold=None, part="train", labelled=False):
    if fold is not None:
        return m.fold_keys(fold)[0 if part == "train" else 1]
    return m.labelled if labelled else m.splits[split]


@pytest.mark.parametrize("selection", SELECTIONS)
def test_keys_images_and_masks_are_the_loaders(packed, selection):
    data, m = packed
    options = SELECTIONS[selection]
    samples = list(webdataset_pipeline(data, **options))
    keys = [s["key"] for s in samples]
    expected = expected_keys(m, **options)
    assert sorted(keys) == sorted(expected) and len(keys) == len(expected)
    whole = selection.endswith("split")
    reference = loader_samples(data, options.get("split", "train"), None if whole else expected)
    for s in samples:
        image, mask = reference[s["key"]]
        assert s["image"].dtype == np.uint8 and s["image"].shape == (16, 16, m.channels)
        assert s["image"].flags.writeable  # torch.as_tensor warns about read-only arrays
        np.testing.assert_array_equal(s["image"].transpose(2, 0, 1), image)
        if s["key"] in m.unlabelled:
            assert s["mask"] is None
        else:
            assert s["mask"].dtype == np.uint8 and set(np.unique(s["mask"])) <= {0, 1}
            if mask is not None:
                np.testing.assert_array_equal(s["mask"], mask)
        assert s["label"] is None


def test_shuffle_is_seeded_and_keeps_the_keys(packed):
    data, m = packed
    first = [s["key"] for s in webdataset_pipeline(data, shuffle=16, seed=3)]
    again = [s["key"] for s in webdataset_pipeline(data, shuffle=16, seed=3)]
    other = [s["key"] for s in webdataset_pipeline(data, shuffle=16, seed=4)]
    assert first == again and sorted(first) == sorted(m.splits["train"])
    assert first != other and first != [s["key"] for s in webdataset_pipeline(data)]


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_a_flipped_byte_is_caught_naming_the_shard_and_key(toy_pack, encoding):
    from conftest import flip_sample_byte

    data, m = toy_pack(n=40, shard_size=8, encoding=encoding, folds=3)
    _, val = m.fold_keys(0)
    key = val[-1]
    shard = next(s for s in m.shards if key in s.keys)
    flip_sample_byte(data, m, key)
    with pytest.raises(ShardError, match="fails its checksum") as err:
        list(webdataset_pipeline(data, fold=0, part="val"))
    assert f"{key!r}" in str(err.value) and shard.name in str(err.value)
    # what is checked is what is selected: another fold reads through the same shard
    other = m.fold_keys(1)[1]
    assert sorted(s["key"] for s in webdataset_pipeline(data, fold=1, part="val")) == other


def test_bad_inputs_give_one_clear_message_each(packed, toy_pack, tmp_path):
    data, _ = packed
    cases = [
        (dict(data=tmp_path / "nothing"), "no packed dataset"),
        (dict(split="validation"), "unknown split 'validation': choose one of train, test"),
        (dict(fold=3), "fold 3 is out of range: this dataset has 3 folds"),
        (dict(fold=-1), "fold -1 is out of range"),
        (dict(fold=0, part="test"), "part must be one of train, val"),
        (dict(part="val"), "part='val' is a fold's part: give fold"),
        (dict(split="test", fold=0), "fold 0 is part of the train split"),
        (dict(split="test", labelled=True), "the labelled subset is part of the train split"),
        (dict(shuffle=-1), "shuffle is a buffer of samples"),
    ]
    for options, message in cases:
        options = {"data": data} | options
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            webdataset_pipeline(**options)
    unlabelled, _ = toy_pack(
        n=20, name="unlabelled", unlabelled={f"toy-{i:04d}" for i in range(20)}
    )
    for options in (dict(fold=0), dict(labelled=True)):
        with pytest.raises(UserError, match="no labelled subset or folds"):
            webdataset_pipeline(unlabelled, **options)
    assert all(s["mask"] is None for s in webdataset_pipeline(unlabelled))


def test_a_missing_or_truncated_shard_fails_when_built(toy_pack):
    data, m = toy_pack(n=40, shard_size=8)
    first, second = m.shards_of("train")[:2]
    (data / first.name).unlink()
    with open(data / second.name, "r+b") as f:
        f.truncate(second.bytes - 512)
    with pytest.raises(ShardError) as err:
        webdataset_pipeline(data)
    assert f"{first.name}: missing" in str(err.value) and second.name in str(err.value)


def test_in_a_dataloader_with_two_workers_every_sample_comes_once(packed):
    data, m = packed
    pipeline = webdataset_pipeline(data, shuffle=8)
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2)
    reference = loader_samples(data, "train", None)
    keys = []
    for s in loader:  # webdataset's split_by_worker: each worker reads whole shards of its own
        keys.append(s["key"])
        np.testing.assert_array_equal(
            np.asarray(s["image"]).transpose(2, 0, 1), reference[s["key"]][0]
        )
    assert sorted(keys) == sorted(m.splits["train"]) and len(keys) == len(m.splits["train"])
    # its stages pickle, for DataLoaders that spawn their workers
    copy = pickle.loads(pickle.dumps(webdataset_pipeline(data, fold=0, part="val")))
    assert sorted(s["key"] for s in copy) == m.fold_keys(0)[1]


def test_importing_it_imports_neither_torch_nor_webdataset():
    code = (
        "import sys, hpc_btunet.data, hpc_btunet.data.wds, hpc_btunet.data.pack\n"
        "assert callable(hpc_btunet.data.webdataset_pipeline)\n"
        "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
