"""charseg: Mask R-CNN character instance segmentation with MLflow tracking."""

__version__ = "0.1.0"
