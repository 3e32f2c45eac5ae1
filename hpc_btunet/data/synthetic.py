"""The built-in dataset: fluorescence-microscopy-like nuclei with exact masks, generated on demand.

A scene is drawn in the pixel units of a 256 x 256 image and rendered at the requested size, so one
seed at a smaller size looks like the same field of view resized. The mask is rasterised from the
geometry before blur and noise; segmenting it is meant to need local context (uneven illumination,
dim nuclei, out-of-focus glow), not a global threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from hpc_btunet.data.sample import Entry, Sample
from hpc_btunet.errors import UserError

REFERENCE_SIZE = 256  # style lengths are pixels of an image this size
MIN_SIZE = 32
# Tags in the middle of the seed sequence keep the image and style streams apart: numpy ignores
# trailing zeros, so [seed, i] and [seed] would otherwise collide.
_IMAGE_STREAM, _STYLE_STREAM = 0, 1
# Base colours of common nuclear stains (Hoechst/DAPI, H2B-GFP, propidium iodide), with cross-talk.
_STAINS = ((0.12, 0.35, 1.0), (0.25, 1.0, 0.3), (1.0, 0.25, 0.45))


@dataclass(frozen=True)
class NucleiStyle:
    """Appearance shared by the fields of view of one slide.

    Lengths are pixels of a 256 x 256 image; intensities are fractions of full scale (255).
    """

    density: float  # expected nuclei per image
    radius: float  # mean nucleus radius
    elongation: float  # largest ratio of long to short axis
    irregularity: float  # amplitude of the boundary harmonics, relative to the radius
    brightness: tuple[float, float]  # peak intensity of the dimmest and the brightest nucleus
    texture: float  # chromatin contrast inside nuclei
    background: float  # dark level: camera offset plus autofluorescence
    haze: float  # peak of the smooth out-of-focus glow over the background
    vignetting: float  # fraction of the illumination lost far from the optical centre
    out_of_focus: float  # expected blurred nuclei from other focal planes (never in the mask)
    blur: float  # sigma of the optical blur
    photons: float  # photons collected at full scale; sets the shot noise
    read_noise: float  # camera read noise, std at full scale
    stain: tuple[float, float, float]  # RGB colour of the nuclear stain (channels=3)
    autofluorescence: tuple[float, float, float]  # RGB colour of the background (channels=3)


def sample_style(rng: np.random.Generator) -> NucleiStyle:
    """A random slide appearance; ``rng`` is advanced."""
    dim = rng.uniform(0.08, 0.2)
    stain = np.clip(np.array(_STAINS[rng.integers(len(_STAINS))]) + rng.normal(0, 0.06, 3), 0.03, 1)
    glow = rng.uniform(0.3, 1.0, 3)

    def floats(values: np.ndarray) -> tuple:
        return tuple(float(v) for v in values / values.max())

    return NucleiStyle(
        density=float(np.exp(rng.uniform(np.log(3), np.log(80)))),
        radius=float(rng.uniform(6.5, 13)),
        elongation=float(rng.uniform(1.1, 1.9)),
        irregularity=float(rng.uniform(0.03, 0.1)),
        brightness=(float(dim), float(dim * rng.uniform(3, 6))),
        texture=float(rng.uniform(0.15, 0.45)),
        background=float(rng.uniform(0.02, 0.1)),
        haze=float(rng.uniform(0.08, 0.35)),
        vignetting=float(rng.uniform(0.15, 0.6)),
        out_of_focus=float(rng.uniform(0, 4)),
        blur=float(rng.uniform(0.7, 1.8)),
        photons=float(np.exp(rng.uniform(np.log(150), np.log(1500)))),
        read_noise=float(rng.uniform(0.005, 0.025)),
        stain=floats(stain),
        autofluorescence=floats(glow),
    )


def _draw_nuclei(rng: np.random.Generator, style: NucleiStyle) -> list[dict]:
    """Nucleus geometry and brightness in reference pixels; placement allows touching and overlap."""
    nuclei: list[dict] = []
    harmonics = np.arange(2, 6)  # low orders only: lobes and dents, not a ragged outline
    centres = np.empty((0, 2))
    radii = np.empty(0)
    for _ in range(rng.poisson(style.density * rng.uniform(0.5, 1.5))):
        radius = style.radius * rng.lognormal(0, 0.25)
        if len(nuclei) and rng.random() < 0.3:  # a daughter or neighbour close to a placed nucleus
            j = rng.integers(len(nuclei))
            angle = rng.uniform(0, 2 * np.pi)
            gap = (radius + radii[j]) * rng.uniform(0.65, 1.05)
            centre = centres[j] + gap * np.array([np.cos(angle), np.sin(angle)])
        else:
            centre = rng.uniform(-4, REFERENCE_SIZE + 4, 2)
        # Nuclei squeeze against each other but one never hides most of another.
        if np.any(np.hypot(*(centres - centre).T) < 0.6 * (radius + radii)):
            continue
        elongation = rng.uniform(1, style.elongation)
        nuclei.append(
            {
                "centre": centre,
                "axes": (radius * np.sqrt(elongation), radius / np.sqrt(elongation)),
                "angle": rng.uniform(0, np.pi),
                "harmonics": harmonics,
                "amplitudes": style.irregularity * rng.normal(0, 1, 4) * 2 / harmonics,
                "phases": rng.uniform(0, 2 * np.pi, 4),
                # Log-uniform: as many dim nuclei as bright ones, not a few dim outliers.
                "brightness": np.exp(rng.uniform(*np.log(style.brightness))),
                "dome": rng.uniform(0.1, 0.4),
            }
        )
        centres = np.vstack([centres, centre])
        radii = np.append(radii, radius)
    return nuclei


@dataclass
class _Canvas:
    """The layers nuclei are drawn into, before blur and noise."""

    nuclei: np.ndarray  # float32 intensity
    mask: np.ndarray  # bool union of footprints
    instances: np.ndarray  # int32 nucleus ids

    @classmethod
    def empty(cls, size: int) -> _Canvas:
        shape = (size, size)
        return cls(np.zeros(shape, np.float32), np.zeros(shape, bool), np.zeros(shape, np.int32))


def _stamp(nucleus: dict, scale: float, texture: np.ndarray, out: _Canvas, label: int) -> None:
    """Rasterise one nucleus into the layers of ``out``."""
    size = texture.shape[0]
    cx, cy = (float(c) * scale for c in nucleus["centre"])
    a, b = (axis * scale for axis in nucleus["axes"])
    reach = a * (1 + np.abs(nucleus["amplitudes"]).sum()) + 1
    x0, x1 = max(int(cx - reach), 0), min(int(cx + reach) + 1, size)
    y0, y1 = max(int(cy - reach), 0), min(int(cy + reach) + 1, size)
    if x0 >= x1 or y0 >= y1:
        return
    dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
    dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
    cos, sin = np.cos(nucleus["angle"]), np.sin(nucleus["angle"])
    u = (dx * cos + dy * sin) / a
    v = (dy * cos - dx * sin) / b
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)[..., None]
    waves = nucleus["amplitudes"] * np.cos(nucleus["harmonics"] * phi + nucleus["phases"])
    edge = 1 + waves.sum(-1)  # boundary radius per pixel direction, in units of the ellipse
    inside = rho < edge
    profile = nucleus["brightness"] * (1 - nucleus["dome"] * (rho / edge) ** 2)
    box = (slice(y0, y1), slice(x0, x1))
    out.nuclei[box] += np.where(inside, profile * texture[box], 0)
    out.mask[box] |= inside
    out.instances[box][inside] = label


def _blobs(
    rng: np.random.Generator, size: int, count: int, sigma: tuple, spread: float
) -> np.ndarray:
    """Sum of ``count`` isotropic Gaussians (unit peak) with centres up to ``spread`` off the frame."""
    axis = np.arange(size, dtype=np.float32) + 0.5
    field = np.zeros((size, size), np.float32)
    for _ in range(count):
        cx, cy = (float(c) for c in rng.uniform(-spread, 1 + spread, 2) * size)
        s = float(rng.uniform(*sigma)) * size / REFERENCE_SIZE
        field += np.outer(
            np.exp(-0.5 * ((axis - cy) / s) ** 2), np.exp(-0.5 * ((axis - cx) / s) ** 2)
        )
    return field


def _illumination(rng: np.random.Generator, style: NucleiStyle, size: int) -> np.ndarray:
    """Vignetting: relative excitation falling off quadratically from an off-centre optical axis."""
    cx, cy = (float(c) for c in rng.uniform(0.3, 0.7, 2) * size)
    axis = np.arange(size, dtype=np.float32) + 0.5
    far = ((axis[:, None] - cy) ** 2 + (axis[None, :] - cx) ** 2) / (0.5 * size**2)
    return 1 - style.vignetting * np.minimum(far, 1)


def generate_nuclei(
    seed: int | Sequence[int],
    size: int = 256,
    channels: int = 1,
    style: NucleiStyle | None = None,
    *,
    return_instances: bool = False,
) -> tuple[np.ndarray, ...]:
    """One synthetic fluorescence image and its mask, a pure function of the arguments.

    Returns ``(image, mask)``: image uint8 ``(size, size)`` or ``(size, size, 3)``, mask uint8
    ``(size, size)`` in {0, 1}, the union of the nucleus footprints. With ``return_instances`` an
    int32 map of nucleus ids (0 = background; where nuclei overlap the later one wins) comes third.
    ``style=None`` draws a style from ``seed``; the geometry does not depend on ``channels``.
    """
    if size < MIN_SIZE:
        raise UserError(f"synthetic image size must be at least {MIN_SIZE}, got {size}; raise it.")
    if channels not in (1, 3):
        raise UserError(f"synthetic channels must be 1 or 3, got {channels}.")
    rng = np.random.default_rng(seed)
    style = sample_style(rng) if style is None else style
    nuclei = _draw_nuclei(rng, style)
    scale = size / REFERENCE_SIZE

    chromatin = ndimage.gaussian_filter(rng.standard_normal((size, size), np.float32), 1.2 * scale)
    texture = np.maximum(1 + style.texture * chromatin / (chromatin.std() + 1e-6), 0.3)
    out = _Canvas.empty(size)
    for label, nucleus in enumerate(nuclei, start=1):
        _stamp(nucleus, scale, texture, out, label)

    foreground = ndimage.gaussian_filter(out.nuclei, style.blur * scale)
    # Out-of-focus nuclei are as bright as dim in-focus ones but wide and soft; never in the mask.
    sigmas = (1.2 * style.radius, 2.2 * style.radius)
    out_of_focus = _blobs(rng, size, rng.poisson(style.out_of_focus), sigmas, 0)
    foreground += float(rng.uniform(0.4, 1.2)) * style.brightness[0] * out_of_focus
    haze = float(rng.uniform(0.4, 1.0)) * style.haze * _blobs(rng, size, 3, (50, 140), 0.3)
    illumination = _illumination(rng, style, size)

    if channels == 1:
        signal = (style.background + illumination * (haze + foreground))[..., None]
    else:
        glow = np.array(style.autofluorescence, np.float32)
        stain = np.array(style.stain, np.float32)
        signal = (style.background + illumination[..., None] * haze[..., None]) * glow
        signal += illumination[..., None] * foreground[..., None] * stain
    # Shot noise as a Gaussian with variance proportional to the signal (Poisson is several times
    # slower and indistinguishable at these photon counts), plus read noise; independent per channel.
    sigma = np.sqrt(signal / style.photons + style.read_noise**2)
    signal = signal + sigma * rng.standard_normal(signal.shape, np.float32)
    image = np.clip(signal * 255 + 0.5, 0, 255).astype(np.uint8)
    image = image[..., 0] if channels == 1 else image
    mask = out.mask.astype(np.uint8)
    return (image, mask, out.instances) if return_instances else (image, mask)


MAX_NUM_IMAGES = 1_000_000  # keys have six digits; a million images is hours of packing


def check_counts(num_images: int, group_size: int) -> None:
    """``UserError`` unless both are integers from 1 to :data:`MAX_NUM_IMAGES` (checked before
    a list of entries is made: ``--num-images 1000000000`` must not fill the memory)."""
    for name, value in (("num_images", num_images), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(
                f"synthetic {name} must be an integer >= 1, got {value!r}; set it to 1 or more."
            )
        if value > MAX_NUM_IMAGES:
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} must be at most {MAX_NUM_IMAGES:,} (MAX_NUM_IMAGES), got {value:,}: "
                "pack fewer synthetic images"
            )


class SyntheticSource:
    """``num_images`` generated nuclei images; consecutive ``group_size`` images share a slide style.

    Image ``i`` depends only on (seed, i, its group, image size, channels), never on call order.
    """

    kind = "synthetic"

    def __init__(self, num_images: int, channels: int = 1, seed: int = 0, group_size: int = 1):
        check_counts(num_images, group_size)
        if channels not in (1, 3):
            raise UserError(f"synthetic channels must be 1 (gray) or 3 (RGB), got {channels!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise UserError(f"synthetic seed must be a non-negative integer, got {seed!r}.")
        self.num_images = num_images
        self.channels = channels
        self.seed = seed
        self.group_size = group_size

    def describe(self) -> dict:
        """Kind and options, for the manifest."""
        options = {k: getattr(self, k) for k in ("num_images", "channels", "seed", "group_size")}
        return {"kind": self.kind, **options}

    def entries(self) -> list[Entry]:
        """``synth-000000`` ... in order; ``slide-`` groups of ``group_size`` consecutive images."""
        return [
            Entry(key=f"synth-{i:06d}", group=f"slide-{i // self.group_size:06d}", has_mask=True)
            for i in range(self.num_images)
        ]

    def validate(self, entries: list[Entry]) -> None:
        """Nothing to check: the options were checked when the source was built."""

    def style(self, group_index: int) -> NucleiStyle:
        """The appearance shared by the images of one slide."""
        return sample_style(np.random.default_rng([self.seed, _STYLE_STREAM, group_index]))

    def load(self, entry: Entry, image_size: int) -> Sample:
        """Generate the entry's image at ``image_size`` directly (no resampling)."""
        index = int(entry.key.removeprefix("synth-"))
        style = self.style(index // self.group_size)
        image, mask = generate_nuclei(
            (self.seed, _IMAGE_STREAM, index), image_size, self.channels, style
        )
        return Sample(key=entry.key, image=image, mask=mask, group=entry.group, label=entry.label)


__all__ = ["NucleiStyle", "SyntheticSource", "generate_nuclei", "sample_style"]
