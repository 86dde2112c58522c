"""An exported model as an MLflow run (`charseg export`): the file and its settings, and an
ONNX file as an MLflow onnx model that the registry can hold."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ..checkpoint import Lineage
from .registry import Registration, register_logged_model
from .tags import EXPORT_DIR, TAG_MODE, TAG_VERSION_FORMAT
from .tracker import lineage_tags


def log_export(path: Path, metadata: dict, lineage: Lineage, checkpoint_path: Path,
               register_as: str | None = None) -> Registration | None:
    """Record in the active run the export of CHECKPOINT_PATH to PATH (metadata: export.
    ExportResult.metadata): its settings as params, the ONNX file as an onnx model (onnxruntime
    serves it through `mlflow.pyfunc`), a TorchScript file as an artifact. REGISTER_AS (ONNX
    only) registers the onnx model as a new version of that name, by the champion rule of
    `charseg register` on the checkpoint's validation metric."""
    run_id = mlflow.active_run().info.run_id
    mlflow.set_tags({TAG_MODE: "export", **lineage_tags(lineage)})
    mlflow.log_params({"format": metadata["format"], "detections_per_img": metadata["detections_per_img"],
                       "score_threshold": metadata["score_threshold"],
                       "scale_test": metadata["model_spec"]["scale_test"]})
    if metadata["format"] != "onnx":
        mlflow.log_artifact(str(path), EXPORT_DIR)
        return None
    import onnx

    info = mlflow.onnx.log_model(onnx.load(str(path)), name="model", signature=onnx_signature(),
                                 metadata={"charseg": metadata}, save_as_external_data=False)
    if not register_as:
        return None
    source_run = lineage.source_run_id or metadata["checkpoint"].get("run_id") or run_id
    registration = register_logged_model(info.model_uri, register_as, run_id, checkpoint_path, source_run)
    MlflowClient().set_model_version_tag(register_as, registration.version, TAG_VERSION_FORMAT, "onnx")
    return registration


def onnx_signature():
    """The exported graph's inputs and outputs (inference/export.py) as MLflow tensor specs."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, 3), "image"),
                       TensorSpec(np.dtype(np.float32), (), "score_threshold")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "boxes"),
                        TensorSpec(np.dtype(np.float32), (-1,), "scores"),
                        TensorSpec(np.dtype(np.float32), (-1, 28, 28), "box_masks"),
                        TensorSpec(np.dtype(np.float32), (-1, 4), "mask_frames")]))
