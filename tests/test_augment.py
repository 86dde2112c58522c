"""Augmentation moves polygons with the pixels, and its randomness keeps resume exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from charseg.data.augment import Augmentation, warp_page
from charseg.data.dataset import scan_dataset
from charseg.data.generate import generate_dataset
from charseg.data.loading import CharacterDataset, EpochShuffleSampler
from charseg.polygons import polygons_to_masks

# Geometry only: no change of light, no blur, no noise.
GEOMETRY_ONLY = Augmentation(contrast=(1.0, 1.0), max_brightness=0.0, gamma=(1.0, 1.0), max_blur=0.0,
                             max_noise=0.0)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def fill(polygons: list[np.ndarray], size: int) -> np.ndarray:
    """The polygons' pixels as pycocotools rasterises them (as charseg's targets and COCO
    evaluation do; OpenCV's fillPoly takes in pixels the right and bottom edges only touch)."""
    return polygons_to_masks(polygons, size, size).numpy().any(axis=0)


@pytest.mark.parametrize("seed", range(6))
def test_a_warped_polygon_covers_the_warped_glyph_pixels(tmp_path, seed):
    generate_dataset(tmp_path, num_images=1, width=128, height=128, chars_per_image=(4, 6), font_size=(30, 40),
                     seed=seed)
    sample = scan_dataset(tmp_path).samples[0]
    page = np.full((128, 128, 3), 255, dtype=np.uint8)
    page[fill(sample.polygons, 128)] = 0  # the polygons drawn as pixels
    matrix = GEOMETRY_ONLY.random_affine(np.random.default_rng(seed), 128, 128)
    assert not np.allclose(matrix, [[1, 0, 0], [0, 1, 0]])
    warped, polygons = warp_page(page, sample.polygons, matrix)
    dropped = len(sample.polygons) - len(polygons)
    assert polygons, "some characters stay on the page"
    dark = warped[:, :, 0] < 128
    drawn = fill(polygons, 128)
    off_by_one = fill([p + 1 for p in polygons], 128)
    if not dropped:  # every dark pixel belongs to a kept polygon
        assert mask_iou(drawn, dark) > 0.9
    assert (drawn & dark).sum() / drawn.sum() > 0.9  # what a polygon covers is glyph
    assert mask_iou(drawn, dark) > mask_iou(off_by_one, dark) + 0.05  # and a pixel off is measurably worse


def test_photometric_changes_stay_in_range(tiny_dataset):
    sample = scan_dataset(tiny_dataset).samples[0]
    rgb = np.full((sample.height, sample.width, 3), 200, dtype=np.uint8)
    out = Augmentation().photometric(rgb, np.random.default_rng(0))
    assert out.shape == rgb.shape and out.dtype == np.uint8 and not np.array_equal(out, rgb)


def test_augmented_items_depend_only_on_seed_epoch_and_index(tiny_dataset):
    samples = scan_dataset(tiny_dataset).samples
    a = CharacterDataset(samples, augment=Augmentation(), seed=5)
    b = CharacterDataset(samples, augment=Augmentation(), seed=5)
    first = a[(2, 3)]
    assert torch.equal(first[0], b[(2, 3)][0])
    assert torch.equal(first[1]["boxes"], b[(2, 3)][1]["boxes"])
    assert not torch.equal(first[0], a[(2, 4)][0])  # another epoch, another change
    assert torch.equal(a[2][0], CharacterDataset(samples)[2][0])  # a bare index is never changed
    assert list(EpochShuffleSampler(4, 1))[0][1] == 1  # the sampler hands out (index, epoch)
