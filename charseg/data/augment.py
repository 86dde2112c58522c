"""Training-time augmentation of a page and its polygons, moved together.

Real pages are rotated, scaled, lit unevenly, blurred and noisy; a synthetic training set is
not. Each training image gets a random affine warp (rotation, scale, shift: the polygons go
through the same matrix, then are clipped to the page) and photometric changes (contrast,
brightness, gamma, blur, noise). The randomness of an image depends only on (seed, epoch,
index), so a resumed run sees exactly the images the uninterrupted run would have seen,
whatever the number of loader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from ..polygons import clip_polygon_to_image, polygon_area, warp_points

# A clipped character stays a training target only while this share of it is on the page.
MIN_VISIBLE = 0.6


@dataclass(frozen=True)
class Augmentation:
    """How far each random change may go."""

    max_rotation: float = 12.0  # degrees, either way
    scale: tuple[float, float] = (0.7, 1.3)  # zoom range (characters' size changes with it)
    max_shift: float = 0.1  # translation, as a share of the page's side
    contrast: tuple[float, float] = (0.4, 1.2)  # multiplies the deviation from the page's mean
    max_brightness: float = 40.0  # added to every pixel, either way (0-255 scale)
    gamma: tuple[float, float] = (0.7, 1.5)
    max_blur: float = 1.2  # Gaussian sigma in pixels (applied to half of the images)
    max_noise: float = 10.0  # Gaussian noise sigma (0-255 scale)

    def __call__(self, rgb: np.ndarray, polygons: list[np.ndarray], rng: np.random.Generator
                 ) -> tuple[np.ndarray, list[np.ndarray]]:
        """A changed copy of the HxWx3 uint8 page and its (K, 2) polygons (those that stay)."""
        matrix = self.random_affine(rng, rgb.shape[1], rgb.shape[0])
        rgb, polygons = warp_page(rgb, polygons, matrix)
        return self.photometric(rgb, rng), polygons

    def random_affine(self, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
        """A 2x3 matrix in pixel-index coordinates: rotate and scale about the centre, then shift."""
        angle = rng.uniform(-self.max_rotation, self.max_rotation)
        scale = rng.uniform(*self.scale)
        matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), angle, scale)
        matrix[:, 2] += rng.uniform(-self.max_shift, self.max_shift, 2) * (width, height)
        return matrix

    def photometric(self, rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Contrast, brightness, gamma, then (on half of the pages) blur, then noise."""
        page = rgb.astype(np.float32)
        mean = page.mean()
        page = (page - mean) * rng.uniform(*self.contrast) + mean + rng.uniform(-self.max_brightness,
                                                                                  self.max_brightness)
        page = 255.0 * (np.clip(page, 0, 255) / 255.0) ** rng.uniform(*self.gamma)
        if rng.random() < 0.5:
            page = cv2.GaussianBlur(page, (0, 0), rng.uniform(0.3, self.max_blur))
        page += rng.normal(0, rng.uniform(0, self.max_noise), page.shape)
        return np.clip(page, 0, 255).round().astype(np.uint8)


def warp_page(rgb: np.ndarray, polygons: list[np.ndarray], matrix: np.ndarray
              ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Warp the page by a 2x3 affine `matrix` (pixel indices, as cv2) into the same size, and
    each polygon with it (polygons put pixel centres at i + 0.5); uncovered areas take the
    page's median colour. Characters less than MIN_VISIBLE on the page are dropped."""
    height, width = rgb.shape[:2]
    fill = tuple(float(v) for v in np.median(rgb.reshape(-1, 3), axis=0))
    warped = cv2.warpAffine(rgb, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                            borderValue=fill)
    scale = math.sqrt(abs(np.linalg.det(matrix[:, :2])))
    kept = []
    for points in polygons:
        clipped = clip_polygon_to_image(warp_points(points, matrix), width, height)
        if len(clipped) >= 3 and polygon_area(clipped) >= MIN_VISIBLE * polygon_area(points) * scale ** 2:
            kept.append(clipped)
    return warped, kept
