"""Two ranks (processes, gloo) read the same packed dataset: equal batch counts, no hang."""

import pytest
import torch
import torch.distributed as dist
from multiproc import run_ranks

from hpc_btunet.data.loader import ShardStream, make_loader


def _epoch(rank, world_size, root, batch_size, num_workers, drop_last):
    loader = make_loader(
        root,
        "train",
        batch_size=batch_size,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        seed=11,
        drop_last=drop_last,
    )
    loader.dataset.set_epoch(1)
    keys, pads, batches = [], [], 0
    for batch in loader:
        # a collective per batch: if one rank had fewer batches, the other would block here
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == world_size
        keys += batch["key"]
        pads += batch["pad"].tolist()
        batches += 1
    return batches, len(loader), keys, pads


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_shards", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_two_ranks_equal_batches_every_sample_once(toy_pack, num_shards, drop_last):
    # 42 train samples; shard size chosen to give 1, 2 or 3 shards
    out, m = toy_pack(n=60, shard_size={1: 100, 2: 21, 3: 14}[num_shards])
    assert len(m.shards_of("train")) == num_shards
    batch_size = 4 if drop_last else 5
    results = run_ranks(
        _epoch, 2, str(out), batch_size, 1 if num_shards == 2 else 0, drop_last, timeout=180
    )
    (b0, len0, k0, p0), (b1, len1, k1, p1) = results
    assert b0 == b1 == len0 == len1
    real = [k for k, p in zip(k0 + k1, p0 + p1, strict=True) if not p]
    assert len(real) == len(set(real)), "no sample is read twice in an epoch"
    one = ShardStream(out, "train", batch_size=2 * batch_size, seed=11, drop_last=drop_last)
    one.set_epoch(1)
    steps = [slice(s * batch_size, (s + 1) * batch_size) for s in range(b0)]
    assert [(b["key"], b["pad"].tolist()) for b in one] == [
        (k0[s] + k1[s], p0[s] + p1[s]) for s in steps
    ], "at every step the two ranks read what one process reads with the global batch"
    if drop_last:
        assert b0 == 42 // (2 * batch_size) and len(real) == b0 * 2 * batch_size
    else:
        assert sorted(real) == m.splits["train"], "every sample of the epoch is seen once"
        assert b0 == -(-42 // (2 * batch_size))
