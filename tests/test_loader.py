import tarfile

import numpy as np
import pytest
import torch
from conftest import toy_index

from hpc_btunet.data.codec import decode_array
from hpc_btunet.data.loader import ShardStream, make_loader, plan_epoch
from hpc_btunet.data.manifest import ShardInfo
from hpc_btunet.errors import ShardError, UserError


def fake_shards(counts):
    return [
        ShardInfo(
            f"train-{i:06d}.tar",
            "train",
            c,
            0,
            "",
            [f"s{i}-{j}" for j in range(c)],
            [0] * c,
            [0] * c,
        )
        for i, c in enumerate(counts)
    ]


def keys_of(shards, refs):
    return [shards[r.shard].keys[r.pos] for r in refs]


def tagged(shards, refs):
    return [(shards[r.shard].keys[r.pos], r.pad) for r in refs]


def global_order(plan):
    return list(zip(plan.shard.tolist(), plan.pos.tolist(), plan.pad.tolist(), strict=True))


@pytest.mark.parametrize("counts", [[10], [7, 7], [5, 3, 9], [1, 1, 1, 1, 20]])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_plan_gives_every_rank_the_same_count(counts, world_size, drop_last):
    shards, batch = fake_shards(counts), 2
    n = sum(counts)
    plan = plan_epoch(
        shards, None, batch_size=batch, world_size=world_size, seed=0, epoch=3, drop_last=drop_last
    )
    per_step = world_size * batch
    steps = n // per_step if drop_last else -(-n // per_step)
    assert plan.steps == steps and plan.global_batch == per_step
    refs = [plan.rank_refs(r) for r in range(world_size)]
    assert [len(p) for p in refs] == [steps * batch] * world_size
    flat = [k for p in refs for k in keys_of(shards, p)]
    real = [k for p in refs for r, k in zip(p, keys_of(shards, p), strict=True) if not r.pad]
    assert len(real) == len(set(real)), "no sample twice in an epoch, apart from padding"
    if drop_last:
        assert len(real) == len(flat) == steps * per_step
    else:
        assert sorted(real) == sorted(k for s in shards for k in s.keys), "every sample seen once"


def test_plan_is_deterministic_per_seed_and_epoch_and_changes_across_epochs():
    shards = fake_shards([6, 6, 6])
    kw = dict(batch_size=2, world_size=2, seed=1)
    a = plan_epoch(shards, None, epoch=0, **kw)
    assert a.rank_refs(1) == plan_epoch(shards, None, epoch=0, **kw).rank_refs(1)
    assert global_order(a) == global_order(plan_epoch(shards, None, epoch=0, **kw))
    assert global_order(a) != global_order(plan_epoch(shards, None, epoch=1, **kw))
    assert global_order(a) != global_order(
        plan_epoch(shards, None, epoch=0, batch_size=2, world_size=2, seed=2)
    )


def test_plan_restricted_to_keys_and_errors():
    shards = fake_shards([5, 5])
    keys = {"s0-1", "s1-2", "s1-4", "s0-0"}
    plan = plan_epoch(shards, keys, batch_size=2, world_size=2, seed=0, epoch=0)
    assert sorted(k for r in range(2) for k in keys_of(shards, plan.rank_refs(r))) == sorted(keys)
    with pytest.raises(UserError, match="fewer than one global batch"):
        plan_epoch(shards, keys, batch_size=4, world_size=2, seed=0, epoch=0)
    with pytest.raises(UserError, match="no samples selected"):
        plan_epoch(shards, set(), batch_size=1, world_size=1, seed=0, epoch=0)
    with pytest.raises(ValueError, match="outside world size"):
        plan.rank_refs(2)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("window", [0, 5, 256])
def test_global_batches_do_not_depend_on_the_world_size(shuffle, drop_last, window):
    """For a global batch of 8, 1 x 8, 2 x 4 and 4 x 2 ranks x batch read the same samples at
    every step, in the same order once the ranks' slices are concatenated by rank."""
    shards = fake_shards([13, 7, 30, 1])  # 51 samples: 6 global batches and 3 left over

    def by_step(world_size):
        batch = 8 // world_size
        plan = plan_epoch(
            shards,
            None,
            batch_size=batch,
            world_size=world_size,
            seed=4,
            epoch=2,
            shuffle=shuffle,
            drop_last=drop_last,
            shuffle_window=window,
        )
        refs = [tagged(shards, plan.rank_refs(r)) for r in range(world_size)]
        steps = [
            [x for rank in refs for x in rank[s * batch : (s + 1) * batch]]
            for s in range(plan.steps)
        ]
        assert sum(steps, []) == [(shards[a].keys[b], pad) for a, b, pad in global_order(plan)]
        return steps

    one = by_step(1)
    assert len(one) == (6 if drop_last else 7)
    assert any(pad for _, pad in one[-1]) == (not drop_last)
    assert by_step(2) == one and by_step(4) == one


def test_window_shuffle_moves_samples_at_most_a_window():
    shards, window = fake_shards([40, 25, 60]), 8
    kw = dict(batch_size=1, world_size=1, seed=5, drop_last=False)

    def order(epoch, w):
        plan = plan_epoch(shards, None, epoch=epoch, shuffle_window=w, **kw)
        return keys_of(shards, plan.rank_refs(0))

    for epoch in range(3):
        unmixed, mixed = order(epoch, 0), order(epoch, window)
        assert order(epoch, 1) == unmixed, "a window of 1 does not mix"
        assert sorted(mixed) == sorted(unmixed) and mixed != unmixed
        moves = np.array([mixed.index(k) - i for i, k in enumerate(unmixed)])
        assert np.abs(moves).max() <= window, "no sample moves farther than the window"
        assert np.abs(moves).mean() > window / 8, "samples do move (about window / 4 on average)"
        assert mixed == order(epoch, window), "deterministic per (seed, epoch)"
    assert order(0, window) != order(1, window)
    ordered = plan_epoch(shards, None, epoch=0, shuffle=False, shuffle_window=window, **kw)
    assert keys_of(shards, ordered.rank_refs(0)) == [k for s in shards for k in s.keys]


def test_stream_yields_decoded_batches(toy_pack):
    out, m = toy_pack(n=60, shard_size=10)
    stream = ShardStream(out, "train", batch_size=4, seed=0)
    batches = list(stream)
    assert len(batches) == len(stream) == 42 // 4
    for b in batches:
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (4, 1, 16, 16)
        assert b["mask"].dtype == torch.uint8 and b["mask"].shape == (4, 1, 16, 16)
        assert set(b["mask"].unique().tolist()) <= {0, 1}
        for key, image, mask in zip(b["key"], b["image"], b["mask"], strict=True):
            assert (image[mask > 0] == toy_index(key) % 256).all()
            assert (image[mask == 0] == 0).all()
    assert not any(b["pad"].any() for b in batches)


@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_rgb_and_npy(toy_pack, encoding):
    out, m = toy_pack(n=40, channels=3, encoding=encoding)
    b = next(iter(ShardStream(out, "test", batch_size=3)))
    assert b["image"].shape == (3, 3, 16, 16)
    key = toy_index(b["key"][0])
    fg = b["mask"][0, 0] > 0
    assert (b["image"][0, 1][fg] == 255 - key % 256).all()


def test_fold_keys_and_unpadded_evaluation(toy_pack):
    out, m = toy_pack(n=100)
    train_keys, val_keys = m.fold_keys(2)
    assert set(train_keys).isdisjoint(val_keys) and set(train_keys) | set(val_keys) == set(
        m.labelled
    )
    seen = []
    for rank in range(2):
        for b in ShardStream(
            out,
            "train",
            keys=val_keys,
            batch_size=3,
            rank=rank,
            world_size=2,
            shuffle=False,
            drop_last=False,
        ):
            seen += [k for k, p in zip(b["key"], b["pad"].tolist(), strict=True) if not p]
    assert sorted(seen) == sorted(val_keys)
    with pytest.raises(UserError, match="out of range"):
        m.fold_keys(5)


def epoch_batches(loader, epoch, start=0):
    loader.dataset.set_epoch(epoch, start=start)
    return [(b["key"], b["pad"].tolist()) for b in loader]


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("drop_last", [True, False])
def test_order_does_not_depend_on_the_number_of_workers(toy_pack, drop_last):
    out, _ = toy_pack(n=60, shard_size=7)  # 42 train samples in 6 shards
    orders = {}
    for workers in (0, 1, 2, 3):
        loader = make_loader(
            out, "train", batch_size=4, num_workers=workers, seed=3, drop_last=drop_last
        )
        orders[workers] = epoch_batches(loader, 2)
        assert len(loader) == len(orders[workers]) == (10 if drop_last else 11)
    assert orders[1] == orders[0] and orders[2] == orders[0] and orders[3] == orders[0]
    stream = loader.dataset
    plan = plan_epoch(
        stream.shards, None, batch_size=4, world_size=1, seed=3, epoch=2, drop_last=drop_last
    )
    assert sum((keys for keys, _ in orders[0]), []) == keys_of(stream.shards, plan.rank_refs(0))
    assert epoch_batches(loader, 2) == orders[0], "same (seed, epoch) gives the same order"
    assert epoch_batches(loader, 3) != orders[0]


def test_many_small_shards_read_in_plan_order(toy_pack):
    out, _ = toy_pack(n=60, shard_size=2)  # 21 train shards: more than a worker keeps open
    stream = ShardStream(out, "train", batch_size=4, seed=2, drop_last=False, shuffle_window=6)
    stream.set_epoch(1)
    plan = plan_epoch(
        stream.shards,
        None,
        batch_size=4,
        world_size=1,
        seed=2,
        epoch=1,
        drop_last=False,
        shuffle_window=6,
    )
    assert [(k, p) for b in stream for k, p in zip(b["key"], b["pad"].tolist(), strict=True)] == (
        tagged(stream.shards, plan.rank_refs(0))
    )


def test_persistent_workers_follow_set_epoch(toy_pack):
    """Workers live across epochs (one start-up per loader): each epoch, and a start inside
    one, is the order that a loader without workers gives, also when an epoch was left early."""
    out, _ = toy_pack(n=60, shard_size=7)
    plain = make_loader(out, "train", batch_size=4, num_workers=0, seed=3)
    loader = make_loader(out, "train", batch_size=4, num_workers=2, seed=3)
    assert loader.persistent_workers
    for epoch, start in ((0, 0), (1, 0), (1, 3), (2, 0), (0, 5)):
        assert epoch_batches(loader, epoch, start) == epoch_batches(plain, epoch, start)
        loader.dataset.set_epoch(epoch + 7)
        next(iter(loader))  # an epoch left after one batch
    workers = loader._iterator._workers
    assert epoch_batches(loader, 4) == epoch_batches(plain, 4)
    assert loader._iterator._workers == workers, "the same worker processes throughout"


@pytest.mark.parametrize("workers", [0, 2])
def test_set_epoch_start_skips_batches_without_reading_them(toy_pack, workers):
    out, m = toy_pack(n=60, shard_size=7, encoding="npy")
    loader = make_loader(out, "train", batch_size=3, num_workers=workers, seed=1)
    full = epoch_batches(loader, 4)
    for start in (0, 1, 5, len(full) - 1, len(full)):
        assert epoch_batches(loader, 4, start) == full[start:]
        assert len(loader) == len(full) == 14, "len stays the whole epoch"
    assert epoch_batches(loader, 4) == full, "start=0 is the default again"
    for bad in (-1, len(full) + 1):
        with pytest.raises(UserError, match="an epoch has 14 batches"):
            loader.dataset.set_epoch(4, start=bad)
    # damage one sample of the first batch: a job that starts at batch 1 never reads it
    damaged = full[0][0][1]
    shard = next(s for s in m.shards_of("train") if damaged in s.keys)
    _flip_byte(out / shard.name, f"{damaged}.image.npy")
    assert epoch_batches(loader, 4, 1) == full[1:]
    with pytest.raises(ShardError, match="checksum"):
        epoch_batches(loader, 4, 0)


def test_unlabelled_samples_load_without_masks(toy_pack):
    unl = {f"toy-{i:04d}" for i in range(0, 100, 4)}
    out, m = toy_pack(n=100, unlabelled=unl)
    batches = list(ShardStream(out, "train", batch_size=5))
    assert "mask" not in batches[0]
    assert sum(len(b["key"]) for b in batches) == 70
    with pytest.raises(UserError, match="without masks"):
        ShardStream(out, "train", batch_size=5, with_masks=True)
    b = next(iter(ShardStream(out, "train", keys=m.labelled, batch_size=2)))
    assert "mask" in b


def test_truncated_shard_is_named(toy_pack):
    out, m = toy_pack(n=60, shard_size=10)
    path = out / m.shards[1].name
    path.write_bytes(path.read_bytes()[:2500])
    with pytest.raises(ShardError, match=m.shards[1].name):
        ShardStream(out, "train", batch_size=2)


def test_corrupt_shard_is_named_never_skipped(toy_pack):
    out, m = toy_pack(n=60, shard_size=10)
    shard = m.shards[0]
    path = out / shard.name
    data = bytearray(path.read_bytes())
    start = shard.offsets[3]
    data[start : start + 512] = b"\0" * 512  # wipe one member header: the tar stream ends early
    path.write_bytes(bytes(data))
    stream = ShardStream(out, "train", batch_size=2, shuffle=False)  # sizes still match
    with pytest.raises(ShardError, match=shard.name):
        list(stream)
    with pytest.raises(ShardError, match="sha256"):
        ShardStream(out, "train", batch_size=2, verify=True)


def _flip_byte(path, member_name):
    """Flip one byte in the middle of a member's payload (headers intact, size unchanged);
    returns the payload as it now reads."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member_name)
    data = bytearray(path.read_bytes())
    data[info.offset_data + info.size // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data[info.offset_data : info.offset_data + info.size])


@pytest.mark.parametrize("member", ["image", "mask", "json"])
@pytest.mark.parametrize("encoding", ["png", "npy"])
def test_flipped_payload_byte_fails_the_sample_checksum(toy_pack, encoding, member):
    out, m = toy_pack(n=60, shard_size=10, encoding=encoding)
    shard = m.shards[0]
    key = shard.keys[3]
    name = f"{key}.{member}.{encoding}" if member != "json" else f"{key}.json"
    payload = _flip_byte(out / shard.name, name)
    if member == "image" and encoding == "npy":
        decode_array(payload, encoding)  # the flipped pixel decodes: only the checksum sees it
    stream = ShardStream(out, "train", batch_size=1, shuffle=False)  # sizes still match
    seen = []
    with pytest.raises(ShardError) as err:
        for batch in stream:
            seen += batch["key"]
    assert seen == shard.keys[:3], "samples before the damage are read, the damaged one is not"
    message = str(err.value)
    assert shard.name in message and repr(key) in message and "checksum" in message
    assert "hpc-btunet verify" in message and "repack" in message


def test_checksum_failure_in_a_worker_stops_the_loader(toy_pack):
    out, m = toy_pack(n=60, shard_size=10, encoding="npy")
    shard = m.shards_of("train")[2]
    _flip_byte(out / shard.name, f"{shard.keys[0]}.image.npy")
    loader = make_loader(out, "train", batch_size=2, num_workers=2, drop_last=False)
    with pytest.raises(ShardError, match=shard.name):
        list(loader)


def test_missing_dataset_message(tmp_path):
    with pytest.raises(UserError, match="pack"):
        ShardStream(tmp_path / "nothing", batch_size=2)


def test_bad_keys_and_arguments(toy_pack):
    out, _ = toy_pack()
    with pytest.raises(UserError, match="not in the train split"):
        ShardStream(out, "train", batch_size=2, keys=["nope"])
    with pytest.raises(UserError, match="rank"):
        ShardStream(out, "train", batch_size=2, rank=2, world_size=2)
    with pytest.raises(UserError, match="unknown split"):
        ShardStream(out, "val", batch_size=2)


def test_window_shuffle_mixes_what_the_stream_reads(toy_pack):
    out, _ = toy_pack(n=60, shard_size=100)
    ordered = [k for b in ShardStream(out, batch_size=2, shuffle=False) for k in b["key"]]
    shuffled = [k for b in ShardStream(out, batch_size=2, shuffle_window=16) for k in b["key"]]
    assert sorted(ordered) == sorted(shuffled) and ordered != shuffled
    with pytest.raises(UserError, match="shuffle_window"):
        ShardStream(out, batch_size=2, shuffle_window=-1)
