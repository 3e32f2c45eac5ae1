"""Model registry, checked options, input-size rules and encoder weight transfer (state dicts only).

A model is registered under a name with ``@register_model(name)`` on a class or builder function
whose keyword parameters are its options (``in_channels`` and ``out_channels`` included).
Variants are registrations of the same builder with some options fixed, not copied classes:
``register_model("attention_unet", skip="attention")(UNet)``. Options are checked against the
builder's signature, so a misspelled option fails listing the valid ones.
"""

from __future__ import annotations

import difflib
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, TypeVar

import torch
from torch import nn

from hpc_btunet.errors import UserError
from hpc_btunet.models.blocks import size_error

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., nn.Module]
    params: dict[str, inspect.Parameter]
    fixed: dict[str, Any] = field(default_factory=dict)


_MODELS: dict[str, _Entry] = {}


def register_model(name: str, **fixed: Any) -> Callable[[Builder], Builder]:
    """Register ``builder`` (a class or function) as model ``name``; ``fixed`` options are set."""

    def register(builder: Builder) -> Builder:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        if {"in_channels", "out_channels"} & fixed.keys():
            raise ValueError(
                "in_channels and out_channels depend on the data; they cannot be fixed"
            )
        params = {
            p.name: p
            for p in inspect.signature(builder, eval_str=True).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        }
        needed = {"in_channels", "out_channels", *fixed}
        if not needed <= params.keys():
            raise TypeError(
                f"builder of {name!r} lacks parameters {sorted(needed - params.keys())}"
            )
        _MODELS[name] = _Entry(builder, params, dict(fixed))
        return builder

    return register


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def _entry(name: str) -> _Entry:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown model {name!r}{hint}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def model_options(name: str) -> dict[str, Any]:
    """The options model ``name`` accepts, with their defaults (fixed ones excluded)."""
    entry = _entry(name)
    return {k: p.default for k, p in entry.params.items() if k not in entry.fixed}


def _type_ok(value: Any, annotation: Any) -> bool:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, Integral) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, Real) and not isinstance(value, bool)
    if annotation in (str, type(None)):
        return isinstance(value, annotation)
    return True  # richer annotations are checked by the model itself


def model_signature(name: str, in_channels: int = 1, out_channels: int = 1, **options: Any) -> dict:
    """``{"name": name, **every option resolved with defaults}``, checked; store it with weights.

    Raises ``UserError`` for an unknown model, an unknown or fixed option, a missing required
    option, or a value of the wrong type. Value ranges are checked when the model is built.
    """
    entry = _entry(name)
    valid = model_options(name)
    options = {"in_channels": in_channels, "out_channels": out_channels, **options}
    for key in options:
        if key in entry.fixed:
            raise UserError(f"model {name!r} fixes option {key}={entry.fixed[key]!r}")
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(
                f"unknown option {key!r} for model {name!r}{hint}; valid options: "
                + ", ".join(sorted(valid))
            )
    resolved: dict[str, Any] = {"name": name}
    for key, param in entry.params.items():
        value = entry.fixed.get(key, options.get(key, param.default))
        if value is inspect.Parameter.empty:
            raise UserError(f"model {name!r} needs option {key!r}")
        if not _type_ok(value, param.annotation):
            expected = getattr(param.annotation, "__name__", str(param.annotation))
            raise UserError(
                f"model {name!r}: option {key} must be {expected}, "
                f"got {value!r} ({type(value).__name__})"
            )
        resolved[key] = value
    return resolved


def build_model(
    name: str, in_channels: int = 1, out_channels: int = 1, **options: Any
) -> nn.Module:
    """Build registered model ``name``; its checked signature is kept as ``model.signature``."""
    signature = model_signature(name, in_channels, out_channels, **options)
    model = _MODELS[name].builder(**{k: v for k, v in signature.items() if k != "name"})
    model.signature = signature
    return model


def describe(signature: Mapping[str, Any]) -> str:
    """``name(option=value, ...)`` for a signature from ``model_signature``."""
    options = ", ".join(f"{k}={v!r}" for k, v in signature.items() if k != "name")
    return f"{signature.get('name', '?')}({options})"


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel / FSDP keep the model as ``.module``, torch.compile as ``._orig_mod``.
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def required_divisor(model: nn.Module) -> int:
    """The number the input height and width must be multiples of (``2**depth`` for a U-Net)."""
    return int(_unwrap(model).size_divisor)


def min_input_size(model: nn.Module) -> int:
    """The smallest input height and width ``model`` takes (a multiple of ``required_divisor``).

    ``2**depth`` for a model whose bottleneck may be 1 x 1, more when a layer there needs a
    larger map (spectral pooling in the inception models).
    """
    return int(_unwrap(model).min_size)


def check_input_size(model: nn.Module, size: int | tuple[int, int]) -> None:
    """Raise ``UserError`` naming the nearest valid sizes if ``model`` cannot take ``size``.

    Valid sides are the multiples of ``required_divisor(model)`` from ``min_input_size(model)``
    on, the rule the model's forward pass enforces itself.
    """
    sides = (size, size) if isinstance(size, int) else size
    for side in dict.fromkeys(sides):
        if message := size_error(side, required_divisor(model), min_input_size(model)):
            raise UserError(message)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model.encoder``'s state dict (parameters and BN statistics)."""
    state = _unwrap(model).encoder.state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _examples(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def _mismatches(own: Mapping[str, torch.Tensor], state: Mapping[str, Any]) -> list[str]:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: saved {tuple(getattr(state[k], 'shape', ()))} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {_examples(missing)})")
    if unexpected:
        hint = ""
        if any(k.startswith("encoder.") for k in unexpected):
            hint = "; keys start with 'encoder.': a whole-model state dict? save encoder_state()"
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {_examples(unexpected)}){hint}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches (e.g. {_examples(shapes)})")
    return problems


def load_encoder_state(
    model: nn.Module,
    state: Mapping[str, Any],
    source_name: str = "the file",
    source_signature: Mapping[str, Any] | None = None,
) -> None:
    """Load ``state`` (from ``encoder_state``) into ``model.encoder``, strictly.

    Raises ``UserError`` listing missing and unexpected keys and shape mismatches, naming the
    target model (from ``model.signature``) and, given ``source_signature`` (the
    ``model_signature`` stored with the weights), the source model and the options that differ.
    """
    model = _unwrap(model)
    target = getattr(model, "signature", None) or {"name": type(model).__name__}
    if not isinstance(state, Mapping):
        raise UserError(f"{source_name} holds a {type(state).__name__}, not an encoder state dict")
    problems = _mismatches(model.encoder.state_dict(), state)
    if problems:
        message = f"{source_name} is not an encoder of {describe(target)}: " + "; ".join(problems)
        if source_signature is not None:
            differ = [
                f"{k} ({source_signature[k]!r} vs {v!r})"
                for k, v in target.items()
                if k in source_signature and source_signature[k] != v
            ]
            message += f"; it was saved from {describe(source_signature)}"
            if differ:
                message += ", which differs in " + ", ".join(differ)
        raise UserError(message)
    model.encoder.load_state_dict(state, strict=True)
