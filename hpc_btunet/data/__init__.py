"""Datasets: sources (adapters), packing into WebDataset shards, the manifest and the loader
(and a stock webdataset pipeline over the same shards, :func:`webdataset_pipeline`).

The names below are imported on first use, so that ``pack`` (which needs no torch) starts
without importing torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "DataWait": "loader",
    "ShardStream": "loader",
    "make_loader": "loader",
    "plan_epoch": "loader",
    "Manifest": "manifest",
    "load_manifest": "manifest",
    "verify_shards": "manifest",
    "Entry": "sample",
    "Sample": "sample",
    "Source": "sample",
    "webdataset_pipeline": "wds",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
