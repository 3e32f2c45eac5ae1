"""Datasets: sources (adapters), packing into WebDataset shards, the manifest and the loader."""

from hpc_btunet.data.loader import DataWait, ShardStream, make_loader, plan_epoch
from hpc_btunet.data.manifest import Manifest, load_manifest, verify_shards
from hpc_btunet.data.sample import Entry, Sample, Source

__all__ = [
    "DataWait",
    "Entry",
    "Manifest",
    "Sample",
    "ShardStream",
    "Source",
    "load_manifest",
    "make_loader",
    "plan_epoch",
    "verify_shards",
]
