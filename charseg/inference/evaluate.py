"""Validation metrics: COCO bbox/segm AP through pycocotools, and character-level
precision, recall, F1 at mask IoU 0.5 plus the count error per image."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from ..data.dataset import Sample, load_dataset_report
from ..data.images import load_image_rgb
from ..data.loading import image_to_tensor
from ..polygons import polygon_area, polygon_boxes
from ..precision import resolve_compute
from .int8 import quantize_on_pages
from .matching import SparseCOCOeval, candidate_ious, greedy_matches
from .predict import (MAX_DETECTIONS, draw_overlay, load_model_for_inference, outline_rule, output_to_instances,
                      read_with_raised_limit, same_size_batches, shrink_warning, unoutlined_at_limit)

log = logging.getLogger("charseg")

# Metrics where lower is better; every other one is maximised.
LOWER_IS_BETTER = frozenset({"count_abs_error"})
METRICS = ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75", "char_precision",
           "char_recall", "char_f1", "count_abs_error")


@dataclass
class EvalResult:
    """Metrics by name and a few validation images with predicted outlines drawn on them."""

    metrics: dict[str, float]
    overlays: list[tuple[str, Image.Image]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)  # what was evaluated
    raised: list[tuple[str, int]] = field(default_factory=list)  # pages read again with a higher limit, and it
    at_limit: list[str] = field(default_factory=list)  # pages whose detections reached the limit: some missing


def is_better(metric: str, value: float, best: float | None) -> bool:
    """Whether `value` beats `best` for this metric (None: nothing to beat)."""
    if best is None:
        return True
    return value < best if metric in LOWER_IS_BETTER else value > best


def coco_ground_truth(samples: list[Sample]) -> COCO:
    """A pycocotools COCO object holding the samples' polygons (category 1 = character)."""
    images, annotations = [], []
    for image_id, sample in enumerate(samples, start=1):
        images.append({"id": image_id, "width": sample.width, "height": sample.height, "file_name": sample.name})
        for points, (x1, y1, x2, y2) in zip(sample.polygons, polygon_boxes(sample.polygons)):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": [points.reshape(-1).astype(float).tolist()], "area": polygon_area(points),
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "character"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _polygons_to_rles(polygons: list[list[float]], height: int, width: int) -> list[dict]:
    """One COCO RLE per flat polygon (str counts, JSON-friendly)."""
    if not polygons:
        return []
    rles = mask_utils.frPyObjects([[float(v) for v in p] for p in polygons], height, width)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def _coco_stats(gt: COCO, detections: list[dict], iou_type: str, max_dets: int) -> dict[str, float]:
    names = (f"{iou_type}_AP", f"{iou_type}_AP50", f"{iou_type}_AP75")
    if not detections:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(detections)
        coco_eval = SparseCOCOeval(gt, dt, iou_type)  # COCOeval's results, pages of thousands in seconds
        # Pages hold hundreds of characters: the AP must see every detection.
        coco_eval.params.maxDets = [1, 10, max_dets]
        # Only the AP over all areas is read: matching each page again for COCO's small, medium and
        # large ranges (pure Python, detections x characters each) took 3/4 of a dense page's time.
        coco_eval.params.areaRng, coco_eval.params.areaRngLbl = [[0, 1e10]], ["all"]
        coco_eval.evaluate()
        coco_eval.accumulate()
    return {name: _average_precision(coco_eval, iou) for name, iou in zip(names, (None, 0.5, 0.75))}


def _average_precision(coco_eval: COCOeval, iou: float | None) -> float:
    """AP over all areas at the largest maxDets from accumulate()'s precision table, as
    COCOeval.summarize computes it; summarize itself reads AP@[.5:.95] at a fixed maxDets=100,
    which is -1 (missing) once maxDets is raised."""
    params = coco_eval.params
    precision = coco_eval.eval["precision"]  # [IoU thresholds, recall, class, area, maxDets]
    if iou is not None:
        precision = precision[np.isclose(params.iouThrs, iou)]
    values = precision[..., params.areaRngLbl.index("all"), len(params.maxDets) - 1]
    values = values[values > -1]
    return float(values.mean()) if values.size else 0.0


def _match(det_rles: list[dict], gt_rles: list[dict], iou_threshold: float) -> int:
    """Greedy one-to-one matching (detections sorted by score); returns true positives."""
    if not det_rles or not gt_rles:
        return 0
    return greedy_matches(candidate_ious(det_rles, gt_rles, [0] * len(gt_rles), boxes=False), iou_threshold)


@torch.inference_mode()
def evaluate(model: torch.nn.Module, samples: list[Sample], device: torch.device, *, max_dets: int,
             score_threshold: float = 0.5, iou_threshold: float = 0.5, batch_size: int = 2,
             overlay_count: int = 0, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
             desc: str = "evaluating", follow_page: bool = False) -> EvalResult:
    """Evaluate `model` on `samples` (a progress bar named DESC on a terminal).

    Args:
        max_dets: COCO maxDets for the AP summary (match the model's detections_per_img; raised
            with it for a page read again).
        follow_page: a page whose detections reach the model's limit is read again with the limit
            doubled until they stay under it (as predict does); without it such pages are listed
            in the result's `at_limit`.
        score_threshold: detections kept for the character-level metrics and the overlays.
        batch_size: most pages per forward pass (only pages of one size share one).
        iou_threshold: mask IoU for a character to count as found.
        overlay_count: how many images to return with predicted outlines drawn.
        autocast: the forward pass's autocast context (precision.Compute.autocast).
    Returns:
        EvalResult with METRICS and the overlays.
    """
    model.eval()
    gt = coco_ground_truth(samples)
    bbox_dets: list[dict] = []
    segm_dets: list[dict] = []
    counts: list[tuple[int, int, int]] = []  # per page: characters matched, kept, annotated
    overlays: list[tuple[str, Image.Image]] = []
    raised: list[tuple[str, int]] = []
    at_limit: list[str] = []
    start = 0
    batches = list(same_size_batches(samples, lambda s: (s.height, s.width), batch_size))
    for batch in tqdm(batches, desc=desc, unit="batch", disable=None, dynamic_ncols=True, leave=False):
        arrays = [load_image_rgb(s.image_path) for s in batch]
        tensors = [image_to_tensor(a).to(device) for a in arrays]
        with autocast(), unoutlined_at_limit(model) if follow_page else contextlib.nullcontext():
            outputs = model(tensors)
        for offset, (sample, rgb, output) in enumerate(zip(batch, arrays, outputs)):
            image_id = start + offset + 1
            full = _reached_limit(model, output)
            if full and follow_page:
                output, limit, full = read_with_raised_limit(
                    model, output, lambda image=tensors[offset]: _read_page(model, image, autocast))
                raised.append((sample.name, limit))
                max_dets = max(max_dets, limit)
            if full:
                at_limit.append(sample.name)
            # Masks become polygons from their box-sized maps, then RLEs: no full-image mask.
            instances = output_to_instances(output, 0.0, rgb, outline_rule(model))
            rles = _polygons_to_rles([i.polygon for i in instances], sample.height, sample.width)
            boxes, masks = _coco_detections(image_id, output, instances, rles)
            bbox_dets += boxes
            segm_dets += masks
            kept = [rle for rle, inst in zip(rles, instances) if inst.score >= score_threshold]
            gt_rles = _polygons_to_rles([p.reshape(-1).tolist() for p in sample.polygons], sample.height, sample.width)
            counts.append((_match(kept, gt_rles, iou_threshold), len(kept), len(gt_rles)))
            if len(overlays) < overlay_count:
                overlays.append((sample.name, draw_overlay(rgb, [i for i in instances if i.score >= score_threshold])))
        start += len(batch)
    metrics = {**_coco_stats(gt, bbox_dets, "bbox", max_dets), **_coco_stats(gt, segm_dets, "segm", max_dets),
               **_character_metrics(counts)}
    return EvalResult(metrics=metrics, overlays=overlays, samples=samples, raised=raised, at_limit=at_limit)


def _coco_detections(image_id: int, output: dict, instances: list, rles: list[dict]) -> tuple[list[dict], list[dict]]:
    """A page's detections as COCO results: every box of OUTPUT, every outlined instance's mask (its RLE)."""
    boxes = [{"image_id": image_id, "category_id": 1, "score": score,
              "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
             for score, box in zip(output["scores"].tolist(), output["boxes"].tolist())]
    masks = [{"image_id": image_id, "category_id": 1, "score": inst.score, "segmentation": rle}
             for inst, rle in zip(instances, rles)]
    return boxes, masks


def _reached_limit(model: torch.nn.Module, output: dict) -> bool:
    """Whether a page's OUTPUT holds as many detections as MODEL keeps (a model without a limit:
    never)."""
    return len(output["scores"]) >= getattr(getattr(model, "roi_heads", None), "detections_per_img", np.inf)


def _read_page(model: torch.nn.Module, image: torch.Tensor, autocast: Callable[[], ContextManager]
               ) -> tuple[dict, bool]:
    """MODEL's output for one page, and whether it reached the model's limit."""
    with autocast():
        output = model([image])[0]
    return output, _reached_limit(model, output)


def _character_metrics(counts: list[tuple[int, int, int]]) -> dict[str, float]:
    """Character precision, recall, F1 and mean count error from each page's (matched, kept,
    annotated) counts."""
    matched, kept, annotated = (sum(column) for column in zip(*counts)) if counts else (0, 0, 0)
    precision = matched / kept if kept else 0.0
    recall = matched / annotated if annotated else 0.0
    return {"char_precision": precision, "char_recall": recall,
            "char_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "count_abs_error": float(np.mean([abs(k - a) for _, k, a in counts])) if counts else 0.0}


def evaluate_checkpoint(checkpoint_path: str | Path, data_dir: str, *, device: str = "auto",
                        score_threshold: float = 0.5, detections_per_img: int | None = None,
                        scale_test: float | None = None, batch_size: int = 2, overlay_count: int = 0,
                        precision: str = "auto", max_size: int | None = None, outline: str | None = None,
                        calibration_dir: str | None = None, calibration_cache: str | None = None):
    """Evaluate a checkpoint on every usable image of DATA_DIR (`detections_per_img`,
    `scale_test`, `max_size`, `outline`: instead of the checkpoint's; load_model_for_inference) at
    `precision` (int8: calibrated on `calibration_dir`'s first pages, else DATA_DIR's, or the
    int8 parts of `calibration_cache` where that file exists, else written there); pages
    shrunk by the input cap are named in a warning. Returns an EvalResult."""
    compute = resolve_compute(device, precision, training=False)
    model, spec, _ = load_model_for_inference(checkpoint_path, compute.device, detections_per_img, scale_test,
                                              max_size, outline=outline)
    report = load_dataset_report(data_dir)
    if compute.precision == "int8":
        quantize_on_pages(model, calibration_dir, [sample.image_path for sample in report.samples],
                          calibration_cache)
    warning = shrink_warning(model, ((s.image_path.name, s.height, s.width) for s in report.samples))
    if warning:
        log.warning(warning)
    result = evaluate(model, report.samples, compute.device, max_dets=spec.detections_per_img,
                      score_threshold=score_threshold, batch_size=batch_size, overlay_count=overlay_count,
                      autocast=compute.autocast, follow_page=not detections_per_img)
    if result.raised:
        log.warning("%d page(s) held more characters than the model's limit of %d detections and were read again "
                    "with a higher one (COCO's maxDets follows it): %s", len(result.raised), spec.detections_per_img,
                    _some(f"{name} ({limit})" for name, limit in result.raised))
    if result.at_limit:
        log.warning("%d page(s) reached the limit of %d detections, so characters past it are missing: %s; %s",
                    len(result.at_limit), detections_per_img or MAX_DETECTIONS, _some(result.at_limit),
                    f"pass --detections-per-img {2 * detections_per_img} (or more)" if detections_per_img
                    else "split such pages")
    return result


def _some(names) -> str:
    """The first ten of NAMES, joined."""
    names = list(names)
    return ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
