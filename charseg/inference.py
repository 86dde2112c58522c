"""Run a trained model on images: instances as (score, box, polygon), overlays, CSV output."""

from __future__ import annotations

import csv
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import checkpoint as ckpt
from .config import check_page_scale
from .data import CSV_HEADER, image_to_tensor, load_image_rgb
from .errors import CharsegError
from .model import NUM_CLASSES, ModelSpec, build_model
from .polygons import box_mask_to_polygon, mask_to_polygon

MASK_THRESHOLD = 0.5  # mask probability that counts as inside the character
UNKNOWN_CHAR = "?"  # the model finds characters but does not read them


@dataclass
class Instance:
    """One detected character."""

    score: float
    box: list[float]  # x1, y1, x2, y2
    polygon: list[float]  # flat [x1, y1, x2, y2, ...] outline of the mask


def load_model_for_inference(checkpoint_path: str | Path, device: torch.device, detections_per_img: int | None = None,
                             scale_test: float | None = None) -> tuple[torch.nn.Module, ModelSpec, dict]:
    """Rebuild the checkpoint's model in eval mode on `device`, with `detections_per_img` and
    `scale_test` instead of the checkpoint's when given. Returns (model, its spec, the checkpoint)."""
    state = ckpt.load_checkpoint(checkpoint_path, NUM_CLASSES)
    spec = ModelSpec.from_dict(state["model_spec"])
    if detections_per_img:
        spec = dataclasses.replace(spec, detections_per_img=detections_per_img)
    if scale_test is not None:
        try:
            check_page_scale("--scale-test", scale_test)
        except ValueError as exc:
            raise CharsegError(str(exc)) from exc
        spec = dataclasses.replace(spec, scale_test=scale_test)
    model = build_model(spec)
    model.load_state_dict(state["model"])
    model.to(device).eval()
    return model, spec, state


def output_to_instances(output: dict[str, torch.Tensor], score_threshold: float) -> list[Instance]:
    """Turn one Mask R-CNN output into instances at or above `score_threshold`.

    Box-sized masks (`box_masks`, charseg's default) become polygons directly; stock
    full-image `masks` are traced as they are. Instances whose mask is empty are dropped.
    """
    instances = []
    scores = output["scores"].cpu()
    keep = torch.nonzero(scores >= score_threshold).flatten().tolist()
    boxes = output["boxes"].cpu().numpy()
    box_masks = output["box_masks"].cpu().numpy() if "box_masks" in output else None
    for idx in keep:
        if box_masks is not None:
            polygon = box_mask_to_polygon(box_masks[idx], boxes[idx], MASK_THRESHOLD)
        else:
            polygon = mask_to_polygon(output["masks"][idx, 0].cpu().numpy() >= MASK_THRESHOLD)
        if polygon:
            instances.append(Instance(score=float(scores[idx]), box=[round(float(v), 2) for v in boxes[idx]],
                                      polygon=polygon))
    return instances


@torch.inference_mode()
def predict_arrays(model: torch.nn.Module, images: list[np.ndarray], device: torch.device,
                   score_threshold: float = 0.5) -> list[list[Instance]]:
    """Predict instances for HxWx3 uint8 RGB arrays (one list per image)."""
    tensors = [image_to_tensor(a).to(device) for a in images]
    outputs = model(tensors)
    return [output_to_instances(o, score_threshold) for o in outputs]


def draw_overlay(rgb: np.ndarray, instances: list[Instance]) -> Image.Image:
    """The image with each instance's outline and score drawn on it."""
    image = Image.fromarray(rgb).convert("RGB")
    draw = ImageDraw.Draw(image)
    for inst in instances:
        points = list(zip(inst.polygon[0::2], inst.polygon[1::2]))
        draw.polygon(points, outline=(255, 0, 0))
        draw.text((inst.box[0], max(inst.box[1] - 10, 0)), f"{inst.score:.2f}", fill=(0, 0, 255))
    return image


def write_predictions_csv(path: Path, instances: list[Instance]) -> None:
    """CSV in the dataset format (char,polygon_json) plus a score column; char is '?'."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_HEADER, "score"])
        for inst in instances:
            writer.writerow([UNKNOWN_CHAR, json.dumps(inst.polygon), f"{inst.score:.4f}"])


def predict_files(model: torch.nn.Module, inputs: list[Path], out_dir: Path, device: torch.device,
                  score_threshold: float, progress: bool = True) -> dict[str, int]:
    """Predict every input image; write OUT/images (copies), OUT/annotations/*.csv and
    OUT/overlays/*.png, so OUT is a dataset that `charseg validate-data` (and training) accepts.
    Returns {"images": n, "instances": m}."""
    from tqdm import tqdm

    total = 0
    for path in tqdm(inputs, desc="predicting", unit="image", disable=None if progress else True):
        rgb = load_image_rgb(path)
        instances = predict_arrays(model, [rgb], device, score_threshold)[0]
        total += len(instances)
        (out_dir / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(out_dir / "images" / f"{path.stem}.png")
        write_predictions_csv(out_dir / "annotations" / f"{path.stem}.csv", instances)
        (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
        draw_overlay(rgb, instances).save(out_dir / "overlays" / f"{path.stem}.png")
    return {"images": len(inputs), "instances": total}
