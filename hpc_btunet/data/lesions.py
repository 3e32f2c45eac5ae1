"""The built-in lesion dataset: organ slices labelled normal or abnormal, with hidden lesion masks.

For methods that learn from image-level labels (the contrastive UNet++ pair): each image is one
grey slice through a body, like a CT, MR or ultrasound slice, and its label says whether the organ
in it holds lesions. The lesion mask is stored beside the image for evaluation only; so is the
organ mask, the region a method may be told about (an organ is easy to segment, its lesions are
not: the paper's section 3.2).

What an image holds, drawn in the pixels of a 256 x 256 image and rendered at the requested size
(one seed at a smaller size is the same slice, coarser; masks are rasterised from the geometry at
the pixel centres, before blur and noise, as exact as the nuclei masks):

- **air** outside the body, near black, and a **body** (an ellipse, often cut by the frame) of
  soft tissue: a patchy mixture of two levels (fat and muscle) darker than the organ, with
  sometimes a few bright bone-like blobs;
- the **organ**: a smooth irregular closed shape (an ellipse with low boundary harmonics) covering
  25-60 % of the image, with its own brightness per image, a parenchyma texture (correlated noise
  of a grain per scanner), a sharp or soft boundary, sometimes a thin capsule, and 2-6 **vessels**
  (curving tubes, darker or brighter than the parenchyma): normal anatomy that looks locally
  like a thin lesion;
- in an **abnormal** image, 1-3 **lesions** inside the organ: irregular ellipses of radius 3-25
  pixels (log-uniform: as many small ones as large), hypo- or hyper-intense by 5-45 % of the
  organ's level (log-uniform: many are faint, below the noise of a single pixel), each with its
  own texture and edge (sharp to soft), a quarter with an enhancing rim; a normal image has none;
- over everything: a smooth multiplicative bias field (MR inhomogeneity), an optical blur, and
  noise: Gaussian, plus multiplicative speckle for ultrasound-like scanners.

Images of one group (a patient on one scanner) share the scanner's appearance (``ScanStyle``);
the anatomy, the organ's brightness and the lesions are drawn per image. No global threshold
finds the lesions: their intensities overlap the parenchyma's texture, the vessels, the other
tissues and the bias field (tests/test_lesions.py measures the best threshold's Dice).

A lesion always covers at least one pixel of the packed image: its axes are widened to one
output pixel when the image is small, its centre lies deep enough inside the organ for the pixel
nearest to it to be organ, and its mask is cut to the organ's. So an ``abnormal`` label never
comes with an empty mask, and every lesion pixel is an organ pixel.

Labels are not drawn by coin flips: image ``i`` is abnormal when ``frac(u + i * g) < f`` (``g``
the golden ratio's fractional part, ``u`` drawn from the seed, ``f`` the abnormal fraction), so any
run of consecutive images holds the fraction ``f`` of abnormal ones to within about 2 images, and
image ``i``'s label does not depend on how many images are packed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hpc_btunet.data.sample import Entry, Sample
from hpc_btunet.data.synthetic import check_counts
from hpc_btunet.errors import UserError

REFERENCE_SIZE = 256  # lengths are pixels of an image this size
MIN_SIZE = 32  # smaller images cannot keep the smallest lesions inside the organ's pixels
LABELS = ("abnormal", "normal")
LESION_RADIUS = (3.0, 25.0)  # mean radius of a lesion, reference pixels
ORGAN_AREA = (0.25, 0.6)  # fraction of the image the organ covers
_IMAGE_STREAM, _STYLE_STREAM, _LABEL_STREAM = 0, 1, 2
_GOLDEN = 0.6180339887498949
_DEPTH_MARGIN = 8.0  # reference pixels between a lesion's reach and the organ's boundary


@dataclass(frozen=True)
class ScanStyle:
    """What a scanner (and a patient) give every image of a group; lengths in reference pixels,
    intensities as fractions of full scale (255)."""

    blur: float  # sigma of the point spread function
    noise: float  # std of the additive Gaussian noise
    speckle: float  # weight of multiplicative speckle (0: none; ultrasound-like when large)
    speckle_grain: float  # correlation length of the speckle
    texture: float  # parenchyma texture, relative std of the organ's level
    grain: float  # correlation length of the parenchyma texture
    bias: float  # amplitude of the smooth multiplicative bias field
    tissue: float  # soft tissue's level relative to the organ's
    air: float  # level outside the body


def sample_style(rng: np.random.Generator) -> ScanStyle:
    """A random scanner appearance; ``rng`` is advanced."""
    ultrasound = rng.random() < 0.3
    return ScanStyle(
        blur=float(rng.uniform(0.5, 1.6)),
        noise=float(np.exp(rng.uniform(np.log(0.008), np.log(0.04)))),
        speckle=float(rng.uniform(0.25, 0.5) if ultrasound else rng.uniform(0, 0.08)),
        speckle_grain=float(rng.uniform(0.8, 2.0)),
        texture=float(rng.uniform(0.04, 0.14)),
        grain=float(rng.uniform(1.2, 4.5)),
        bias=float(rng.uniform(0.05, 0.3)),
        tissue=float(rng.uniform(0.4, 0.8)),
        air=float(rng.uniform(0.01, 0.07)),
    )


@dataclass(frozen=True)
class Blob:
    """A smooth irregular closed shape: an ellipse whose radius is modulated by harmonics 2, 3, ...
    of the polar angle. Reference pixels; ``angle`` in radians."""

    centre: tuple[float, float]  # (x, y)
    axes: tuple[float, float]
    angle: float
    amplitudes: tuple[float, ...]
    phases: tuple[float, ...]

    @property
    def reach(self) -> float:
        """No point of the shape is farther than this from its centre."""
        return max(self.axes) * (1 + float(np.abs(self.amplitudes).sum()))

    @property
    def radius(self) -> float:
        """The radius of the circle of the ellipse's area."""
        return float(np.sqrt(self.axes[0] * self.axes[1]))

    def level(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Below 1 inside the shape, 1 on its boundary, growing with the distance outside."""
        dx, dy = x - self.centre[0], y - self.centre[1]
        cos, sin = np.cos(self.angle), np.sin(self.angle)
        u = (dx * cos + dy * sin) / self.axes[0]
        v = (dy * cos - dx * sin) / self.axes[1]
        phi = np.arctan2(v, u)
        edge = np.ones_like(phi)
        for k, (amplitude, phase) in enumerate(zip(self.amplitudes, self.phases, strict=True)):
            edge += amplitude * np.cos((k + 2) * phi + phase)
        return np.hypot(u, v) / edge

    def widened(self, least: float) -> Blob:
        """The same shape with no axis shorter than ``least`` (its harmonics' dents included)."""
        shortest = min(self.axes) * (1 - float(np.abs(self.amplitudes).sum()))
        if shortest >= least:
            return self
        grow = least / shortest
        return Blob(self.centre, tuple(a * grow for a in self.axes), self.angle,
                    self.amplitudes, self.phases)  # fmt: skip


def _blob(rng, centre, radius: float, elongation: float, irregularity: float, orders: int) -> Blob:
    """A random ``Blob`` of mean radius ``radius``; the harmonics' amplitudes fall as 1/order and
    sum to at most ``irregularity`` (the shape stays star-shaped and smooth)."""
    stretch = rng.uniform(1, elongation)
    amplitudes = rng.normal(0, 1, orders) / np.arange(2, orders + 2)
    amplitudes *= irregularity * rng.uniform(0.3, 1) / max(np.abs(amplitudes).sum(), 1e-9)
    return Blob(
        centre=(float(centre[0]), float(centre[1])),
        axes=(radius * np.sqrt(stretch), radius / np.sqrt(stretch)),
        angle=float(rng.uniform(0, np.pi)),
        amplitudes=tuple(float(a) for a in amplitudes),
        phases=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, orders)),
    )


@dataclass(frozen=True)
class Lesion:
    shape: Blob
    contrast: float  # relative to the organ's level: negative hypo-, positive hyper-intense
    texture: float  # relative std of the lesion's own texture
    grain: float  # its correlation length
    softness: float  # width of its edge, reference pixels (0: sharp)
    rim: float  # contrast of an enhancing rim (0: none)


@dataclass(frozen=True)
class Scene:
    """The geometry and levels of one slice, independent of the size it is rendered at."""

    body: Blob
    organ: Blob
    level: float  # the organ's brightness
    softness: float  # width of the organ's edge
    capsule: float  # contrast of a thin capsule along the organ's edge (0: none)
    vessels: list[tuple[np.ndarray, float, float]]  # (polyline N x 2, radius, contrast)
    bones: list[tuple[Blob, float]]
    lesions: list[Lesion]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference coordinates of the pixel centres of a ``size`` x ``size`` image."""
    axis = (np.arange(size) + 0.5) * (REFERENCE_SIZE / size)
    return axis[None, :], axis[:, None]


def _organ(rng: np.random.Generator) -> Blob:
    """An organ of 25-60 % of the image, kept inside the frame."""
    shape = _blob(rng, (0, 0), 1.0, 1.7, 0.35, 5)
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    unit = shape.level(np.cos(angles), np.sin(angles))  # radius r on a ray: level = r * unit
    area = 0.5 * np.mean(1 / unit**2) * 2 * np.pi  # of the unit shape
    target = rng.uniform(*ORGAN_AREA) * REFERENCE_SIZE**2
    scale = np.sqrt(target / area)
    xs, ys = np.cos(angles) * scale / unit, np.sin(angles) * scale / unit
    room = REFERENCE_SIZE - 8
    shrink = min(1.0, room / np.ptp(xs), room / np.ptp(ys))
    xs, ys, scale = xs * shrink, ys * shrink, scale * shrink
    low = 4 - np.array([xs.min(), ys.min()])
    high = REFERENCE_SIZE - 4 - np.array([xs.max(), ys.max()])
    centre = np.clip(REFERENCE_SIZE / 2 + rng.normal(0, 14, 2), low, high)
    return Blob(tuple(centre), tuple(a * scale for a in shape.axes), shape.angle,
                shape.amplitudes, shape.phases)  # fmt: skip


def _depth(organ: Blob) -> np.ndarray:
    """Distance of each reference pixel centre to the organ's outside (0 outside)."""
    x, y = _grid(REFERENCE_SIZE)
    return ndimage.distance_transform_edt(organ.level(x, y) < 1)


def _vessel(rng: np.random.Generator, start: np.ndarray) -> np.ndarray:
    """A smooth random walk of 4-pixel steps: a vessel's centre line."""
    heading, turn = rng.uniform(0, 2 * np.pi), rng.normal(0, 0.05)
    points = [start]
    for _ in range(rng.integers(8, 30)):
        turn = 0.8 * turn + rng.normal(0, 0.08)
        heading += turn
        points.append(points[-1] + 4 * np.array([np.cos(heading), np.sin(heading)]))
    return np.array(points)


def _lesions(rng: np.random.Generator, organ: Blob, depth: np.ndarray) -> list[Lesion]:
    """1-3 lesions with centres deep enough in the organ for their whole reach (and a margin)."""
    count = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    lesions: list[Lesion] = []
    for _ in range(count):
        radius = float(np.exp(rng.uniform(*np.log(LESION_RADIUS))))
        shape = _blob(rng, (0, 0), radius, 1.8, rng.uniform(0.05, 0.25), 4)
        room = np.argwhere(depth >= shape.reach + _DEPTH_MARGIN)
        while not len(room):  # a lesion too large for a thin organ shrinks until it fits
            shape = Blob(shape.centre, tuple(a * 0.8 for a in shape.axes), shape.angle,
                         shape.amplitudes, shape.phases)  # fmt: skip
            room = np.argwhere(depth >= shape.reach + _DEPTH_MARGIN)
        row, col = room[rng.integers(len(room))] + rng.uniform(0, 1, 2)
        shape = Blob((float(col), float(row)), shape.axes, shape.angle, shape.amplitudes,
                     shape.phases)  # fmt: skip
        sign = -1 if rng.random() < 0.6 else 1
        lesions.append(
            Lesion(
                shape=shape,
                contrast=float(sign * np.exp(rng.uniform(np.log(0.05), np.log(0.45)))),
                texture=float(rng.uniform(0.02, 0.3)),
                grain=float(rng.uniform(0.8, 5.0)),
                softness=float(rng.choice([0.0, rng.uniform(0.5, 0.5 * radius)])),
                rim=float(rng.uniform(0.1, 0.35) if rng.random() < 0.25 else 0.0),
            )
        )
    return lesions


def draw_scene(rng: np.random.Generator, abnormal: bool) -> Scene:
    """A random slice's geometry and levels; ``rng`` is advanced."""
    organ = _organ(rng)
    margin = rng.uniform(10, 70)
    body = Blob(organ.centre + rng.normal(0, 10, 2), (max(organ.axes) + margin,
                min(organ.axes) + margin + rng.uniform(0, 40)), rng.uniform(0, np.pi),
                (0.0,), (0.0,))  # fmt: skip
    depth = _depth(organ)
    inner = np.argwhere(depth >= 10)
    vessels = []
    for _ in range(rng.integers(2, 7)):
        row, col = inner[rng.integers(len(inner))]
        line = _vessel(rng, np.array([col, row], float))
        vessels.append((line, float(rng.uniform(0.8, 3.5)), float(rng.uniform(0.08, 0.3))))
    sign = -1 if rng.random() < 0.5 else 1  # all vessels of a slice darker, or all brighter
    vessels = [(line, radius, sign * contrast) for line, radius, contrast in vessels]
    bones = []
    for _ in range(rng.poisson(0.8)):  # in the body, outside the organ (or none if no room)
        centre = rng.uniform(0, REFERENCE_SIZE, (20, 2))
        ok = (body.level(*centre.T) < 0.95) & (organ.level(*centre.T) > 1.15)
        if ok.any():
            shape = _blob(rng, centre[ok.argmax()], rng.uniform(5, 15), 3, 0.2, 3)
            bones.append((shape, float(rng.uniform(0.6, 1))))
    level = float(rng.uniform(0.3, 0.65))
    softness = float(rng.choice([0.0, rng.uniform(1, 6)]))
    capsule = float(rng.uniform(-0.2, 0.25) if rng.random() < 0.3 else 0.0)
    lesions = _lesions(rng, organ, depth) if abnormal else []
    return Scene(body, organ, level, softness, capsule, vessels, bones, lesions)


def _field(rng: np.random.Generator, size: int, grain: float) -> np.ndarray:
    """Correlated Gaussian noise of unit std and correlation length ``grain`` (output pixels)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), max(grain, 0.3))
    return field / (field.std() + 1e-9)


def _inside(shape: Blob, x, y, softness: float) -> np.ndarray:
    """The shape's weight per pixel: 1 inside, 0 outside, a ramp ``softness`` wide (reference
    pixels, along the radius) across the boundary."""
    level = shape.level(x, y)
    if softness <= 0:
        return (level < 1).astype(float)
    return np.clip(0.5 + (1 - level) * shape.radius / softness, 0, 1)


def _tube(line: np.ndarray, radius: float, x, y) -> np.ndarray:
    """A Gaussian profile of width ``radius`` around the polyline ``line``."""
    distance = np.full(np.broadcast_shapes(x.shape, y.shape), np.inf)
    for (x0, y0), (x1, y1) in zip(line[:-1], line[1:], strict=True):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((x - x0) * dx + (y - y0) * dy) / (dx * dx + dy * dy), 0, 1)
        distance = np.minimum(distance, np.hypot(x - x0 - t * dx, y - y0 - t * dy))
    return np.exp(-((distance / radius) ** 2))


def render(scene: Scene, style: ScanStyle, size: int, rng: np.random.Generator):
    """``(image, lesion mask, organ mask)`` of ``scene`` at ``size`` x ``size``: uint8, the masks
    in {0, 1}; ``rng`` draws the textures and the noise."""
    scale = size / REFERENCE_SIZE
    x, y = _grid(size)
    organ_mask = scene.organ.level(x, y) < 1
    lesion_mask = np.zeros((size, size), bool)

    mix = _field(rng, size, 10 * scale) > rng.uniform(-0.5, 0.8)  # fat and muscle patches
    tissue = scene.level * style.tissue * np.where(mix, 1.0, rng.uniform(0.55, 0.85))
    tissue = ndimage.gaussian_filter(tissue, 3 * scale) * (1 + 0.5 * style.texture * _field(
        rng, size, style.grain * scale))  # fmt: skip
    image = style.air + (tissue - style.air) * _inside(scene.body, x, y, 2.0)
    for bone, brightness in scene.bones:
        weight = _inside(bone, x, y, 1.5) * (1 - _inside(scene.organ, x, y, 4.0))
        image += (brightness - image) * weight

    organ = scene.level * (1 + style.texture * _field(rng, size, style.grain * scale))
    for line, radius, contrast in scene.vessels:
        organ += scene.level * contrast * _tube(line, radius, x, y)
    for lesion in scene.lesions:
        # a lesion is widened to one output pixel, so that the pixel nearest its centre is in it
        shape = lesion.shape.widened(1 / scale)
        weight = _inside(shape, x, y, lesion.softness)
        own = _field(rng, size, lesion.grain * scale)
        inner = scene.level * (1 + lesion.contrast) * (1 + lesion.texture * own)
        if lesion.rim:
            inner += scene.level * lesion.rim * np.exp(-(((1 - shape.level(x, y)) * 4) ** 2))
        organ += (inner - organ) * weight
        lesion_mask |= shape.level(x, y) < 1
    if scene.capsule:
        edge = np.abs(1 - scene.organ.level(x, y)) * scene.organ.radius
        organ += scene.level * scene.capsule * np.exp(-((edge / 1.5) ** 2))
    image += (organ - image) * _inside(scene.organ, x, y, scene.softness)

    coeffs = rng.normal(0, 1, 5)
    u, v = (x / REFERENCE_SIZE - 0.5) * 2, (y / REFERENCE_SIZE - 0.5) * 2
    bias = coeffs[0] * u + coeffs[1] * v + coeffs[2] * u * u + coeffs[3] * u * v + coeffs[4] * v * v
    image = image * (1 + style.bias * bias / (np.abs(bias).max() + 1e-9))
    image = ndimage.gaussian_filter(image, style.blur * scale)
    if style.speckle:
        grain = style.speckle_grain * scale
        real, imag = (
            ndimage.gaussian_filter(rng.standard_normal((size, size)), grain) for _ in "ri"
        )
        amplitude = np.hypot(real, imag)
        image *= 1 - style.speckle + style.speckle * amplitude / amplitude.mean()
    image += style.noise * rng.standard_normal((size, size))
    image = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
    return image, (lesion_mask & organ_mask).astype(np.uint8), organ_mask.astype(np.uint8)


def generate_lesion_image(
    seed: int | Sequence[int],
    size: int = 256,
    abnormal: bool = True,
    style: ScanStyle | None = None,
    *,
    return_scene: bool = False,
) -> tuple:
    """One slice, a pure function of the arguments: ``(image, lesion mask, organ mask)``, image
    uint8 ``(size, size)``, masks uint8 in {0, 1} (the lesion mask all zeros unless ``abnormal``);
    with ``return_scene`` the :class:`Scene` comes fourth. ``style=None`` draws one from ``seed``."""
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise UserError(
            f"lesion images need --image-size of at least {MIN_SIZE} (the smallest lesions must "
            f"keep a pixel), got {size}: raise it"
        )
    rng = np.random.default_rng(seed)
    style = sample_style(rng) if style is None else style
    scene = draw_scene(rng, abnormal)
    out = render(scene, style, size, rng)
    return (*out, scene) if return_scene else out


def abnormal(indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which of the images ``indices`` are abnormal (the golden-ratio sequence of the module
    docstring)."""
    offset = np.random.default_rng([seed, _LABEL_STREAM]).random()
    return (offset + np.asarray(indices, np.float64) * _GOLDEN) % 1.0 < fraction


class LesionSource:
    """``num_images`` organ slices, a fraction ``abnormal_fraction`` of them with lesions;
    consecutive ``group_size`` images share a scanner style (a patient: the split keeps them
    together). Image ``i`` depends only on (seed, i, its group, the fraction, the image size)."""

    kind = "synthetic"
    task = "lesion"
    channels = 1
    min_image_size = MIN_SIZE  # pack refuses a smaller --image-size before writing anything

    def __init__(self, num_images: int, seed: int = 0, group_size: int = 1,
                 abnormal_fraction: float = 0.5) -> None:  # fmt: skip
        check_counts(num_images, group_size)
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"synthetic seed must be a non-negative integer, got {seed!r}")
        if (
            isinstance(abnormal_fraction, bool)
            or not isinstance(abnormal_fraction, int | float)
            or not 0 < abnormal_fraction < 1
        ):
            raise UserError(
                f"--abnormal-fraction must lie strictly between 0 and 1 (both classes are needed), "
                f"got {abnormal_fraction!r}: e.g. 0.5"
            )
        self.num_images, self.seed, self.group_size = num_images, seed, group_size
        self.abnormal_fraction = float(abnormal_fraction)

    def describe(self) -> dict:
        """Kind, task and options, for the manifest."""
        options = ("num_images", "channels", "seed", "group_size", "abnormal_fraction")
        return {"kind": self.kind, "task": self.task, **{k: getattr(self, k) for k in options}}

    def entries(self) -> list[Entry]:
        """``lesion-000000`` ... in order, labelled; ``patient-`` groups of ``group_size``."""
        flags = abnormal(np.arange(self.num_images), self.abnormal_fraction, self.seed)
        return [
            Entry(
                key=f"lesion-{i:06d}",
                group=f"patient-{i // self.group_size:06d}",
                has_mask=True,
                label=LABELS[0] if flag else LABELS[1],
            )
            for i, flag in enumerate(flags.tolist())
        ]

    def validate(self, entries: list[Entry]) -> None:
        """Nothing to check: the options were checked when the source was built."""

    def style(self, group_index: int) -> ScanStyle:
        """The scanner appearance shared by the images of one group."""
        return sample_style(np.random.default_rng([self.seed, _STYLE_STREAM, group_index]))

    def load(self, entry: Entry, image_size: int) -> Sample:
        """Generate the entry's slice at ``image_size`` directly (no resampling)."""
        index = int(entry.key.removeprefix("lesion-"))
        image, lesions, organ = generate_lesion_image(
            (self.seed, _IMAGE_STREAM, index),
            image_size,
            entry.label == LABELS[0],
            self.style(index // self.group_size),
        )
        return Sample(entry.key, image, lesions, entry.group, entry.label, organ=organ)


__all__ = ["LesionSource", "ScanStyle", "abnormal", "draw_scene", "generate_lesion_image"]
