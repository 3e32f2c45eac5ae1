"""NIfTI phantoms in the public datasets' layouts, for the tests and ``bench/pack_volumes.py``.

A subject is a head-like ellipsoid of tissue with per-modality contrast and noise, holding (for
most subjects) an ellipsoidal tumour with BraTS's labels: necrotic core 1 inside enhancing
tumour 4 inside oedema 2. Files are written as BraTS and the Medical Segmentation Decathlon
ship them: int16 images and uint8 label maps, gzip-compressed, with an LPS-like affine (1 mm
voxels), so that reorientation is exercised.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

BRATS_SHAPE = (240, 240, 155)
_MODALITY_CONTRAST = {"t1": (1.0, 0.7), "t1ce": (1.0, 1.6), "t2": (0.8, 1.8), "flair": (0.9, 2.2)}


def affine(shape: tuple[int, ...]) -> np.ndarray:
    """BraTS's orientation: x to the left, y to the posterior, z up (LPS), 1 mm voxels."""
    a = np.diag([-1.0, -1.0, 1.0, 1.0])
    a[:3, 3] = [shape[0] / 2, shape[1] / 2, -shape[2] / 2]
    return a


def subject_volumes(
    shape: tuple[int, int, int], rng: np.random.Generator, tumour: bool = True
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({modality: int16 volume}, uint8 label map) of one phantom subject."""
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    centre = np.array(shape) / 2 + rng.uniform(-0.05, 0.05, 3) * np.array(shape)
    radii = np.array(shape) * rng.uniform(0.33, 0.42, 3)
    head = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)) <= 1
    seg = np.zeros(shape, np.uint8)
    if tumour:
        t_centre = centre + rng.uniform(-0.3, 0.3, 3) * radii
        t_radii = radii * rng.uniform(0.15, 0.3, 3)
        d = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, t_centre, t_radii, strict=True))
        seg[(d <= 1) & head] = 2
        seg[(d <= 0.45) & head] = 4
        seg[(d <= 0.15) & head] = 1
    images = {}
    for mod, (tissue, lesion) in _MODALITY_CONTRAST.items():
        base = 400 * tissue + rng.normal(0, 40, shape).astype(np.float32)
        volume = np.where(head, base, 0)
        volume[seg > 0] *= lesion
        images[mod] = volume.clip(0, 32767).astype(np.int16)
    return images, seg


def _save(array: np.ndarray, path: Path) -> None:
    import nibabel

    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(nibabel.Nifti1Image(array, affine(array.shape[:3])), path)


def write_brats_tree(
    root: str | Path,
    subjects: int = 4,
    shape: tuple[int, int, int] = BRATS_SHAPE,
    layout: str = "2018",
    seed: int = 0,
    healthy: int = 0,
) -> list[str]:
    """Write a BraTS tree: ``layout="2018"`` puts subjects under ``HGG/`` and ``LGG/`` (alternating),
    ``"flat"`` names them ``BraTS2021_<n>`` under the root. The last ``healthy`` subjects have no
    tumour. Returns the subject names."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(subjects):
        if layout == "2018":
            grade = "HGG" if i % 2 == 0 else "LGG"
            name = f"Brats18_{grade}_{i:03d}"
            folder = root / grade / name
        else:
            name = f"BraTS2021_{i:05d}"
            folder = root / name
        images, seg = subject_volumes(shape, rng, tumour=i < subjects - healthy)
        for mod, volume in images.items():
            _save(volume, folder / f"{name}_{mod}.nii.gz")
        _save(seg, folder / f"{name}_seg.nii.gz")
        names.append(name)
    return names


def write_decathlon_tree(
    root: str | Path,
    cases: int = 3,
    shape: tuple[int, int, int] = (48, 40, 20),
    modalities: tuple[str, ...] = ("FLAIR", "T1w", "t1gd", "T2w"),
    per_channel_files: bool = False,
    seed: int = 0,
) -> list[str]:
    """Write a Decathlon task (``Task01_BrainTumour``-like: 4-D images, labels 1-3) or, with
    ``per_channel_files``, nnU-Net v2's ``<case>_<4 digits>`` files. Returns the case names."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    names = []
    training = []
    mods = ("flair", "t1", "t1ce", "t2")
    for i in range(cases):
        name = f"BRATS_{i + 1:03d}"
        images, seg = subject_volumes(shape, rng)
        seg = np.select([seg == 2, seg == 1, seg == 4], [1, 2, 3], 0).astype(np.uint8)
        stack = [images[mods[c % 4]] for c in range(len(modalities))]
        if per_channel_files:
            for c, volume in enumerate(stack):
                _save(volume, root / "imagesTr" / f"{name}_{c:04d}.nii.gz")
        else:
            volume = stack[0] if len(stack) == 1 else np.stack(stack, axis=-1)
            _save(volume, root / "imagesTr" / f"{name}.nii.gz")
        _save(seg, root / "labelsTr" / f"{name}.nii.gz")
        training.append(
            {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
        )
        names.append(name)
    meta = {
        "name": "BRATS",
        "modality": {str(i): m for i, m in enumerate(modalities)},
        "labels": {
            "0": "background",
            "1": "edema",
            "2": "non-enhancing tumor",
            "3": "enhancing tumour",
        },
        "numTraining": cases,
        "training": training,
        "test": [],
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return names
