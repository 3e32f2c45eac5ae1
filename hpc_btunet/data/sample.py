"""What a dataset source hands to ``pack``: cheap entries first, then samples on demand."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Entry:
    """One sample as listed by a source, before any pixel is read.

    ``key`` is unique within the dataset and contains no ``.`` (WebDataset splits member names at
    the first dot). ``group`` ties samples that must stay on the same side of every split (slices of
    one patient, fields of one slide); a sample alone is its own group.
    """

    key: str
    group: str
    has_mask: bool
    label: str | None = None


@dataclass(frozen=True)
class Sample:
    """A decoded sample: ``image`` uint8 HxW (grayscale) or HxWx3 (RGB); ``mask`` uint8 HxW in {0, 1};
    ``organ`` uint8 HxW in {0, 1}, the region of the organ the image shows (stored as the
    ``KEY.organ.EXT`` member when set; a source that resizes images resizes it like a mask)."""

    key: str
    image: np.ndarray
    mask: np.ndarray | None
    group: str
    label: str | None = None
    extra: dict | None = None  # more of the sample's JSON member (e.g. the padding of --resize pad)
    organ: np.ndarray | None = None


class Source(Protocol):
    """A dataset adapter. ``pack`` calls ``entries()``, then ``validate()``, then ``load()`` per entry."""

    kind: str
    channels: int

    def describe(self) -> dict:
        """JSON-serialisable description recorded in the manifest (kind and options)."""
        ...

    def entries(self) -> list[Entry]:
        """All samples, cheaply (no pixel decoding), in a deterministic order."""
        ...

    def validate(self, entries: list[Entry]) -> None:
        """Raise ``DataError`` naming every unusable file, before anything is written."""
        ...

    def load(self, entry: Entry, image_size: int) -> Sample:
        """The sample resized to ``image_size`` x ``image_size``, image uint8, masks uint8 {0, 1}."""
        ...
