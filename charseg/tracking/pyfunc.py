"""A registered model as MLflow loads and serves it: the `loader_module` hook and the
signature. Registered models name `charseg.tracking` as their loader (the package re-exports
`_load_pyfunc`), so that name must keep working."""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ..errors import CharsegError
from ..inference.serving import CharsegPredictor

LOADER_MODULE = "charseg.tracking"  # what registered models name; keep it importable


class ServedModel:
    """A registered model as MLflow serves it: charseg's predictor, whose bad-input errors (an
    image that cannot be read, no `image` column, a precision the device lacks) become
    MlflowExceptions, which `mlflow models serve` answers with their message and status 400
    (any other exception gets a generic message, the reason buried in a stack trace)."""

    def __init__(self, predictor: CharsegPredictor):
        self.predictor = predictor

    def predict(self, model_input, params: dict | None = None):
        try:
            return self.predictor.predict(model_input, params)
        except CharsegError as exc:  # a precision the device lacks too; not any ValueError: a bug is no bad request
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from exc


def _load_pyfunc(data_path: str) -> ServedModel:
    """MLflow's loader_module hook: the checkpoint logged as the model's data."""
    return ServedModel(CharsegPredictor(data_path))


def model_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import DataType
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image")]),
        outputs=Schema([ColSpec(DataType.long, "image_id"), ColSpec(DataType.double, "score"),
                        ColSpec(Array(DataType.double), "box"), ColSpec(Array(DataType.double), "polygon")]),
        params=ParamSchema([ParamSpec("score_threshold", DataType.double, 0.5),
                            ParamSpec("precision", DataType.string, "auto"),
                            ParamSpec("detections_per_img", DataType.long, 0),
                            ParamSpec("max_size", DataType.long, 0),
                            ParamSpec("outline", DataType.string, "")]))


def requirements() -> list[str]:
    from importlib.metadata import version

    pinned = ("torch", "torchvision", "mlflow")
    loose = ("numpy", "pandas", "pillow", "opencv-python-headless", "pycocotools", "tqdm")
    return [f"{p}=={version(p).split('+')[0]}" for p in pinned] + list(loose)
