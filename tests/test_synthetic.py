import numpy as np
import pytest
from scipy import ndimage

from hpc_btunet.data.synthetic import NucleiStyle, SyntheticSource, generate_nuclei, sample_style
from hpc_btunet.errors import UserError


def best_threshold_dice(image: np.ndarray, mask: np.ndarray) -> float:
    """Dice of ``image >= t`` against ``mask`` for the best of all 257 thresholds (oracle)."""
    inside = np.bincount(image[mask == 1], minlength=256)
    outside = np.bincount(image[mask == 0], minlength=256)
    # Pixels at or above each threshold; t = 256 predicts nothing.
    true_pos = np.append(np.cumsum(inside[::-1])[::-1], 0)
    false_pos = np.append(np.cumsum(outside[::-1])[::-1], 0)
    if inside.sum() == 0:
        return 1.0
    return float(np.max(2 * true_pos / (true_pos + false_pos + inside.sum())))


@pytest.fixture(scope="module")
def corpus() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [generate_nuclei(seed, 256, return_instances=True) for seed in range(32)]


@pytest.mark.parametrize("channels", [1, 3])
def test_same_seed_gives_same_image(channels):
    first = generate_nuclei(7, 64, channels)
    again = generate_nuclei(7, 64, channels)
    other = generate_nuclei(8, 64, channels)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(size, channels):
    image, mask = generate_nuclei(3, size, channels)
    assert image.dtype == np.uint8 and mask.dtype == np.uint8
    assert image.shape == ((size, size) if channels == 1 else (size, size, 3))
    assert mask.shape == (size, size)
    assert set(np.unique(mask)) <= {0, 1}


@pytest.mark.parametrize("size", [32, 97])
def test_small_and_odd_sizes_work(size):
    image, mask = generate_nuclei(1, size)
    assert image.shape == mask.shape == (size, size)


def test_size_below_minimum_is_a_user_error():
    with pytest.raises(UserError, match="size"):
        generate_nuclei(0, 16)


def test_rgb_is_coloured_and_shares_the_geometry():
    gray, gray_mask = generate_nuclei(5, 128, channels=1)
    rgb, rgb_mask = generate_nuclei(5, 128, channels=3)
    assert np.array_equal(gray_mask, rgb_mask)
    r, g, b = (rgb[..., c].astype(float) for c in range(3))
    assert not np.array_equal(r, g) and not np.array_equal(g, b)
    # Independent noise per channel: never a copy, even up to scale.
    assert np.corrcoef(r.ravel(), b.ravel())[0, 1] < 0.99


def test_given_style_is_used():
    style = sample_style(np.random.default_rng(0))
    assert isinstance(style, NucleiStyle)
    dark = NucleiStyle(**{**style.__dict__, "brightness": (0.05, 0.1), "haze": 0.0})
    bright = NucleiStyle(**{**style.__dict__, "brightness": (0.6, 0.9), "haze": 0.0})
    dark_image, dark_mask = generate_nuclei(2, 128, style=dark)
    bright_image, bright_mask = generate_nuclei(2, 128, style=bright)
    assert np.array_equal(dark_mask, bright_mask)
    assert bright_image[bright_mask == 1].mean() > dark_image[dark_mask == 1].mean()


def test_best_global_threshold_is_not_enough(corpus):
    dice = [best_threshold_dice(image, mask) for image, mask, _ in corpus]
    assert np.mean(dice) < 0.9


def test_foreground_is_neither_rare_nor_dominant(corpus):
    masks = np.stack([mask for _, mask, _ in corpus])
    assert 0.05 < masks.mean() < 0.5
    assert np.mean(masks.any(axis=(1, 2))) >= 0.8


def test_nuclei_are_brighter_than_their_surroundings(corpus):
    brighter = []
    for image, mask, _ in corpus:
        if mask.any():
            ring = ndimage.binary_dilation(mask, iterations=3) & (mask == 0)
            brighter.append(image[mask == 1].mean() > image[ring].mean())
    assert np.mean(brighter) >= 0.9


def test_nucleus_counts_vary(corpus):
    counts = [ndimage.label(mask)[1] for _, mask, _ in corpus]
    assert min(counts) <= 3 and max(counts) >= 20


def test_touching_and_overlapping_nuclei_occur(corpus):
    merged = 0
    for _, mask, instances in corpus:
        components, n = ndimage.label(mask)
        for component in range(1, n + 1):
            merged += len(np.unique(instances[components == component])) >= 2
    assert merged >= 10


def test_brightness_varies_between_nuclei(corpus):
    spreads = []
    for image, _, instances in corpus:
        ids = np.unique(instances[instances > 0])
        if len(ids) >= 5:
            means = ndimage.mean(image, instances, ids)
            spreads.append(np.percentile(means, 90) / np.percentile(means, 10))
    assert np.median(spreads) > 1.5


def test_source_entries_and_groups():
    source = SyntheticSource(10, channels=3, seed=1, group_size=4)
    entries = source.entries()
    assert [e.key for e in entries[:2]] == ["synth-000000", "synth-000001"]
    assert [e.group for e in entries] == ["slide-000000"] * 4 + ["slide-000001"] * 4 + [
        "slide-000002"
    ] * 2
    assert all(e.has_mask for e in entries)
    assert source.kind == "synthetic" and source.channels == 3
    assert source.describe() == {
        "kind": "synthetic",
        "num_images": 10,
        "channels": 3,
        "seed": 1,
        "group_size": 4,
    }
    assert source.validate(entries) is None


def test_source_load_does_not_depend_on_call_order():
    source = SyntheticSource(6, seed=3, group_size=2)
    entries = source.entries()
    forward = [source.load(e, 64) for e in entries]
    backward = [SyntheticSource(6, seed=3, group_size=2).load(e, 64) for e in entries[::-1]]
    for a, b in zip(forward, backward[::-1], strict=True):
        assert a.key == b.key and a.group == b.group
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(forward[0].image, forward[1].image)
    other_seed = SyntheticSource(6, seed=4, group_size=2).load(entries[0], 64)
    assert not np.array_equal(forward[0].image, other_seed.image)


def test_source_smaller_size_is_the_same_field_of_view():
    source = SyntheticSource(1, seed=2)
    entry = source.entries()[0]
    large, small = source.load(entry, 256), source.load(entry, 64)
    assert small.image.shape == (64, 64)
    shrunk = large.mask.reshape(64, 4, 64, 4).mean(axis=(1, 3)) > 0.5
    assert np.mean(shrunk == small.mask) > 0.95


def test_groups_share_a_style():
    source = SyntheticSource(8, seed=0, group_size=4)
    assert source.style(0) == source.style(0)
    assert source.style(0) != source.style(1)


@pytest.mark.parametrize(
    "options, name",
    [
        ({"num_images": 0}, "num_images"),
        ({"num_images": 2.5}, "num_images"),
        ({"num_images": 4, "channels": 2}, "channels"),
        ({"num_images": 4, "group_size": 0}, "group_size"),
        ({"num_images": 4, "seed": -1}, "seed"),
    ],
)
def test_bad_options_are_user_errors(options, name):
    with pytest.raises(UserError, match=name):
        SyntheticSource(**options)
