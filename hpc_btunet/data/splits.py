"""Group-aware, seeded train/test split, labelled subset and k folds, all by sample key.

Samples that share a group (slices of one patient, fields of one slide) always land on the same
side of every split and in the same fold. Proportions are met within the size of one group: with
one sample per group, within one sample.

Why not scikit-learn: ``GroupShuffleSplit`` splits by the proportion of *groups*, not of samples,
and ``GroupKFold`` with shuffling does not balance fold sizes; both properties are part of the
manifest's contract, so the few lines below implement them directly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from hpc_btunet.data.manifest import MAX_FOLDS
from hpc_btunet.data.sample import Entry
from hpc_btunet.errors import DataError, UserError


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = 0.3
    labelled_fraction: float = 0.2
    folds: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.test_fraction < 1.0:
            raise UserError(f"--test-fraction must be in (0, 1), got {self.test_fraction}")
        if not 0.0 < self.labelled_fraction <= 1.0:
            raise UserError(f"--labelled-fraction must be in (0, 1], got {self.labelled_fraction}")
        if self.folds < 2:
            raise UserError(f"--folds must be at least 2, got {self.folds}")
        if self.folds > MAX_FOLDS:
            raise UserError(f"--folds must be at most {MAX_FOLDS} (MAX_FOLDS), got {self.folds}")
        if not 0 <= self.seed < 2**63:
            raise UserError(f"--seed must be an integer from 0 to 2^63 - 1, got {self.seed}")


@dataclass(frozen=True)
class Splits:
    """Sorted key lists. ``labelled`` is a subset of ``train``; ``folds`` partition ``labelled``."""

    train: list[str]
    test: list[str]
    labelled: list[str]
    folds: list[list[str]]


def _groups(entries: list[Entry]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for e in entries:
        groups[e.group].append(e.key)
    return {g: sorted(keys) for g, keys in sorted(groups.items())}


def _shuffled(names: list[str], rng: np.random.Generator) -> list[str]:
    return [names[i] for i in rng.permutation(len(names))]


def _take(order: list[str], sizes: dict[str, int], target: int) -> tuple[list[str], list[str]]:
    """Walk groups in ``order``, taking each that still fits under ``target`` samples.

    The taken total never exceeds the target, and falls short by less than the largest group
    left out (a group is only refused when it would overshoot).
    """
    taken, rest, total = [], [], 0
    for g in order:
        if total + sizes[g] <= target:
            taken.append(g)
            total += sizes[g]
        else:
            rest.append(g)
    return taken, rest


def _balanced_folds(order: list[str], sizes: dict[str, int], k: int) -> list[list[str]]:
    """Largest groups first, each to the currently smallest fold: fold sizes differ by at most
    the largest group's size. ``order`` (already shuffled) breaks ties between equal groups."""
    folds: list[list[str]] = [[] for _ in range(k)]
    counts = [0] * k
    for g in sorted(order, key=lambda g: -sizes[g]):  # stable: shuffled order among equals
        i = counts.index(min(counts))
        folds[i].append(g)
        counts[i] += sizes[g]
    return folds


def make_splits(entries: list[Entry], cfg: SplitConfig) -> Splits:
    """Split ``entries`` deterministically for ``cfg.seed``.

    The test split and the labelled subset are drawn only from groups whose samples all have
    masks. A dataset without any mask (packed with ``--unlabelled``) gets everything in train and
    no test split, labelled subset or folds.
    """
    groups = _groups(entries)
    has_mask = {e.key: e.has_mask for e in entries}
    sizes = {g: len(keys) for g, keys in groups.items()}
    rng = np.random.default_rng(cfg.seed)
    labelled_groups = [g for g, keys in groups.items() if all(has_mask[k] for k in keys)]
    if not labelled_groups:
        train = sorted(k for keys in groups.values() for k in keys)
        return Splits(train=train, test=[], labelled=[], folds=[])

    n_total = len(entries)
    test_target = round(cfg.test_fraction * n_total)
    n_labelled = sum(sizes[g] for g in labelled_groups)
    if n_labelled < test_target:
        raise DataError(
            f"the test split needs {test_target} labelled samples "
            f"({cfg.test_fraction:.0%} of {n_total}) but only {n_labelled} have masks: "
            "add masks or lower --test-fraction"
        )
    test_groups, _ = _take(_shuffled(labelled_groups, rng), sizes, test_target)
    if not test_groups:  # no group fits under the target: it rounds to 0, or groups are larger
        smallest = min(sizes[g] for g in labelled_groups)
        asks = f"--test-fraction {cfg.test_fraction:g} of {n_total} samples"
        why = (
            f"{asks} rounds to 0 samples"
            if test_target == 0
            else f"{asks} asks for {test_target}, and the smallest group with masks holds "
            f"{smallest}"
        )
        raise DataError(
            f"the test split would be empty: {why}; pack more images (or more, smaller groups: "
            "patients, slides) or raise --test-fraction"
        )
    test_set = set(test_groups)
    train_groups = [g for g in groups if g not in test_set]
    n_train = sum(sizes[g] for g in train_groups)

    lab_target = round(cfg.labelled_fraction * n_train)
    lab_candidates = [g for g in labelled_groups if g not in test_set]
    n_candidates = sum(sizes[g] for g in lab_candidates)
    if n_candidates < lab_target:
        raise DataError(
            f"the labelled subset needs {lab_target} samples ({cfg.labelled_fraction:.0%} of "
            f"{n_train} training samples) but only {n_candidates} training samples have masks: "
            "add masks or lower --labelled-fraction"
        )
    lab_groups, _ = _take(_shuffled(lab_candidates, rng), sizes, lab_target)
    if len(lab_groups) < cfg.folds:
        raise DataError(
            f"the labelled subset has {len(lab_groups)} group(s) ({lab_target} samples), fewer "
            f"than --folds {cfg.folds}: raise --labelled-fraction, pack more images or lower --folds"
        )
    fold_groups = _balanced_folds(lab_groups, sizes, cfg.folds)

    def keys_of(gs: list[str]) -> list[str]:
        return sorted(k for g in gs for k in groups[g])

    return Splits(
        train=keys_of(train_groups),
        test=keys_of(test_groups),
        labelled=keys_of(lab_groups),
        folds=[keys_of(f) for f in fold_groups],
    )
