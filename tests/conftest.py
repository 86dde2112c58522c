"""Shared fixtures: tiny datasets made by the generator, and a light model config for CPU."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from charseg.config import TrainConfig
from charseg.generate import generate_dataset

# Small enough that one step takes well under a second on a 2-core CPU.
LIGHT = dict(weights="none", backbone="resnet18", min_size=64, max_size=64, num_workers=0, roi_samples=32,
             rpn_proposals_train=100, rpn_proposals_test=50, batch_size=2, warmup_iters=2, log_every=1)


def light_config(data_dir: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A TrainConfig for fast CPU tests."""
    return TrainConfig(data_dir=str(data_dir), output_dir=str(output_dir), **{**LIGHT, **overrides})


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """Four 64x64 images with 2-4 characters each (shared read-only across tests)."""
    out = tmp_path_factory.mktemp("tiny") / "data"
    generate_dataset(out, num_images=4, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    return out


@pytest.fixture(autouse=True)
def _charseg_logs(caplog):
    caplog.set_level(logging.INFO, logger="charseg")
