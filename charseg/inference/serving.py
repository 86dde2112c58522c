"""The predictor behind a registered charseg model (MLflow's pyfunc flavour).

MLflow loads it through `loader_module="charseg.tracking"`, whose `_load_pyfunc(path)` gets
the checkpoint file logged as the model's data and wraps a `CharsegPredictor` of it. Input:
a DataFrame with an `image` column of encoded image bytes (PNG/JPEG; base64 over REST).
Output: one row per instance with image_id (row of the input), score, box and polygon.
Bad input raises CharsegError (a precision the device lacks: PrecisionError) naming the row
and what to do.
"""

from __future__ import annotations

import io
import logging
import threading

import numpy as np
import pandas as pd

from ..config import OUTLINES
from ..data.images import load_image_rgb
from ..errors import CharsegError
from ..precision import Compute
from ..precision import resolve as resolve_precision
from ..precision import resolve_compute
from .predict import (MAX_DETECTIONS, detection_limit, input_limit, load_model_for_inference, outlined_by,
                      predict_arrays, predict_following_page, shrink_warning)

log = logging.getLogger("charseg")
OUTPUT_COLUMNS = ("image_id", "score", "box", "polygon")


def decode_image(data: bytes, index: int = 0) -> np.ndarray:
    """Encoded image bytes (any mode, EXIF orientation applied, charseg's size limits) to
    HxWx3 uint8 RGB; row INDEX is named in the error when it cannot be used."""
    return load_image_rgb(io.BytesIO(bytes(data)), name=f"image of row {index}")


class CharsegPredictor:
    """Predicts character instances for a batch of encoded images."""

    def __init__(self, checkpoint_path: str, device: str | None = None, precision: str = "auto"):
        _served_precision(precision)
        self.compute = resolve_compute(device or "auto", precision, training=False)  # a call may pass its own
        self.model, _, state = load_model_for_inference(checkpoint_path, self.compute.device)
        # The run's --score-threshold, which picked its best checkpoint; a call may pass its own.
        self.score_threshold = float(state["config"]["score_threshold"])
        # A call sets the model's box score threshold for its own pass: a scoring server
        # answering from several threads must not mix two calls' thresholds.
        self._one_call_at_a_time = threading.Lock()

    def predict(self, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Rows of (image_id, score, box [x1,y1,x2,y2], polygon [x1,y1,...]) for every instance.

        params may set `score_threshold`, `precision` (fp32, bf16, fp16 on CUDA; auto: the
        loaded model's), `detections_per_img` (most instances per image; 0: the model's, raised
        for an image that reaches it: predict_following_page) and
        `max_size` (the longest page side at the model's input; 0: the model's) and `outline`
        (learned, ink or mask: how masks become outlines, ModelSpec.outline; "": the model's) for this call.
        An image whose detections reach that limit, or that the input cap shrinks below the
        model's page scale, is logged with a warning.
        """
        if "image" not in model_input:
            raise CharsegError("input needs an 'image' column of encoded image bytes (PNG or JPEG)")
        threshold = float((params or {}).get("score_threshold", self.score_threshold))
        limit = int((params or {}).get("detections_per_img", 0))
        if limit < 0:
            raise CharsegError(f"detections_per_img must be 0 (the model's limit) or more, got {limit}")
        max_side = int((params or {}).get("max_size", 0))
        if max_side < 0:
            raise CharsegError(f"max_size must be 0 (the model's input limit) or more, got {max_side}")
        outline = str((params or {}).get("outline", "") or "")
        if outline not in ("", *OUTLINES):
            raise CharsegError(f"outline must be one of {', '.join(OUTLINES)} (or empty: the model's), got {outline!r}")
        asked = _served_precision(str((params or {}).get("precision", "auto")))
        # A call's own precision, resolved without a log line per request (the load logged the default).
        compute = self.compute if asked == "auto" else \
            Compute(self.compute.device, *resolve_precision(asked, self.compute.device, training=False))
        rows, full, sizes, limits = [], [], [], []
        with self._one_call_at_a_time, detection_limit(self.model, limit), input_limit(self.model, max_side), \
                outlined_by(self.model, outline):
            for image_id, data in enumerate(model_input["image"]):
                image = decode_image(data, image_id)
                sizes.append((f"image {image_id}", *image.shape[:2]))
                if limit:
                    found = predict_arrays(self.model, [image], compute.device, threshold, compute.autocast, full)[0]
                else:
                    found = predict_following_page(self.model, [image], compute.device, threshold, compute.autocast,
                                                   limits)[0]
                    full.append(limits[-1] >= MAX_DETECTIONS)
                rows += [(image_id, inst.score, inst.box, inst.polygon) for inst in found]
            if any(full):
                log.warning("warning: images %s reached the model's limit of %d detections; pass the param "
                            "detections_per_img (more) to find the rest", [i for i, f in enumerate(full) if f],
                            self.model.roi_heads.detections_per_img)
            shrunk = shrink_warning(self.model, sizes)
            if shrunk:
                log.warning("%s", shrunk.replace("pass --max-size", "pass the param max_size"))
        frame = pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))
        return frame.astype({"image_id": "int64", "score": "float64"})


def _served_precision(precision: str) -> str:
    """PRECISION, unless int8: its heads are quantised after a calibration pass over pages,
    which a served model does not have when it loads."""
    if precision == "int8":
        raise CharsegError("precision int8 is for `charseg predict` and `evaluate`, which calibrate it on pages "
                           "first; a served model runs auto, fp32, bf16 or fp16")
    return precision


def _load_pyfunc(data_path: str) -> CharsegPredictor:
    """The loader_module hook of models registered before it moved to charseg.tracking. Such a
    model brings its own copy of charseg, but a process that imported charseg first loads
    this one."""
    return CharsegPredictor(data_path)
