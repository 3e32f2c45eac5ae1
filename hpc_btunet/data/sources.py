"""Registry of dataset sources for ``pack``: a name maps to an adapter class and its options.

Adapters for public datasets (KDSB18, ISIC18, BUSI, BUSIS, BraTS18) register here beside the
built-in synthetic datasets (``--task nuclei``: fluorescence nuclei with masks; ``--task lesion``:
organ slices labelled normal/abnormal, with lesion and organ masks) and the generic
images/ + masks/ folder.
"""

from __future__ import annotations

from hpc_btunet.data.sample import Source
from hpc_btunet.errors import UserError

TASKS = ("nuclei", "lesion")  # the built-in synthetic datasets; the first is the default
_SYNTHETIC_ONLY = ("task", "abnormal_fraction")  # options of --source synthetic alone


def _synthetic(root, num_images, channels, seed, group_size, task=None, abnormal_fraction=None,
               **_):  # fmt: skip
    if root is not None:
        raise UserError(
            "--root is not used with --source synthetic: drop it or use --source folder"
        )
    task = TASKS[0] if task is None else task
    if task not in TASKS:
        raise UserError(
            f"unknown --task {task!r} for --source synthetic: choose {' or '.join(TASKS)}"
        )
    if task == "lesion":
        from hpc_btunet.data.lesions import LesionSource

        if channels not in ("auto", 1, "1"):
            raise UserError(
                f"--task lesion makes grey images: drop --channels {channels} (or give 1)"
            )
        fraction = 0.5 if abnormal_fraction is None else abnormal_fraction
        return LesionSource(num_images, seed, group_size, abnormal_fraction=fraction)
    if abnormal_fraction is not None:
        raise UserError(
            "--abnormal-fraction is an option of --task lesion: drop it, or add --task lesion"
        )
    from hpc_btunet.data.synthetic import SyntheticSource

    return SyntheticSource(
        num_images=num_images,
        channels=1 if channels == "auto" else int(channels),
        seed=seed,
        group_size=group_size,
    )


def _folder(root, channels, unlabelled, mask_suffix, group_regex, **_):
    from hpc_btunet.data.folder import FolderSource

    if root is None:
        raise UserError("--source folder needs --root DIR (a folder holding images/ and masks/)")
    return FolderSource(
        root,
        channels=channels if channels == "auto" else int(channels),
        unlabelled=unlabelled,
        mask_suffix=mask_suffix,
        group_regex=group_regex,
    )


def _public(name):
    def factory(root, channels, resize="squash", **_):
        from hpc_btunet.data.public import ADAPTERS

        if root is None:
            raise UserError(
                f"--source {name} needs --root DIR (where the downloaded dataset was unpacked)"
            )
        return ADAPTERS[name](root, channels=channels if channels == "auto" else int(channels),
                              resize=resize)  # fmt: skip

    return factory


def _volume(name):
    def factory(root, channels, resize="squash", seed=0, modality=None, target=None,
                slices="lesion", clip="0.5,99.5", **_):  # fmt: skip
        from hpc_btunet.data.volume import ADAPTERS

        if root is None:
            raise UserError(
                f"--source {name} needs --root DIR (where the downloaded dataset was unpacked)"
            )
        return ADAPTERS[name](root, modality=modality, target=target, slices=slices, clip=clip,
                              channels=channels, resize=resize, seed=seed)  # fmt: skip

    return factory


SOURCES = {
    "synthetic": _synthetic,
    "folder": _folder,
    **{name: _public(name) for name in ("kdsb18", "isic2018", "busi", "busis")},
    **{name: _volume(name) for name in ("brats", "decathlon")},
}


def build_source(name: str, **options) -> Source:
    """Build the source ``name`` from the ``pack`` options (each adapter takes what it uses)."""
    try:
        factory = SOURCES[name]
    except KeyError:
        raise UserError(f"unknown --source {name!r}: choose one of {', '.join(SOURCES)}") from None
    given = [k for k in _SYNTHETIC_ONLY if options.get(k) is not None]
    if given and name != "synthetic":
        flag = "--" + given[0].replace("_", "-")
        raise UserError(
            f"{flag} is an option of --source synthetic, not of --source {name}: drop it, or "
            "pack the built-in dataset (--source synthetic)"
        )
    return factory(**options)
