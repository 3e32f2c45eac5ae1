"""The manifest of a packed dataset: what was packed, how it was split, and every shard's checksum.

``manifest.json`` is written last by ``pack``; its presence is what makes a dataset complete.
Each shard entry lists its sample keys and their byte offsets in the tar file, so a reader can
start at any sample without scanning the shard (and a rank can take part of a shard).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hpc_btunet.errors import ShardError, UserError

SCHEMA = "hpc_btunet.manifest/1"
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = ".pack-journal.json"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    split: str
    count: int
    bytes: int
    sha256: str
    keys: list[str]
    offsets: list[int]


@dataclass
class Manifest:
    """The parsed ``manifest.json``. Key lists are sorted; ``folds`` partition ``labelled``."""

    source: dict
    image_size: int
    channels: int
    encoding: str
    seed: int
    fractions: dict
    splits: dict[str, list[str]]
    labelled: list[str]
    folds: list[list[str]]
    groups: dict[str, str]
    unlabelled: list[str]
    shards: list[ShardInfo]
    schema: str = SCHEMA
    package_version: str = ""
    counts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = {
                "total": sum(len(v) for v in self.splits.values()),
                **{s: len(self.splits.get(s, [])) for s in SPLITS},
                "labelled": len(self.labelled),
                "unlabelled": len(self.unlabelled),
                "folds": [len(f) for f in self.folds],
            }

    def shards_of(self, split: str) -> list[ShardInfo]:
        if split not in SPLITS:
            raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
        return [s for s in self.shards if s.split == split]

    def fold_keys(self, fold: int) -> tuple[list[str], list[str]]:
        """(training keys, validation keys) of fold ``fold``: the labelled subset minus the fold,
        and the fold itself."""
        if not 0 <= fold < len(self.folds):
            raise UserError(
                f"fold {fold} is out of range: this dataset has {len(self.folds)} folds "
                f"(0..{len(self.folds) - 1}); repack with --folds to change it"
            )
        val = set(self.folds[fold])
        return [k for k in self.labelled if k not in val], sorted(val)

    def to_json(self) -> dict:
        d = asdict(self)
        order = ["schema", "package_version", "source", "image_size", "channels", "encoding"]
        return {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order}

    @classmethod
    def from_json(cls, d: dict) -> Manifest:
        if d.get("schema") != SCHEMA:
            raise UserError(
                f"unsupported manifest schema {d.get('schema')!r} (this version reads {SCHEMA}): "
                "repack the dataset with this version of hpc_btunet"
            )
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)


def load_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json``, with a clear message when the dataset is missing or unfinished."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        if (root / JOURNAL_NAME).is_file():
            raise UserError(
                f"the dataset at {root} is incomplete (a pack was interrupted): rerun the same "
                "`pack` command to complete it"
            )
        raise UserError(
            f"no packed dataset at {root} ({MANIFEST_NAME} not found): pack one with "
            f"`hpc-btunet pack --out {root}` or pass --data pointing at a packed dataset"
        )
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise UserError(f"{path} is not a valid manifest ({e}): repack the dataset") from e


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_shards(root: str | Path, shards: list[ShardInfo]) -> None:
    """Check each shard's size and sha256 against the manifest; one error lists every bad shard."""
    root = Path(root)
    problems = []
    for s in shards:
        path = root / s.name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != s.bytes:
            problems.append(
                f"{path}: {size} bytes, manifest says {s.bytes} (truncated or replaced)"
            )
        elif sha256_file(path) != s.sha256:
            problems.append(f"{path}: sha256 differs from the manifest (corrupt)")
    if problems:
        raise ShardError(
            f"{len(problems)} shard(s) failed verification:\n  "
            + "\n  ".join(problems)
            + "\nrepack the dataset (`hpc-btunet pack ... --overwrite`) or copy the shards again"
        )
