import pytest

from hpc_btunet.data.sample import Entry
from hpc_btunet.data.splits import SplitConfig, make_splits
from hpc_btunet.errors import DataError, UserError


def entries(n, group_size=1, unlabelled=()):
    return [
        Entry(f"k{i:04d}", f"g{i // group_size}", f"k{i:04d}" not in unlabelled) for i in range(n)
    ]


@pytest.mark.parametrize("n", [40, 37, 100, 671])
@pytest.mark.parametrize("seed", [0, 3])
def test_partition_and_proportions_single_samples(n, seed):
    cfg = SplitConfig(seed=seed)
    s = make_splits(entries(n), cfg)
    assert set(s.train).isdisjoint(s.test)
    assert sorted(s.train + s.test) == sorted(e.key for e in entries(n))
    assert set(s.labelled) <= set(s.train)
    fold_keys = [k for f in s.folds for k in f]
    assert sorted(fold_keys) == sorted(s.labelled)  # folds partition the labelled subset
    assert len(fold_keys) == len(set(fold_keys))
    # with one sample per group, proportions hold within one sample
    assert abs(len(s.test) - 0.3 * n) <= 1
    assert abs(len(s.labelled) - 0.2 * len(s.train)) <= 1
    sizes = [len(f) for f in s.folds]
    assert max(sizes) - min(sizes) <= 1
    assert len(s.folds) == 5


def test_same_seed_same_splits_other_seed_differs():
    a = make_splits(entries(200), SplitConfig(seed=1))
    b = make_splits(entries(200), SplitConfig(seed=1))
    c = make_splits(entries(200), SplitConfig(seed=2))
    assert a == b
    assert a.test != c.test


@pytest.mark.parametrize("group_size", [2, 5])
def test_groups_never_straddle(group_size):
    es = entries(300, group_size=group_size)
    group_of = {e.key: e.group for e in es}
    s = make_splits(es, SplitConfig(seed=4))
    part_of = {}
    for name, keys in [("train", s.train), ("test", s.test)]:
        for k in keys:
            part_of.setdefault(group_of[k], set()).add(name)
    assert all(len(v) == 1 for v in part_of.values())
    fold_of = {}
    for i, f in enumerate(s.folds):
        for k in f:
            fold_of.setdefault(group_of[k], set()).add(i)
    assert all(len(v) == 1 for v in fold_of.values())
    # labelled subset takes whole groups
    lab_groups = {group_of[k] for k in s.labelled}
    assert all(group_of[k] not in lab_groups for k in set(s.train) - set(s.labelled))
    # proportions within one group's size
    assert abs(len(s.test) - 0.3 * 300) <= group_size
    assert abs(len(s.labelled) - 0.2 * len(s.train)) <= group_size
    sizes = [len(f) for f in s.folds]
    assert max(sizes) - min(sizes) <= group_size


def test_unlabelled_samples_stay_out_of_test_and_labelled():
    unl = {f"k{i:04d}" for i in range(0, 100, 3)}
    s = make_splits(entries(100, unlabelled=unl), SplitConfig())
    assert unl.isdisjoint(s.test) and unl.isdisjoint(s.labelled)
    assert unl <= set(s.train)


def test_fully_unlabelled_dataset_is_all_train():
    es = entries(20, unlabelled={e.key for e in entries(20)})
    s = make_splits(es, SplitConfig())
    assert len(s.train) == 20 and s.test == s.labelled == [] and s.folds == []


def test_too_few_labelled_groups_for_folds():
    with pytest.raises(DataError, match="fewer than --folds 5"):
        make_splits(entries(12), SplitConfig(folds=5))


@pytest.mark.parametrize("kw", [{"test_fraction": 1.0}, {"labelled_fraction": 0.0}, {"folds": 1}])
def test_bad_fractions(kw):
    with pytest.raises(UserError):
        SplitConfig(**kw)
