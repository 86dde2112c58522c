"""charseg: Mask R-CNN character instance segmentation with MLflow tracking."""

from .startup import import_torchvision

__version__ = "0.1.0"

import_torchvision()
