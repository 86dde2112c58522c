"""Samples as Mask R-CNN training input: targets (boxes, labels, packed polygons, each page's
sampling seed), the torch Dataset, the epoch sampler and its per-process shards, collate."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from ..errors import DatasetError
from ..polygons import pack_polygons, polygons_to_boxes, polygons_to_masks
from .augment import Augmentation
from .dataset import Sample
from .images import load_image_rgb

# The contract between the targets built here and the model's polygon-native heads
# (model/heads.py): the keys that carry a page's polygons and its sampling seed.
POLYGON_KEYS = ("polygon_points", "polygon_lengths", "image_size")
SAMPLE_SEED = "sample_seed"


def image_to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 RGB to the model's CHW float tensor in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).float().div_(255.0)


def build_target(sample: Sample, index: int, full_masks: bool = False) -> dict[str, torch.Tensor]:
    """Mask R-CNN target dict for one sample: boxes, labels (1 = character), polygons, ...

    Masks stay polygons (`polygon_points`, `polygon_lengths`, `image_size`), rasterised per
    proposal by model/heads.py; full_masks=True adds stock torchvision's N x H x W `masks`.
    """
    boxes = polygons_to_boxes(sample.polygons)
    points, lengths = pack_polygons(sample.polygons)
    target = {
        "boxes": boxes,
        "labels": torch.ones((len(sample.polygons),), dtype=torch.int64),
        "polygon_points": points,
        "polygon_lengths": lengths,
        "image_size": torch.tensor([sample.height, sample.width]),
        "image_id": torch.tensor(index),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros((len(sample.polygons),), dtype=torch.int64),
    }
    if full_masks:
        target["masks"] = polygons_to_masks(sample.polygons, sample.height, sample.width)
    return target


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 62-bit seed for what the model samples on page `index` in `epoch` of a run seeded `seed`."""
    return int(np.random.default_rng([seed, epoch, index, 1]).integers(2**62))


class CharacterDataset(torch.utils.data.Dataset):
    """Map-style dataset over validated samples: (image CHW float in [0,1], target, name).

    With `augment`, item (index, epoch) (what EpochShuffleSampler yields) is the sample
    changed by randomness drawn from (seed, epoch, index) only; item `index` is never changed.
    """

    def __init__(self, samples: list[Sample], full_masks: bool = False, augment: Augmentation | None = None,
                 seed: int = 0):
        self.samples, self.full_masks, self.augment, self.seed = samples, full_masks, augment, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]):
        index, epoch = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        rgb = load_image_rgb(sample.image_path)
        if rgb.shape[:2] != (sample.height, sample.width):
            raise DatasetError(f"{sample.image_path}: image changed size while training")
        if self.augment is not None and epoch is not None:
            rng = np.random.default_rng([self.seed, epoch, index])
            rgb, polygons = self.augment(rgb, sample.polygons, rng)
            sample = dataclasses.replace(sample, polygons=polygons)
        target = build_target(sample, index, self.full_masks)
        if epoch is not None:
            # Seeds the model's anchor and proposal sampling for this page in this epoch
            # (model/sampling.SeededSampler): the same in any batch, process or resumed run.
            target[SAMPLE_SEED] = torch.tensor(sample_seed(self.seed, epoch, index))
        return image_to_tensor(rgb), target, sample.name


class EpochShuffleSampler(torch.utils.data.Sampler[tuple[int, int]]):
    """Shuffles with a permutation that depends only on (seed, epoch), like DistributedSampler,
    and yields (index, epoch), so the dataset's augmentation knows the epoch in any worker.

    Neither the number of loader workers nor any global RNG changes the order, so a resumed
    run sees exactly the batches the uninterrupted run would have seen.

    With `world_size` processes (torchrun), the permutation is padded with its own first
    indices to a multiple of world_size (as DistributedSampler does) and process `rank` takes
    every world_size-th index from `rank`: step j's batches of all processes together are the
    single-process order's batch j at world_size x the batch size.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.seed, self.epoch = size, seed, 1
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        padded = len(self) * self.world_size
        order += (order * math.ceil(padded / max(self.size, 1)))[:padded - self.size]
        return iter((index, self.epoch) for index in order[self.rank::self.world_size])


def collate(batch):
    """Keep variable-size images as lists: (images, targets, names)."""
    return tuple(zip(*batch))


def split_samples(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out round(fraction * n) samples (at least 1 when fraction > 0 and n >= 2) for
    validation, chosen by `seed`; the same seed and files always give the same split.
    Returns (train, val), each in the original order."""
    n_val = min(max(round(fraction * len(samples)), 1 if fraction > 0 else 0), len(samples) - 1)
    if n_val <= 0:
        return list(samples), []
    val_idx = set(_seeded_order(len(samples), seed)[:n_val])
    return ([s for i, s in enumerate(samples) if i not in val_idx],
            [s for i, s in enumerate(samples) if i in val_idx])


def choose_samples(samples: list[Sample], count: int, seed: int) -> list[Sample]:
    """COUNT of SAMPLES (all of them where there are fewer) chosen by SEED, in their order."""
    return [samples[i] for i in sorted(_seeded_order(len(samples), seed)[:count])]


def _seeded_order(n: int, seed: int) -> list[int]:
    """A permutation of range(N) that depends on SEED only (the split's and the replay's choice)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
