"""Typed job configs: one dataclass per job, the command line and YAML files derived from it.

Each field carries its help text in ``metadata["help"]``. ``add_arguments`` turns the fields into
``--option`` flags (documented with their defaults); ``resolve`` builds the config from, in
increasing precedence, the dataclass defaults, a YAML ``--config`` file and the flags actually
given. Unknown keys in a file fail, listing the valid ones; wrong types fail naming the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from hpc_btunet.errors import UserError
from hpc_btunet.readers import MB, UnreadableFile, read_yaml

T = TypeVar("T")


def option(default: Any, help: str, **kw: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with its help text and optional constraints, checked by
    :func:`check_values`: ``choices``, ``min`` (inclusive), ``above`` (exclusive lower bound),
    ``max`` (inclusive). ``identity=False`` marks an option that cannot change a run's result
    (where it runs, how often it logs): it is left out of the run's identity."""
    return dataclasses.field(default=default, metadata={"help": help, **kw})


def _bounds(meta: dict) -> str:
    parts = []
    if "above" in meta:
        parts.append(f"> {meta['above']}")
    if "min" in meta:
        parts.append(f">= {meta['min']}")
    if "max" in meta:
        parts.append(f"<= {meta['max']}")
    return " and ".join(parts)


def check_values(cfg: Any) -> None:
    """Check every field of the dataclass ``cfg`` against its constraints: floats finite, numbers
    within their bounds, choices respected. Raises one ``UserError`` naming the option."""
    for f in dataclasses.fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or isinstance(value, bool):
            continue
        flag = _flag(f.name)
        if "choices" in meta and value not in meta["choices"]:
            raise UserError(
                f"{flag} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}"
            )
        if not isinstance(value, int | float):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{flag} must be a finite number, got {value}")
        low, above, high = meta.get("min"), meta.get("above"), meta.get("max")
        if (
            (low is not None and value < low)
            or (above is not None and value <= above)
            or (high is not None and value > high)
        ):
            raise UserError(f"{flag} must be {_bounds(meta)}, got {value}")


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a field annotation like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _fields(cls: type) -> list[tuple[dataclasses.Field, type, bool]]:
    hints = typing.get_type_hints(cls)
    return [(f, *_base_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    with_config: bool = True,
    only: tuple[str, ...] | None = None,
    prefix: str = "",
) -> None:
    """Add one flag per field of ``cls``; defaults are shown in ``--help`` but parsed as None,
    so that ``resolve`` can tell a flag given on the command line from a default. With
    ``prefix`` (e.g. ``"pretrain"``) field ``epochs`` becomes ``--pretrain-epochs`` (dest
    ``pretrain_epochs``): one stage's options beside another's in one command."""
    if with_config:
        parser.add_argument(
            "--config", type=Path, help="YAML file with any of the options below (flags win)"
        )
    for f, tp, _ in _fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        help_text = f.metadata.get("help", "")
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else f.default_factory()
            if f.default_factory is not dataclasses.MISSING
            else None
        )
        dest = f"{prefix}_{f.name}" if prefix else f.name
        kw: dict[str, Any] = {"dest": dest, "default": None}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is list:
            kw.update(action="append", type=str, metavar="VALUE")
        else:
            kw["type"] = str if tp is Path else tp
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
        bounds = _bounds(f.metadata)
        help_text += f" ({bounds})" if bounds else ""
        if default is not None and "default" not in help_text:  # said once, or not at all
            help_text += f" (default: {default})"
        parser.add_argument(_flag(dest), help=help_text, **kw)


def _coerce(cls: type, name: str, value: Any, tp: type, optional: bool) -> Any:
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} must be set for {cls.__name__}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if typing.get_origin(tp) is list:
        if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
            raise UserError(f"{name} must be a list of values, got {value!r:.80}")
        return [str(v) for v in value]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        kind = {
            "float": "a number",
            "int": "a whole number",
            "str": "text",
            "bool": "true or false",
        }
        raise UserError(f"{name} must be {kind.get(tp.__name__, tp.__name__)}, got {value!r:.80}")
    return value


def from_dict(cls: type[T], values: dict[str, Any], origin: str = "config") -> T:
    """Build ``cls`` from a mapping, failing on unknown keys (listing the valid ones) and types
    (naming the key, and ``origin`` when the values come from a file)."""
    fields = {f.name: (f, tp, opt) for f, tp, opt in _fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(
            f"unknown key(s) in {origin}: {', '.join(unknown)}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in values.items():
        _, tp, opt = fields[name]
        try:
            kwargs[name] = _coerce(cls, name, value, tp, opt)
        except UserError as e:
            if origin in ("config", "options"):
                raise
            raise UserError(f"{origin}: {e}: fix that key in the file") from None
    return cls(**kwargs)


def load_yaml(path: Path) -> dict[str, Any]:
    """A ``--config`` file: a mapping of option: value, read strictly (a regular UTF-8 file of
    at most 1 MB, no key twice, YAML 1.2 numbers so that ``lr: 1e-3`` is a number)."""
    try:
        data = read_yaml(path, limit=MB, what="config file", fix="fix the file")
    except FileNotFoundError:
        raise UserError(f"--config {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"--config {path} is a folder: pass a YAML file") from None
    except UnreadableFile as e:
        raise UserError(f"--config {e}") from None
    return {k.replace("-", "_"): v for k, v in data.items()}


def resolve(
    cls: type[T], args: argparse.Namespace, others: tuple[type, ...] = (), **overrides: Any
) -> T:
    """Defaults < ``--config`` file < flags given < ``overrides``. Keys of the file that belong to
    the ``others`` configs (parsed from the same file) are left to them."""
    names = {f.name for f, _, _ in _fields(cls)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        theirs = {f.name for other in others for f, _, _ in _fields(other)}
        values |= {k: v for k, v in load_yaml(args.config).items() if k in names or k not in theirs}
    values |= {k: v for k, v in vars(args).items() if k in names and v is not None}
    values |= overrides
    config = getattr(args, "config", None)
    return from_dict(cls, values, origin=f"--config {config}" if config else "options")


def to_dict(cfg: Any) -> dict[str, Any]:
    """JSON/YAML-ready dict of a config (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}
