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
_PUBLIC = ("kdsb18", "isic2018", "busi", "busis")
_VOLUMES = ("brats", "decathlon")
# The options of ``pack`` that only some sources read, and which: one given to any other source
# is refused (it would be ignored silently). ``channels`` and ``seed`` apply to every source.
OPTION_SOURCES = {
    "root": ("folder", *_PUBLIC, *_VOLUMES),
    "num_images": ("synthetic",),
    "group_size": ("synthetic",),
    "task": ("synthetic",),
    "abnormal_fraction": ("synthetic",),
    "unlabelled": ("folder",),
    "mask_suffix": ("folder",),
    "group_regex": ("folder",),
    "resize": (*_PUBLIC, *_VOLUMES),
    "modality": _VOLUMES,
    "target": _VOLUMES,
    "slices": _VOLUMES,
    "clip": _VOLUMES,
}


def _synthetic(root, num_images, channels, seed, group_size, task=None, abnormal_fraction=None,
               **_):  # fmt: skip
    num_images = 200 if num_images is None else num_images
    group_size = 1 if group_size is None else group_size
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


def _folder(root, channels, unlabelled=False, mask_suffix=None, group_regex=None, **_):
    from hpc_btunet.data.folder import FolderSource

    if root is None:
        raise UserError("--source folder needs --root DIR (a folder holding images/ and masks/)")
    return FolderSource(
        root,
        channels=channels if channels == "auto" else int(channels),
        unlabelled=bool(unlabelled),
        mask_suffix=mask_suffix or "",
        group_regex=group_regex,
    )


def _public(name):
    def factory(root, channels, resize=None, **_):
        from hpc_btunet.data.public import ADAPTERS

        resize = resize or "squash"

        if root is None:
            raise UserError(
                f"--source {name} needs --root DIR (where the downloaded dataset was unpacked)"
            )
        return ADAPTERS[name](root, channels=channels if channels == "auto" else int(channels),
                              resize=resize)  # fmt: skip

    return factory


def _volume(name):
    def factory(root, channels, resize=None, seed=0, modality=None, target=None, slices=None,
                clip=None, **_):  # fmt: skip
        from hpc_btunet.data.volume import ADAPTERS

        resize, slices, clip = resize or "squash", slices or "lesion", clip or "0.5,99.5"
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
    **{name: _public(name) for name in _PUBLIC},
    **{name: _volume(name) for name in _VOLUMES},
}


def build_source(name: str, **options) -> Source:
    """Build the source ``name`` from the ``pack`` options (each adapter takes what it uses).

    An option is given when it is not None (or False, for a switch); one that the source does
    not read (:data:`OPTION_SOURCES`) is refused, naming the sources that do."""
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
    for option, users in OPTION_SOURCES.items():
        if options.get(option) not in (None, False) and name not in users:
            flag = "--" + option.replace("_", "-")
            raise UserError(
                f"{flag} is not used with --source {name}: drop it (it is an option of --source "
                f"{', '.join(users)})"
            )
    return factory(**options)
