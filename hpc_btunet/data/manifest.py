"""The manifest of a packed dataset: what was packed, how it was split, and every shard's checksum.

``manifest.json`` is written last by ``pack``; its presence is what makes a dataset complete.
Besides the source, image size, channels, encoding, seed, split fractions and counts, it lists
by sample key the train/test split, the labelled subset, its folds, each sample's group and the
samples without masks; two fields are optional (manifests without them stay valid): ``labels``,
each sample's image-level label (``abnormal``/``normal``, BUSI's classes), when the source gives
any, and ``organ``, true when every sample stores an organ mask. Each shard entry lists its
sample keys, their byte offsets in the tar file (so a reader can start at any sample without
scanning the shard, and a rank can take part of a shard) and the CRC-32 of each sample's member
payloads (``checksums``, checked by the loader on every read, so a flipped byte never trains
silently), besides the shard's size and sha256 (checked by ``verify``).

The file checks itself: ``checksum`` is the sha256 of the rest of its content in canonical JSON
(``manifest_checksum``), so a corrupted or hand-edited manifest is refused, not half-trusted.
``load_manifest`` raises only ``UserError`` for a bad file: one message naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path

from hpc_btunet.data.codec import ENCODINGS
from hpc_btunet.errors import ShardError, UserError
from hpc_btunet.readers import MB, UnreadableFile, kind_of, loads_json, read_bytes

SCHEMA_PREFIX = "hpc_btunet.manifest/"
SCHEMA_VERSION = 2
SCHEMA = f"{SCHEMA_PREFIX}{SCHEMA_VERSION}"
MANIFEST_NAME = "manifest.json"
JOURNAL_NAME = ".pack-journal.json"
SPLITS = ("train", "test")
SHARD_PATTERN = re.compile(r"^(train|test)-\d{6}\.tar$")
# What a manifest may claim, checked before its numbers size a model, a buffer or a plan.
MAX_IMAGE_SIZE = 4096  # pixels per side (a batch of 4096 x 4096 images is already 16 MiB each)
MAX_SAMPLES = 1 << 22  # samples of one dataset (4,194,304)
MAX_SHARDS = 1 << 20
MAX_FOLDS = 100
MAX_MANIFEST_BYTES = 1024 * MB  # about 150 bytes per sample: MAX_SAMPLES fit with room
_REPACK = "repack the dataset with this version of hpc_btunet (`hpc-btunet pack ... --overwrite`)"


@dataclass(frozen=True)
class ShardInfo:
    """One shard's entry in the manifest; ``keys``, ``offsets`` and ``checksums`` are parallel,
    one item per sample in stored order."""

    name: str
    split: str
    count: int
    bytes: int
    sha256: str
    keys: list[str]
    offsets: list[int]
    checksums: list[int]  # CRC-32 of each sample's member payloads (codec.payload_crc)


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
    labels: dict[str, str] = field(default_factory=dict)  # image-level label by key ({}: none)
    has_organ: bool = False  # every sample has a KEY.organ.EXT member (the JSON field ``organ``)

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = _counts(self.splits, self.labelled, self.unlabelled, self.folds)

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
        """The content of ``manifest.json``: the fields, then ``checksum`` over all of them."""
        d = asdict(self)
        labels, organ = d.pop("labels"), d.pop("has_organ")
        order = ["schema", "package_version", "source", "image_size", "channels", "encoding"]
        d = {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order}
        # the optional fields only when set: a dataset without them is written as before
        if labels:
            d["labels"] = labels
        if organ:
            d["organ"] = True
        return d | {"checksum": manifest_checksum(d)}

    @classmethod
    def from_json(cls, d: object, where: str = MANIFEST_NAME) -> Manifest:
        """Check and parse the content of a manifest file. Every problem is a ``UserError`` naming
        ``where`` and the fix: an old schema, a checksum that does not match (the file was
        corrupted or edited), or a structure that is not what ``pack`` writes."""
        try:
            if not isinstance(d, dict):
                raise _Invalid(f"it holds a JSON {_json_type(d)}, not an object")
            _check_schema(d.get("schema"))
            if not _is_sha256(d.get("checksum")):
                raise _Invalid("it has no checksum")
            if d["checksum"] != manifest_checksum(d):
                raise UserError(
                    f"{where} is corrupted or was edited: its checksum does not match its "
                    f"content; {_REPACK}, or copy {MANIFEST_NAME} again from where it was packed"
                )
            _check_fields(d, _FIELDS, "the manifest", _OPTIONAL_FIELDS)
            for i, s in enumerate(d["shards"]):
                _check_fields(s, _SHARD_FIELDS, f"shard entry {i}")
            _check_consistency(d)
        except _Invalid as e:
            raise UserError(f"{where} is not a valid manifest ({e}): {_REPACK}") from None
        except _Outdated as e:
            raise UserError(f"{where} {e}: {_REPACK}") from None
        fields = {k: v for k, v in d.items() if k not in ("checksum", "organ")}
        fields["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**fields, has_organ=d.get("organ", False))


def shard_info(d: object) -> ShardInfo:
    """A shard entry (as the manifest and the pack journal store it) checked field by field;
    ``ValueError`` naming what is wrong."""
    try:
        _check_fields(d, _SHARD_FIELDS, "the shard entry")
    except _Invalid as e:
        raise ValueError(str(e)) from None
    return ShardInfo(**d)  # type: ignore[arg-type]


def manifest_checksum(content: dict) -> str:
    """The sha256 of ``content`` without its ``checksum`` field, in canonical JSON (sorted keys,
    compact separators): what ``manifest.json`` stores as ``checksum``."""
    rest = {k: v for k, v in content.items() if k != "checksum"}
    canonical = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def load_manifest(root: str | Path) -> Manifest:
    """Read ``root/manifest.json``, with a clear message when the dataset is missing or unfinished.

    Raises only ``UserError``: for a missing or unfinished dataset, and for a manifest that cannot
    be read, is not JSON, was packed by another version, fails its checksum or is malformed.
    """
    root = Path(root)
    path = root / MANIFEST_NAME
    if not os.path.lexists(path):
        if os.path.lexists(root / JOURNAL_NAME):
            raise UserError(
                f"the dataset at {root} is incomplete (a pack was interrupted): rerun the same "
                "`pack` command to complete it"
            )
        raise UserError(
            f"no packed dataset at {root} ({MANIFEST_NAME} not found): pack one with "
            f"`hpc-btunet pack --out {root}` or pass --data pointing at a packed dataset"
        )
    try:  # a regular file of bounded size: a named pipe or device is refused, never read
        raw = read_bytes(path, MAX_MANIFEST_BYTES, "manifest")
    except FileNotFoundError:
        raise UserError(
            f"{path} is a symbolic link that points nowhere: point it at the dataset's "
            f"{MANIFEST_NAME} or copy the file again"
        ) from None
    except UnreadableFile:
        raise
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}): make it readable") from e
    try:  # strict JSON: a key given twice would pass the checksum with the last value winning
        content = loads_json(raw, path, _REPACK)
    except UnreadableFile as e:
        why = str(e).removeprefix(f"{path} ").removesuffix(f": {_REPACK}")
        raise UserError(f"{path} is not a valid manifest (it {why}): {_REPACK}") from None
    return Manifest.from_json(content, str(path))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def shard_file_problem(path: Path, shard: ShardInfo) -> str | None:
    """Why the file ``path`` cannot be the shard the manifest describes (missing, not a regular
    file, another size), from its ``stat`` alone; None when it may be."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror})"
    if not stat.S_ISREG(st.st_mode):
        return f"{path}: {kind_of(st.st_mode)}, not a regular file"
    if st.st_size != shard.bytes:
        return f"{path}: {st.st_size} bytes, manifest says {shard.bytes} (truncated or replaced)"
    return None


def check_shard_files(root: str | Path, shards: list[ShardInfo]) -> None:
    """Every shard exists as a regular file of the size the manifest gives (a truncated copy, or
    a named pipe in a shard's place, fails here); one error lists every bad shard."""
    problems = [p for s in shards if (p := shard_file_problem(Path(root) / s.name, s))]
    if problems:
        raise ShardError(
            "shard(s) do not match the manifest:\n  "
            + "\n  ".join(problems)
            + "\nrepack the dataset or copy the shards again (`hpc-btunet verify` checks them)"
        )


def verify_shards(root: str | Path, shards: list[ShardInfo]) -> None:
    """Check each shard's size and sha256 against the manifest; one error lists every bad shard."""
    root = Path(root)
    problems = []
    for s in shards:
        path = root / s.name
        problem = shard_file_problem(path, s)
        if problem is None and sha256_file(path) != s.sha256:
            problem = f"{path}: sha256 differs from the manifest (corrupt)"
        if problem is not None:
            problems.append(problem)
    if problems:
        raise ShardError(
            f"{len(problems)} shard(s) failed verification:\n  "
            + "\n  ".join(problems)
            + "\nrepack the dataset (`hpc-btunet pack ... --overwrite`) or copy the shards again"
        )


# Checking a manifest's content. The checks raise these two; ``from_json`` adds the file and fix.


class _Invalid(Exception):
    """The content is not what ``pack`` writes; the message says what is wrong."""


class _Outdated(Exception):
    """The content is a manifest of another schema version; the message says which."""


def _check_schema(schema: object) -> None:
    if schema == SCHEMA:
        return
    version = schema[len(SCHEMA_PREFIX) :] if isinstance(schema, str) else ""
    if not (isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX) and version.isdigit()):
        raise _Invalid(f"schema is {_brief(schema)}, expected {SCHEMA!r}")
    age = "an older" if int(version) < SCHEMA_VERSION else "a newer"
    raise _Outdated(
        f"was packed by {age} version of hpc_btunet (schema {schema}; this version reads {SCHEMA})"
    )


def _is_int(v: object, low: float = float("-inf"), high: float = float("inf")) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _is_keys(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(k, str) for k in v)


def _is_sha256(v: object) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None


# Field -> (check of its type and range, what it must be). A field missing or unknown is refused.
_Spec = dict[str, tuple[Callable[[object], bool], str]]
_FIELDS: _Spec = {
    "schema": (lambda v: v == SCHEMA, SCHEMA),
    "package_version": (lambda v: isinstance(v, str), "a string"),
    "source": (lambda v: isinstance(v, dict), "an object"),
    "image_size": (
        lambda v: _is_int(v, 1, MAX_IMAGE_SIZE),
        f"a positive integer of at most {MAX_IMAGE_SIZE} (MAX_IMAGE_SIZE)",
    ),
    "channels": (lambda v: _is_int(v) and v in (1, 2, 3, 4), "1 to 4"),
    "encoding": (lambda v: v in ENCODINGS, " or ".join(ENCODINGS)),
    "seed": (_is_int, "an integer"),
    "fractions": (lambda v: isinstance(v, dict), "an object"),
    "splits": (
        lambda v: isinstance(v, dict) and set(v) == set(SPLITS) and all(map(_is_keys, v.values())),
        "an object holding a list of sample keys for each of " + " and ".join(SPLITS),
    ),
    "labelled": (_is_keys, "a list of sample keys"),
    "folds": (
        lambda v: isinstance(v, list) and len(v) <= MAX_FOLDS and all(map(_is_keys, v)),
        f"a list of lists of sample keys (at most {MAX_FOLDS}: MAX_FOLDS)",
    ),
    "groups": (
        lambda v: isinstance(v, dict) and all(isinstance(g, str) for g in v.values()),
        "an object mapping sample keys to group names",
    ),
    "unlabelled": (_is_keys, "a list of sample keys"),
    "shards": (
        lambda v: isinstance(v, list) and len(v) <= MAX_SHARDS,
        f"a list of shard objects (at most {MAX_SHARDS:,}: MAX_SHARDS)",
    ),
    "counts": (lambda v: isinstance(v, dict), "an object"),
    "checksum": (_is_sha256, "a sha256 in hex"),
}
_OPTIONAL_FIELDS: _Spec = {
    "labels": (
        lambda v: isinstance(v, dict) and all(isinstance(g, str) and g for g in v.values()),
        "an object mapping sample keys to image-level labels (non-empty strings)",
    ),
    "organ": (lambda v: isinstance(v, bool), "true or false"),
}
_SHARD_FIELDS: _Spec = {
    "name": (
        lambda v: isinstance(v, str) and SHARD_PATTERN.match(v) is not None,
        "a shard file name such as train-000000.tar",
    ),
    "split": (lambda v: v in SPLITS, " or ".join(SPLITS)),
    "count": (
        lambda v: _is_int(v, 1, MAX_SAMPLES),
        f"a positive integer of at most {MAX_SAMPLES:,} (MAX_SAMPLES)",
    ),
    "bytes": (lambda v: _is_int(v, 0), "a byte count"),
    "sha256": (_is_sha256, "a sha256 in hex"),
    "keys": (_is_keys, "a list of sample keys"),
    "offsets": (
        lambda v: isinstance(v, list) and all(_is_int(o, 0) for o in v),
        "a list of byte offsets",
    ),
    "checksums": (
        lambda v: isinstance(v, list) and all(_is_int(c, 0, 2**32 - 1) for c in v),
        "a list of CRC-32 values",
    ),
}


def _check_fields(d: object, spec: _Spec, what: str, optional: _Spec | None = None) -> None:
    """Every field of ``spec`` present and of its type; those of ``optional`` when present."""
    if not isinstance(d, dict):
        raise _Invalid(f"{what} is a JSON {_json_type(d)}, not an object")
    missing = [k for k in spec if k not in d]
    if missing:
        raise _Invalid(f"{what} lacks {', '.join(missing)}")
    optional = optional or {}
    unknown = [k for k in d if k not in spec and k not in optional]
    if unknown:
        raise _Invalid(f"{what} has unknown field(s) {', '.join(map(str, unknown))}")
    for name, (ok, must_be) in (spec | {k: v for k, v in optional.items() if k in d}).items():
        if not ok(d[name]):
            raise _Invalid(f"{what} field {name} must be {must_be}, found {_brief(d[name])}")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    return names.get(type(value), "number")


def _brief(value: object, limit: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_consistency(d: dict) -> None:
    """The relations ``pack`` guarantees between the fields (their types are already checked)."""
    total = sum(len(v) for v in d["splits"].values())
    if total > MAX_SAMPLES:
        raise _Invalid(f"it lists {total:,} samples, more than {MAX_SAMPLES:,} (MAX_SAMPLES)")
    _check_shards(d["shards"])
    _check_key_sets(d)
    counts = _counts(d["splits"], d["labelled"], d["unlabelled"], d["folds"])
    if d["counts"] != counts:
        raise _Invalid(f"counts {_brief(d['counts'])} do not match the key lists")


def _check_shards(shards: list[dict]) -> None:
    """Per-sample lists of ``count`` items, offsets within the file, every key in one shard."""
    _refuse_repeats(Counter(s["name"] for s in shards), "shard names")
    for s in shards:
        where = f"shard {s['name']}"
        if not s["name"].startswith(f"{s['split']}-"):
            raise _Invalid(f"{where} is listed under split {s['split']!r}")
        for name in ("keys", "offsets", "checksums"):
            if len(s[name]) != s["count"]:
                raise _Invalid(f"{where} has {len(s[name])} {name} for {s['count']} samples")
        offsets = s["offsets"]
        if any(b <= a for a, b in pairwise(offsets)) or offsets[-1] >= s["bytes"]:
            raise _Invalid(f"{where}: offsets must increase and lie within its {s['bytes']} bytes")
    _refuse_repeats(Counter(k for s in shards for k in s["keys"]), "sample keys in shards")


def _check_key_sets(d: dict) -> None:
    """Each split holds exactly its shards' keys; labelled within train and partitioned by the
    folds; unlabelled within train outside labelled; a group for every sample."""
    splits = d["splits"]
    for split in SPLITS:
        _refuse_repeats(Counter(splits[split]), f"keys of the {split} split")
        in_shards = {k for s in d["shards"] if s["split"] == split for k in s["keys"]}
        if in_shards != set(splits[split]):
            odd = sorted(in_shards ^ set(splits[split]))
            raise _Invalid(
                f"the {split} split and its shards hold different keys (e.g. {odd[0]!r})"
            )
    train = set(splits["train"])
    labelled = set(d["labelled"])
    _refuse_repeats(Counter(d["labelled"]), "labelled keys")
    if not labelled <= train:
        raise _Invalid("the labelled subset is not within the train split")
    if Counter(k for fold in d["folds"] for k in fold) != Counter(labelled):
        raise _Invalid("the folds do not partition the labelled subset")
    _refuse_repeats(Counter(d["unlabelled"]), "unlabelled keys")
    if not set(d["unlabelled"]) <= train - labelled:
        raise _Invalid("unlabelled keys must be train keys outside the labelled subset")
    if set(d["groups"]) != train | set(splits["test"]):
        raise _Invalid("groups must name the group of every sample, and only those")
    strangers = sorted(set(d.get("labels", {})) - set(d["groups"]))
    if strangers:
        raise _Invalid(f"labels name a key that is no sample of the dataset ({strangers[0]!r})")


def _refuse_repeats(counter: Counter, what: str) -> None:
    repeated = [k for k, n in counter.items() if n > 1]
    if repeated:
        raise _Invalid(f"{what} repeat (e.g. {repeated[0]!r})")


def _counts(splits: dict, labelled: list, unlabelled: list, folds: list) -> dict:
    return {
        "total": sum(len(v) for v in splits.values()),
        **{s: len(splits.get(s, [])) for s in SPLITS},
        "labelled": len(labelled),
        "unlabelled": len(unlabelled),
        "folds": [len(f) for f in folds],
    }
