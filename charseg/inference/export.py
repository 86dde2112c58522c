"""A checkpoint's model for deployment without charseg: ONNX (onnxruntime and any ONNX runtime)
or TorchScript (torch.jit.load, C++ libtorch), one page in, its detections out.

The exported graph is the model of `charseg predict`, traced (model parts take torchvision's
tracing paths: roi_align instead of charseg's CPU gather, the mask head over all detections at
once, the page scale computed from the page's own size). Its interface:

| name | in/out | type and shape | meaning |
| --- | --- | --- | --- |
| image | in | uint8, H x W x 3 | an RGB page |
| score_threshold | in | float32 scalar | detections scoring above it are kept |
| boxes | out | float32, N x 4 | x1, y1, x2, y2 in page pixels, by descending score |
| scores | out | float32, N | |
| box_masks | out | float32, N x 28 x 28 | each mask's probabilities over its frame |
| mask_frames | out | float32, N x 4 | the page rectangle each box mask covers |

A box mask becomes a polygon as predict does it (`polygons.box_mask_to_polygon` at 0.5).
The model's detection limit and RPN proposal counts are fixed at export; the metadata (ONNX
metadata_props or the TorchScript extra file, key `charseg`) records them with the checkpoint's
score threshold and model spec.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.generate import sample_page
from ..errors import CharsegError, reason
from .predict import Instance, just_below, load_model_for_inference, output_to_instances

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
INPUT_NAMES = ("image", "score_threshold")
OUTPUT_NAMES = ("boxes", "scores", "box_masks", "mask_frames")
OPSET = 17  # ONNX RoiAlign of opset 16 reads boxes in the box itself (--mask-pixels' aligned=True)
METADATA_KEY = "charseg"
EXAMPLE_SIDE = 256  # px: the page the model is traced on (sample_page); any size runs after
# How close an exported model's detections must be to the checkpoint's (export checks them).
BOX_TOLERANCE = 1.0  # px, each coordinate
MIN_MASK_IOU = 0.95  # thresholded box masks of matched detections
# A page at the detection limit: the last detections in by score may differ (near-tied scores
# cross the cut under float rounding, and with them what NMS keeps); this share may be unmatched.
AT_LIMIT_UNMATCHED = 0.05


class ExportError(CharsegError):
    """A model cannot be exported, or its export does not give the checkpoint's detections."""


class PageDetector(nn.Module):
    """The model as exported: an RGB page and a score threshold in, its detections out as the
    tensors of OUTPUT_NAMES (the table above). The threshold is an input, not a constant of the
    graph: the box head's `score_thresh` is set to it for the pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, score_threshold: torch.Tensor) -> tuple[torch.Tensor, ...]:
        heads = self.model.roi_heads
        default, heads.score_thresh = heads.score_thresh, score_threshold
        try:
            output = self.model([image.permute(2, 0, 1).float() / 255.0])[0]
        finally:
            heads.score_thresh = default
        return tuple(output[name] for name in OUTPUT_NAMES)


def above(score_threshold: float) -> np.ndarray:
    """The exported graph's input for "scoring at least SCORE_THRESHOLD" (predict's rule): the
    float32 just below it, as the graph keeps scores strictly above its input."""
    return np.array(just_below(score_threshold))


@dataclass
class Agreement:
    """How an exported model's detections compare with the checkpoint's on one page."""

    expected: int  # detections of the checkpoint
    found: int  # of the exported model
    matched: int  # expected ones with an exported box within BOX_TOLERANCE
    box_error: float  # px, the largest coordinate difference of a matched pair
    mask_iou: float  # the smallest IoU of a matched pair's thresholded box masks (1.0 with none)
    at_limit: bool = False  # the expected detections reached the model's limit

    @property
    def ok(self) -> bool:
        unmatched = max(self.expected, self.found) - self.matched
        allowed = int(AT_LIMIT_UNMATCHED * self.expected) if self.at_limit else 0
        return unmatched <= allowed and self.box_error <= BOX_TOLERANCE and self.mask_iou >= MIN_MASK_IOU


def agreement(expected: dict[str, np.ndarray], found: dict[str, np.ndarray], limit: int = 0) -> Agreement:
    """Pair expected and found detections one to one, closest boxes first (largest coordinate
    difference, at most BOX_TOLERANCE; the order of near-tied scores may differ, and a weak
    model's tiny boxes lie within a pixel of each other), and compare the pairs' box masks at 0.5.
    LIMIT: the model's detections per image (a page that reaches it: AT_LIMIT_UNMATCHED)."""
    boxes_e, boxes_f = expected["boxes"], found["boxes"]
    at_limit = bool(limit) and len(boxes_e) >= limit
    if not len(boxes_e) or not len(boxes_f):
        return Agreement(len(boxes_e), len(boxes_f), 0, 0.0, 1.0, at_limit)
    distance = np.abs(boxes_e[:, None, :] - boxes_f[None, :, :]).max(axis=2)
    pairs, taken_e, taken_f = [], set(), set()
    for i, j in zip(*np.nonzero(distance <= BOX_TOLERANCE)):
        pairs.append((distance[i, j], i, j))
    matched = []
    for _, i, j in sorted(pairs):
        if i not in taken_e and j not in taken_f:
            taken_e.add(i)
            taken_f.add(j)
            matched.append((i, j))
    ious = [_mask_iou(expected["box_masks"][i] >= 0.5, found["box_masks"][j] >= 0.5) for i, j in matched]
    return Agreement(len(boxes_e), len(boxes_f), len(matched),
                     float(max(distance[i, j] for i, j in matched)) if matched else 0.0,
                     float(min(ious)) if ious else 1.0, at_limit)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


@dataclass
class ExportResult:
    path: Path
    format: str
    metadata: dict
    checks: list[Agreement]  # the example page and a blank one
    seconds: float


def export_model(checkpoint: str | Path, out: str | Path, fmt: str, detections_per_img: int | None = None,
                 scale_test: float | None = None) -> ExportResult:
    """Export CHECKPOINT's model (with `detections_per_img` / `scale_test` instead of its own
    when given) to OUT in FMT (a key of FORMATS), then run the file on an example page and a
    blank one and check that it finds the checkpoint's detections (boxes within BOX_TOLERANCE,
    masks of IoU MIN_MASK_IOU); raises ExportError if not. OUT is written whole or not at all."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    start = time.perf_counter()
    # A traced graph reads every page at one scale: no second reading of small characters.
    model, spec, state = load_model_for_inference(checkpoint, torch.device("cpu"), detections_per_img, scale_test,
                                                  fixed_scale=True)
    detector = PageDetector(model).eval()
    metadata = {"format": fmt, "score_threshold": float(state["config"]["score_threshold"]),
                "detections_per_img": spec.detections_per_img, "model_spec": spec.to_dict(),
                "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
                "checkpoint": {"run_id": state.get("run_id"), "epoch": state.get("epoch")}}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.stem}.partial{out.suffix}")
    # Traced at threshold 0: every detection the model keeps goes through each head.
    example = (torch.from_numpy(sample_page(EXAMPLE_SIDE, EXAMPLE_SIDE)), torch.tensor(0.0))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's warnings about shapes it reads: see the checks below
            (_write_onnx if fmt == "onnx" else _write_torchscript)(detector, example, partial, metadata)
        pages = [example[0].numpy(), np.full((EXAMPLE_SIDE, EXAMPLE_SIDE + 32, 3), 235, np.uint8)]
        checks = check_export(detector, ExportedModel(partial), pages, metadata["score_threshold"])
        if not all(check.ok for check in checks):
            raise ExportError(f"{out}: the exported model's detections differ from the checkpoint's ({checks}); "
                              "please report it with the checkpoint")
        os.replace(partial, out)
    except Exception as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, CharsegError):
            raise
        raise ExportError(f"exporting {checkpoint} to {fmt} failed: {reason(exc)}") from exc
    return ExportResult(out, fmt, metadata, checks, time.perf_counter() - start)


def check_export(detector: PageDetector, exported: "ExportedModel", pages: list[np.ndarray],
                 score_threshold: float) -> list[Agreement]:
    """Agreement of the exported model with the checkpoint's (run as predict runs it) per page."""
    checks = []
    for page in pages:
        with torch.no_grad():
            expected = detector(torch.from_numpy(page), torch.from_numpy(above(score_threshold)))
        checks.append(agreement({k: v.numpy() for k, v in zip(OUTPUT_NAMES, expected)},
                                exported.detect(page, score_threshold), detector.model.roi_heads.detections_per_img))
    return checks


def _write_onnx(detector: PageDetector, example: tuple, path: Path, metadata: dict) -> None:
    import onnx

    detections = {0: "detections"}
    torch.onnx.export(detector, example, str(path), dynamo=False, opset_version=OPSET, input_names=list(INPUT_NAMES),
                      output_names=list(OUTPUT_NAMES), dynamic_axes={"image": {0: "height", 1: "width"},
                                                                     **{name: detections for name in OUTPUT_NAMES}})
    graph = onnx.load(str(path))
    onnx.helper.set_model_props(graph, {METADATA_KEY: json.dumps(metadata)})
    onnx.save(graph, str(path))


def _write_torchscript(detector: PageDetector, example: tuple, path: Path, metadata: dict) -> None:
    traced = torch.jit.trace(detector, example, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={METADATA_KEY: json.dumps(metadata)})


class ExportedModel:
    """An exported file, run on the CPU: onnxruntime for .onnx, torch.jit for .pt."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such exported model; write one with `charseg export`")
        try:
            if self.path.suffix == FORMATS["onnx"]:
                import onnxruntime

                self._session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
                text = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
            else:
                files = {METADATA_KEY: ""}
                with warnings.catch_warnings():  # torch.jit's deprecation notice: TorchScript is what was asked for
                    warnings.simplefilter("ignore", FutureWarning)
                    self._module = torch.jit.load(str(self.path), map_location="cpu", _extra_files=files)
                text = files[METADATA_KEY]
            self.metadata = json.loads(text)
        except Exception as exc:
            raise ExportError(f"{self.path}: not a model `charseg export` wrote ({reason(exc)})") from exc

    def detect(self, rgb: np.ndarray, score_threshold: float) -> dict[str, np.ndarray]:
        """The graph's outputs (OUTPUT_NAMES) for an HxWx3 uint8 page, detections scoring at least
        SCORE_THRESHOLD."""
        inputs = (np.ascontiguousarray(rgb, dtype=np.uint8), above(score_threshold))
        if self.metadata["format"] == "onnx":
            outputs = self._session.run(list(OUTPUT_NAMES), dict(zip(INPUT_NAMES, inputs)))
        else:
            with torch.no_grad():
                outputs = [t.numpy() for t in self._module(*map(torch.from_numpy, inputs))]
        return dict(zip(OUTPUT_NAMES, outputs))

    def predict(self, rgb: np.ndarray, score_threshold: float | None = None) -> list[Instance]:
        """Instances as `charseg predict` gives them (polygons at mask probability 0.5, outlined
        by the model's rule: ModelSpec.outline)."""
        threshold = self.metadata["score_threshold"] if score_threshold is None else score_threshold
        output = {k: torch.from_numpy(v) for k, v in self.detect(rgb, threshold).items()}
        return output_to_instances(output, threshold, rgb, self.metadata["model_spec"].get("outline", "mask"))
