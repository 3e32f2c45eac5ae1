"""Reading files the toolkit did not just write: every such file is untrusted input.

Manifests, records, configs, metrics, profiles and run folders may have been edited by hand,
left half-written, replaced by something else or placed by another user in a shared folder.
Every reader of such a file goes through this module, which gives one guarantee per class of
failure:

- **Only regular files are opened.** A named pipe, socket or device under a file's name is
  refused by name (opening a FIFO blocks until a writer appears, and reading a device never
  ends); the file is opened with ``O_NONBLOCK`` and checked again on the open descriptor, so a
  swap between the check and the open cannot make a read hang either.
- **Sizes are bounded before reading.** A reader says how large its file may be; a larger one
  is refused before a byte is read.
- **JSON and YAML are strict.** A key given twice in one mapping is refused (the last value
  would win silently while a checksum over the text still passes); nesting deeper than
  :data:`MAX_DEPTH` is refused before parsing (Python's parsers would raise RecursionError);
  text must be UTF-8. YAML follows YAML 1.2 for numbers (``1e-3`` is a float, as people write
  it, where PyYAML's YAML 1.1 rules read a string), aliases are bounded, and a mapping's keys
  may be required to be strings.
- **Nothing is unpickled.** There is no pickle reader here: a job's outcome is JSON
  (:mod:`hpc_btunet.outcome`).

Errors are :class:`UnreadableFile` (a ``UserError``): one message naming the file, what is
wrong and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import yaml

from hpc_btunet.errors import UserError

MAX_DEPTH = 64  # nesting of any JSON or YAML document the toolkit reads
MAX_ALIASES = 100  # YAML aliases per document (a "billion laughs" document uses many)
KB, MB = 1 << 10, 1 << 20

_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISDIR, "a folder"),
)


class UnreadableFile(UserError):
    """A file that is not what its reader needs; ``path`` names it, the message says the fix."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        super().__init__(message)
        self.path = Path(path)


def kind_of(mode: int) -> str:
    """What a ``st_mode`` that is not a regular file is, in words ("a named pipe (FIFO)")."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def regular_file(
    path: str | os.PathLike, fix: str = "replace it with the file it stands for"
) -> os.stat_result:
    """``os.stat`` of ``path`` (links followed) when it is a regular file; else
    :class:`UnreadableFile` naming what it is. A missing file raises ``FileNotFoundError``."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise UnreadableFile(path, f"{path} is {kind_of(st.st_mode)}, not a regular file: {fix}")
    return st


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file (links followed); never opens it, never raises."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def open_regular(
    path: str | os.PathLike, limit: int | None = None, what: str = "file"
) -> Iterator[IO[bytes]]:
    """Open ``path`` for binary reading only if it is a regular file of at most ``limit`` bytes.

    The open itself cannot block (``O_NONBLOCK``: a FIFO swapped in after a check opens at once
    and is then refused by ``fstat`` on the descriptor)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(
                path,
                f"{path} is {kind_of(st.st_mode)}, not a regular file: replace it with the "
                f"{what} it stands for",
            )
        if limit is not None and st.st_size > limit:
            raise UnreadableFile(
                path,
                f"{path} is {st.st_size:,} bytes, more than a {what} may be ({limit:,}): it is "
                "not one; move it away or replace it",
            )
        with contextlib.suppress(OSError):  # regular files ignore it; reads stay ordinary
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f


def read_bytes(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most ``limit`` bytes."""
    with open_regular(path, limit, what) as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while being read
        raise UnreadableFile(path, f"{path} grew past {limit:,} bytes while read: try again")
    return data


def read_text(path: str | os.PathLike, limit: int, what: str = "file") -> str:
    """A regular UTF-8 text file of at most ``limit`` bytes."""
    data = read_bytes(path, limit, what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UnreadableFile(
            path, f"{path} is not UTF-8 text (byte {e.start}): save it as UTF-8"
        ) from None


# --- JSON -------------------------------------------------------------------------------------

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in a JSON text (strings skipped), without
    parsing it: a bound checked before the parser recurses."""
    raw = text.encode() if isinstance(text, str) else bytes(text)
    bare = np.frombuffer(_JSON_STRING.sub(b"", raw), np.uint8)
    if bare.size == 0:
        return 0
    step = np.isin(bare, (ord("["), ord("{"))).astype(np.int32)
    step -= np.isin(bare, (ord("]"), ord("}"))).astype(np.int32)
    return int(np.cumsum(step).max(initial=0))


class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(key)
        out[key] = value
    return out


def loads_json(text: str | bytes, where: str | os.PathLike, fix: str = "fix or replace it") -> Any:
    """Parse strict JSON from ``where``: no key twice in one object, nesting within
    :data:`MAX_DEPTH`, UTF-8. Raises :class:`UnreadableFile` naming ``where`` and ``fix``."""
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise UnreadableFile(
            where, f"{where} nests {depth} levels deep (at most {MAX_DEPTH}): {fix}"
        )
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except DuplicateKey as e:
        raise UnreadableFile(
            where, f"{where} gives the key {e.args[0]!r} twice in one object: {fix}"
        ) from None
    except UnicodeDecodeError as e:
        raise UnreadableFile(where, f"{where} is not UTF-8 text (byte {e.start}): {fix}") from None
    except (ValueError, RecursionError) as e:
        raise UnreadableFile(where, f"{where} is not valid JSON ({e}): {fix}") from None


def read_json(
    path: str | os.PathLike,
    limit: int = 16 * MB,
    what: str = "JSON file",
    fix: str = "fix or replace it",
) -> Any:
    """A regular JSON file of at most ``limit`` bytes, parsed strictly (:func:`loads_json`)."""
    return loads_json(read_bytes(path, limit, what), path, fix)


# --- YAML -------------------------------------------------------------------------------------

# YAML 1.2's float: PyYAML (YAML 1.1) wants a dot in the mantissa, so 1e-3 would be a string
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9]+[eE][-+]?[0-9]+
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
# YAML 1.2's int: no base-60 (1.1 reads 1:30 as 90), no underscores
_INT_12 = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers, no duplicate keys, bounded depth and
    aliases."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases")
        depth = getattr(self, "_depth", 0)
        if depth >= MAX_DEPTH:
            raise yaml.YAMLError(f"nested more than {MAX_DEPTH} levels deep")
        self._depth = depth + 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth = depth

    def construct_mapping(self, node: Any, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                with contextlib.suppress(TypeError):  # unhashable keys fail below, as usual
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"the key {key!r} is given twice", key_node.start_mark
                        )
                    seen.add(key)
        return super().construct_mapping(node, deep)


# the float and int rules of YAML 1.2's core schema in place of YAML 1.1's
StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, rx)
        for tag, rx in rules
        if tag not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")
    ]
    for first, rules in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:int", _INT_12, list("-+0123456789"))


def _int_12(loader: StrictLoader, node: Any) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text, 0)
    return int(text)


StrictLoader.add_constructor("tag:yaml.org,2002:int", _int_12)


def loads_yaml(
    text: str, where: str | os.PathLike, fix: str = "fix it", mapping: bool = False
) -> Any:
    """Parse one YAML document strictly (:class:`StrictLoader`); with ``mapping``, it must be a
    mapping (or empty: ``{}``) whose keys are strings."""
    try:
        data = yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise UnreadableFile(where, f"{where} is not valid YAML ({_one_line(e)}): {fix}") from None
    except RecursionError:
        raise UnreadableFile(
            where, f"{where} nests too deep (at most {MAX_DEPTH}): {fix}"
        ) from None
    if not mapping:
        return data
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UnreadableFile(
            where, f"{where} must hold a mapping of key: value, not {type(data).__name__}: {fix}"
        )
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise UnreadableFile(where, f"{where} has a key that is not text ({bad[0]!r}): {fix}")
    return data


def read_yaml(
    path: str | os.PathLike,
    limit: int = 1 * MB,
    what: str = "YAML file",
    fix: str = "fix it",
    mapping: bool = True,
) -> Any:
    """A regular UTF-8 YAML file of at most ``limit`` bytes, parsed strictly."""
    return loads_yaml(read_text(path, limit, what), path, fix, mapping)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


# --- paths read from records ------------------------------------------------------------------


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path | None:
    """``path`` (relative ones taken from ``root``) resolved, when it lies within ``root``
    resolved; None otherwise (a record pointing elsewhere is not followed)."""
    try:
        base = Path(root).resolve()
        target = (base / Path(path)).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    return target if target == base or base in target.parents else None


def missing_ok(exc: OSError) -> bool:
    """Whether an ``OSError`` only says the file is not there (yet)."""
    return exc.errno in (errno.ENOENT, errno.ENOTDIR)
