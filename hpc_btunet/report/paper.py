"""The BT-Unet paper's Table 2, to print beside a study's own results.

Source: N. S. Punn and S. Agarwal, "BT-Unet: A self-supervised learning framework for biomedical
image segmentation using Barlow Twins with U-Net models", Table 2 ("Quantitative comparative
analysis of segmentation models"): precision, Dice and IoU on the test split, per dataset
(labelled fraction), model and BT (N: without, Y: with pre-training). The values are the
paper's, copied as published; the paper gives no spread over folds.
"""

from __future__ import annotations

from hpc_btunet.errors import UserError

# dataset -> (the paper's column title, {(model, "N"|"Y"): (Pr, DC, IoU)})
TABLE2: dict[str, tuple[str, dict[tuple[str, str], tuple[float, float, float]]]] = {
    "kdsb18": (
        "KDSB18 (20%)",
        {
            ("unet", "N"): (0.891, 0.911, 0.904),
            ("unet", "Y"): (0.912, 0.918, 0.908),
            ("attention_unet", "N"): (0.788, 0.824, 0.811),
            ("attention_unet", "Y"): (0.826, 0.878, 0.877),
            ("inception_unet", "N"): (0.809, 0.873, 0.865),
            ("inception_unet", "Y"): (0.923, 0.917, 0.908),
            ("rca_iunet", "N"): (0.789, 0.852, 0.839),
            ("rca_iunet", "Y"): (0.931, 0.921, 0.913),
        },
    ),
    "busis": (
        "BUSIS (20%)",
        {
            ("unet", "N"): (0.000, 0.000, 0.000),
            ("unet", "Y"): (0.823, 0.676, 0.547),
            ("attention_unet", "N"): (0.000, 0.000, 0.000),
            ("attention_unet", "Y"): (0.639, 0.662, 0.597),
            ("inception_unet", "N"): (0.749, 0.789, 0.731),
            ("inception_unet", "Y"): (0.771, 0.807, 0.769),
            ("rca_iunet", "N"): (0.738, 0.794, 0.756),
            ("rca_iunet", "Y"): (0.833, 0.818, 0.771),
        },
    ),
    "isic2018": (
        "ISIC18 (10%)",
        {
            ("unet", "N"): (0.894, 0.803, 0.797),
            ("unet", "Y"): (0.880, 0.791, 0.789),
            ("attention_unet", "N"): (0.885, 0.811, 0.806),
            ("attention_unet", "Y"): (0.875, 0.811, 0.800),
            ("inception_unet", "N"): (0.871, 0.813, 0.804),
            ("inception_unet", "Y"): (0.903, 0.830, 0.819),
            ("rca_iunet", "N"): (0.883, 0.828, 0.813),
            ("rca_iunet", "Y"): (0.918, 0.833, 0.821),
        },
    ),
    "brats": (
        "BraTS18 (10%)",
        {
            ("unet", "N"): (0.518, 0.543, 0.423),
            ("unet", "Y"): (0.515, 0.538, 0.419),
            ("attention_unet", "N"): (0.600, 0.573, 0.543),
            ("attention_unet", "Y"): (0.590, 0.563, 0.527),
            ("inception_unet", "N"): (0.622, 0.599, 0.537),
            ("inception_unet", "Y"): (0.650, 0.628, 0.563),
            ("rca_iunet", "N"): (0.664, 0.689, 0.628),
            ("rca_iunet", "Y"): (0.701, 0.734, 0.673),
        },
    ),
}
CITATION = (
    "Punn & Agarwal, BT-Unet: A self-supervised learning framework for biomedical image "
    "segmentation using Barlow Twins with U-Net models, Table 2"
)


def paper_dataset(name: str | None) -> str | None:
    """The canonical dataset name of ``--paper``, or a ``UserError`` listing the valid ones."""
    if name is None:
        return None
    key = name.strip().lower()
    aliases = {"isic18": "isic2018", "brats18": "brats", "brats2018": "brats"}
    key = aliases.get(key, key)
    if key not in TABLE2:
        raise UserError(
            f"--paper {name!r}: the paper's Table 2 has {', '.join(TABLE2)} (the pack --source names)"
        )
    return key


def paper_row(dataset: str, model: str, bt: str) -> tuple[float, float, float] | None:
    return TABLE2[dataset][1].get((model, bt))
