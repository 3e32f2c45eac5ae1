"""load_manifest on good, malformed, outdated and edited manifests: only UserError, naming the fix."""

from __future__ import annotations

import copy
import json
import re

import pytest

from hpc_btunet.data.manifest import MANIFEST_NAME, SCHEMA, load_manifest, manifest_checksum
from hpc_btunet.errors import UserError


@pytest.fixture
def packed(toy_pack):
    """A packed dataset with unlabelled samples: ``(out, content of manifest.json)``."""
    out, _ = toy_pack(n=60, shard_size=10, unlabelled={f"toy-{i:04d}" for i in range(0, 60, 6)})
    return out, json.loads((out / MANIFEST_NAME).read_text())


def _resealed(content: dict) -> dict:
    """``content`` with a checksum that matches it, so that the structure checks are reached."""
    return content | {"checksum": manifest_checksum(content)}


def _refused(out) -> str:
    """The message of the error ``load_manifest(out)`` raises; it must be a plain UserError."""
    with pytest.raises(UserError) as info:
        load_manifest(out)
    message = str(info.value)
    assert type(info.value) is UserError
    assert str(out / MANIFEST_NAME) in message and "repack" in message
    return message


def test_checksum_is_stored_and_checked(packed):
    out, content = packed
    assert content["checksum"] == manifest_checksum(content)
    assert list(content)[-1] == "checksum"
    m = load_manifest(out)
    assert m.to_json() == content
    assert all(len(s.checksums) == s.count for s in m.shards)
    # a dataset without image-level labels or organ masks writes neither optional field
    assert "labels" not in content and "organ" not in content
    assert m.labels == {} and m.has_organ is False
    # the checksum covers the content, not its layout: re-indented JSON still loads
    (out / MANIFEST_NAME).write_text(json.dumps(content, indent=4, sort_keys=True))
    assert load_manifest(out).to_json() == content


# (edit of a valid manifest's content, words the message must contain). The checksum is made to
# match afterwards: these are the shapes a buggy or foreign writer could produce.
MALFORMED = {
    "keys is a number": (lambda c: c["shards"][0].update(keys=7), "keys must be a list"),
    "offsets shorter than keys": (lambda c: c["shards"][0]["offsets"].pop(), "offsets for"),
    "checksums shorter than keys": (lambda c: c["shards"][0]["checksums"].pop(), "checksums for"),
    "count not an integer": (lambda c: c["shards"][0].update(count="8"), "count must be"),
    "count differs from keys": (lambda c: c["shards"][0].update(count=99), "keys for 99"),
    "checksum out of range": (lambda c: c["shards"][1]["checksums"].append(-1), "CRC-32"),
    "offsets not increasing": (lambda c: c["shards"][0]["offsets"].reverse(), "must increase"),
    "shard name with a path": (
        lambda c: c["shards"][0].update(name="../train-000000.tar"),
        "shard file name",
    ),
    "shard under the wrong split": (lambda c: c["shards"][0].update(split="test"), "listed under"),
    "shard entry not an object": (
        lambda c: c.update(shards=[s["name"] for s in c["shards"]]),
        "not an object",
    ),
    "shards not a list": (lambda c: c.update(shards={"a": 1}), "list of shard objects"),
    "folds not a list": (lambda c: c.update(folds="fold"), "list of lists"),
    "folds of numbers": (lambda c: c.update(folds=[[1, 2], [3]]), "list of lists"),
    "folds of strings": (lambda c: c.update(folds=sum(c["folds"], [])), "list of lists"),
    "folds overlap": (lambda c: c["folds"][0].append(c["folds"][1][0]), "partition"),
    "split key in no shard": (lambda c: c["splits"]["train"].append("ghost"), "different keys"),
    "split missing": (lambda c: c["splits"].pop("test"), "splits must be"),
    "labelled outside train": (
        lambda c: c["labelled"].append(c["splits"]["test"][0]),
        "labelled subset is not within",
    ),
    "unlabelled also labelled": (lambda c: c["unlabelled"].append(c["labelled"][0]), "unlabelled"),
    "group missing": (lambda c: c["groups"].pop(c["labelled"][0]), "groups"),
    "counts wrong": (lambda c: c["counts"].update(total=0), "counts"),
    "encoding unknown": (lambda c: c.update(encoding="jpg"), "encoding must be png or npy"),
    "image size a boolean": (lambda c: c.update(image_size=True), "image_size must be"),
    "channels 5": (lambda c: c.update(channels=5), "channels must be 1 to 4"),
    "field missing": (lambda c: c.pop("groups"), "lacks groups"),
    "field unknown": (lambda c: c.update(extra=1), "unknown field(s) extra"),
    "labels not an object": (lambda c: c.update(labels=["normal"]), "labels must be an object"),
    "label not a string": (lambda c: c.update(labels={c["labelled"][0]: 1}), "labels must be"),
    "label empty": (lambda c: c.update(labels={c["labelled"][0]: ""}), "non-empty strings"),
    "label of no sample": (lambda c: c.update(labels={"ghost": "normal"}), "no sample"),
    "organ not a boolean": (lambda c: c.update(organ="yes"), "organ must be true or false"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_content_is_a_user_error(packed, case):
    out, content = packed
    edit, words = MALFORMED[case]
    bad = copy.deepcopy(content)
    edit(bad)
    (out / MANIFEST_NAME).write_text(json.dumps(_resealed(bad)))
    message = _refused(out)
    assert "not a valid manifest" in message and words in message


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "{}",
        "null",
        '"manifest"',
        "42",
        json.dumps({"schema": SCHEMA}),
        json.dumps({"schema": SCHEMA, "checksum": "nope"}),
        json.dumps({"schema": 2}),
        "{not json",
        "",
        "[" * 100_000,
    ],
)
def test_wrong_shapes_and_non_json_are_user_errors(tmp_path, text):
    out = tmp_path / "ds"
    out.mkdir()
    (out / MANIFEST_NAME).write_text(text)
    assert "not a valid manifest" in _refused(out)


def test_binary_garbage_is_a_user_error(tmp_path):
    (tmp_path / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00\x81garbage")
    assert "not a valid manifest" in _refused(tmp_path)


def test_minimal_object_with_valid_checksum_is_refused(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(_resealed({"schema": SCHEMA})))
    assert "lacks" in _refused(tmp_path)


@pytest.mark.parametrize("version,age", [(1, "older"), (3, "newer")])
def test_other_schema_versions_say_which(packed, version, age):
    out, content = packed
    other = content | {"schema": f"hpc_btunet.manifest/{version}"}
    (out / MANIFEST_NAME).write_text(json.dumps(other))
    message = _refused(out)
    assert f"packed by an {age} version" in message or f"packed by a {age} version" in message
    assert f"manifest/{version}" in message and SCHEMA in message


def _bump_digit(text: str, pattern: str) -> str:
    """``text`` with the last digit of the number ``pattern``'s group 1 matches raised by one: a
    one-byte edit that keeps the JSON valid."""
    match = re.search(pattern, text)
    assert match, pattern
    i = match.end(1) - 1
    return text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1 :]


@pytest.mark.parametrize(
    "pattern",
    [
        r'"count": (\d+)',
        r'"image_size": (\d+)',
        r'"offsets": \[\s*0,\s*(\d+)',
        r'"checksums": \[\s*(\d+)',
        r'"seed": (\d+)',
        r'"toy-00(\d)',
    ],
)
def test_one_edited_byte_fails_the_checksum(packed, pattern):
    out, _ = packed
    path = out / MANIFEST_NAME
    original = path.read_text()
    edited = _bump_digit(original, pattern)
    assert sum(a != b for a, b in zip(original, edited, strict=True)) == 1
    json.loads(edited)  # still valid JSON
    path.write_text(edited)
    message = _refused(out)
    assert "corrupted or was edited" in message and "checksum" in message


def test_missing_and_incomplete_datasets_keep_their_messages(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_manifest(tmp_path)
    (tmp_path / ".pack-journal.json").write_text("{}")
    with pytest.raises(UserError, match="incomplete"):
        load_manifest(tmp_path)


def test_unreadable_manifest_is_a_user_error(packed):
    out, _ = packed
    path = out / MANIFEST_NAME
    path.chmod(0)
    try:
        path.open("rb").close()
        pytest.skip("this user reads files whatever their permission bits (root)")
    except PermissionError:
        pass
    with pytest.raises(UserError, match="cannot be read"):
        load_manifest(out)
