"""Run a trained model on images: instances as (score, box, polygon), overlays, CSV output."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw

from .. import checkpoint as ckpt
from ..config import BOUNDS, check_page_scale
from ..data.dataset import write_annotation
from ..data.images import ImageUnusable, load_image_rgb
from ..data.loading import image_to_tensor
from ..errors import CharsegError
from ..model.architecture import PRE_NMS_PER_DETECTION, PROPOSALS_PER_DETECTION
from ..model.build import NUM_CLASSES, ModelSpec, build_model_from_state
from ..polygons import box_mask_to_polygon, mask_to_polygon
from .outlines import snap_to_ink

log = logging.getLogger("charseg")

MASK_THRESHOLD = 0.5  # mask probability that counts as inside the character
MAX_DETECTIONS = int(BOUNDS["detections_per_img"].high)  # predict_following_page raises a page's limit up to this
UNKNOWN_CHAR = "?"  # the model finds characters but does not read them
COCO_PREDICTIONS = "predictions_coco.json"  # predict --format coco

T = TypeVar("T")


@dataclass
class Instance:
    """One detected character."""

    score: float
    box: list[float]  # x1, y1, x2, y2
    polygon: list[float]  # flat [x1, y1, x2, y2, ...] outline of the mask


def load_model_for_inference(checkpoint_path: str | Path, device: torch.device, detections_per_img: int | None = None,
                             scale_test: float | None = None, max_size: int | None = None, fixed_scale: bool = False,
                             outline: str | None = None) -> tuple[torch.nn.Module, ModelSpec, dict]:
    """Rebuild the checkpoint's model in eval mode on `device`, with `detections_per_img`,
    `scale_test` and `outline` instead of the checkpoint's when given, and `max_size` as the cap of its
    input's long side (PasteFreeTransform.inference_cap otherwise). A given `scale_test`, or
    `fixed_scale`, reads every page at that one scale (no second reading of a page of small
    characters: spec.glyph_height 0). Its precision is the caller's autocast
    (precision.Compute). Returns (model, its spec, the checkpoint)."""
    state = ckpt.load_checkpoint(checkpoint_path, NUM_CLASSES)
    spec = ModelSpec.from_dict(state["model_spec"])
    if detections_per_img:  # the RPN keeps enough proposals for them (set_detection_limit)
        spec = dataclasses.replace(spec, detections_per_img=detections_per_img, rpn_proposals_test=max(
            spec.rpn_proposals_test, PROPOSALS_PER_DETECTION * detections_per_img))
    if scale_test is not None:
        try:
            check_page_scale("--scale-test", scale_test)
        except ValueError as exc:
            raise CharsegError(str(exc)) from exc
        spec = dataclasses.replace(spec, scale_test=scale_test)
    if scale_test is not None or fixed_scale:
        spec = dataclasses.replace(spec, glyph_height=0.0)
    if outline is not None:
        spec = dataclasses.replace(spec, outline=outline)
    model = build_model_from_state(spec, state["model"])
    if detections_per_img:
        set_detection_limit(model, detections_per_img)
    model.to(device).eval()
    model.transform.max_input_side = max_size
    return model, spec, state


def shrink_warning(model: torch.nn.Module, pages: Iterable[tuple[str, int, int]]) -> str | None:
    """A warning naming the pages (name, height, width) that the model's input cap shrinks
    below its page scale, and the --max-size that reads them at that scale; None if none is."""
    transform = model.transform
    shrunk = [(name, max(h, w)) for name, h, w in pages if transform.shrunk_by_cap(h, w)]
    if not shrunk:
        return None
    needed = max(int(np.ceil(side * transform.page_scales[1])) for _, side in shrunk)
    names = ", ".join(name for name, _ in shrunk[:10]) + (" ..." if len(shrunk) > 10 else "")
    return (f"warning: {len(shrunk)} page(s) are larger than the model's input limit of {transform.inference_cap()} px "
            f"and were shrunk, so their characters are smaller than the model learned and some are missed: {names}; "
            f"pass --max-size {needed} to read them at the model's scale (memory grows with the page)")


def output_to_instances(output: dict[str, torch.Tensor], score_threshold: float, rgb: np.ndarray,
                        outline: str = "mask") -> list[Instance]:
    """Turn one Mask R-CNN output for the page RGB (H x W x 3 uint8) into instances at or
    above `score_threshold`.

    Box-sized masks (`box_masks` over their `mask_frames`, charseg's default) become polygons
    directly, clipped to the image, and with OUTLINE "learned" or "ink" snapped to the ink's edge
    on the page (outlines.snap_to_ink; ModelSpec.outline); stock full-image `masks` are traced as
    they are. Instances whose mask is empty are dropped.
    """
    if "box_masks" not in output and "masks" not in output:
        return []  # a page at the limit, not outlined: it is read again (unoutlined_at_limit)
    image_size = (rgb.shape[1], rgb.shape[0])
    instances = []
    scores = output["scores"].cpu()
    keep = torch.nonzero(scores >= score_threshold).flatten().tolist()
    boxes = output["boxes"].cpu().numpy()
    box_masks = output["box_masks"].cpu().numpy() if "box_masks" in output else None
    frames = output["mask_frames"].cpu().numpy() if box_masks is not None else None
    for idx in keep:
        if box_masks is not None:
            polygon = box_mask_to_polygon(box_masks[idx], frames[idx], MASK_THRESHOLD, bounds=image_size)
            if outline != "mask" and polygon:
                polygon = snap_to_ink(rgb, boxes[idx], polygon, learned=outline == "learned")
        else:
            polygon = mask_to_polygon(output["masks"][idx, 0].cpu().numpy() >= MASK_THRESHOLD)
        if polygon:
            instances.append(Instance(score=float(scores[idx]), box=[round(float(v), 2) for v in boxes[idx]],
                                      polygon=polygon))
    return instances


def outline_rule(model: torch.nn.Module) -> str:
    """How MODEL's masks become outlines (ModelSpec.outline); stock torchvision's: "mask"."""
    return getattr(getattr(model, "roi_heads", None), "outline", "mask")


@torch.inference_mode()
def predict_arrays(model: torch.nn.Module, images: list[np.ndarray], device: torch.device,
                   score_threshold: float = 0.5,
                   autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                   at_limit: list[bool] | None = None) -> list[list[Instance]]:
    """Predict instances for HxWx3 uint8 RGB arrays (one list per image), the forward pass
    under AUTOCAST (precision.Compute.autocast). AT_LIMIT, when given, gets one flag per image:
    its detections reached the model's limit (detections_per_img), so some may be missing."""
    tensors = [image_to_tensor(a).to(device) for a in images]
    with boxes_scoring_at_least(model, score_threshold), autocast():
        outputs = model(tensors)
    if at_limit is not None:
        at_limit.extend(len(o["scores"]) >= model.roi_heads.detections_per_img for o in outputs)
    return [output_to_instances(o, score_threshold, a, outline_rule(model)) for o, a in zip(outputs, images)]


def predict_following_page(model: torch.nn.Module, images: list[np.ndarray], device: torch.device,
                           score_threshold: float = 0.5,
                           autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                           limits: list[int] | None = None) -> list[list[Instance]]:
    """predict_arrays with a detection limit that follows the page: a page whose detections
    reach the model's limit is read again with the limit doubled until they stay under it
    (or reach MAX_DETECTIONS). LIMITS, when given, gets each page's final limit (the model's
    when it was not raised); a page at MAX_DETECTIONS there may still miss characters."""
    reached: list[bool] = []
    with unoutlined_at_limit(model):
        results = predict_arrays(model, images, device, score_threshold, autocast, reached)
    for index, full in enumerate(reached):
        limit = model.roi_heads.detections_per_img
        if full:
            def read_page(image=images[index]):
                again: list[bool] = []
                found = predict_arrays(model, [image], device, score_threshold, autocast, again)[0]
                return found, again[0]

            results[index], limit, _ = read_with_raised_limit(model, results[index], read_page)
        if limits is not None:
            limits.append(limit)
    return results


def read_with_raised_limit(model: torch.nn.Module, result: T, read: Callable[[], tuple[T, bool]]
                           ) -> tuple[T, int, bool]:
    """A page that reached MODEL's detection limit (RESULT, its first reading) read again by
    READ() (a result, and whether it reached the limit in force) with the limit doubled until
    it stays under it or the limit reaches MAX_DETECTIONS; readings that reach it are not
    outlined meanwhile (unoutlined_at_limit). Returns the last result, its limit, and whether
    it still reached it."""
    limit, full = model.roi_heads.detections_per_img, True
    while full and limit < MAX_DETECTIONS:
        limit = min(2 * limit, MAX_DETECTIONS)
        with detection_limit(model, limit), unoutlined_at_limit(model):
            result, full = read()
    return result, limit, full


def set_detection_limit(model: torch.nn.Module, detections: int) -> None:
    """MODEL returns up to DETECTIONS per image at inference, its RPN keeping enough proposals for
    them: PRE_NMS_PER_DETECTION per detection from each FPN level before NMS and
    PROPOSALS_PER_DETECTION after it, or its own counts where larger."""
    rpn = model.rpn
    model.roi_heads.detections_per_img = detections
    rpn._pre_nms_top_n["testing"] = max(rpn._pre_nms_top_n["testing"], PRE_NMS_PER_DETECTION * detections)
    rpn._post_nms_top_n["testing"] = max(rpn._post_nms_top_n["testing"], PROPOSALS_PER_DETECTION * detections)


@contextlib.contextmanager
def detection_limit(model: torch.nn.Module, detections: int) -> Iterator[None]:
    """set_detection_limit inside the block (DETECTIONS 0: the model's own limit); for one call
    of a served model, or one reading of a page that reached the limit."""
    if not detections:
        yield
        return
    heads, rpn = model.roi_heads, model.rpn
    saved = heads.detections_per_img, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n)
    set_detection_limit(model, detections)
    try:
        yield
    finally:
        heads.detections_per_img, pre, post = saved
        rpn._pre_nms_top_n.update(pre)
        rpn._post_nms_top_n.update(post)


@contextlib.contextmanager
def unoutlined_at_limit(model: torch.nn.Module) -> Iterator[None]:
    """Inside the block MODEL outlines no page whose detections reach its limit, below
    MAX_DETECTIONS (their outputs have no masks and give no instances): for a caller that reads
    such pages again with a higher limit. A model without the switch outlines every page."""
    heads = getattr(model, "roi_heads", None)
    if not hasattr(heads, "outline_full_pages") or heads.detections_per_img >= MAX_DETECTIONS:
        yield
        return
    heads.outline_full_pages = False
    try:
        yield
    finally:
        heads.outline_full_pages = True


@contextlib.contextmanager
def outlined_by(model: torch.nn.Module, outline: str) -> Iterator[None]:
    """MODEL's masks are outlined by the rule OUTLINE inside the block ("": its own,
    ModelSpec.outline); for one call of a served model."""
    saved = outline_rule(model)
    model.roi_heads.outline = outline or saved
    try:
        yield
    finally:
        model.roi_heads.outline = saved


@contextlib.contextmanager
def input_limit(model: torch.nn.Module, max_side: int) -> Iterator[None]:
    """The model's input cap (load_model_for_inference's max_size) is MAX_SIDE inside the
    block (0: its own); for one call of a served model."""
    saved = model.transform.max_input_side
    model.transform.max_input_side = max_side or saved
    try:
        yield
    finally:
        model.transform.max_input_side = saved


def just_below(score_threshold: float) -> np.float32:
    """The float32 just below SCORE_THRESHOLD: torchvision's box head keeps scores strictly
    above its threshold, charseg keeps those at least its own."""
    return np.nextafter(np.float32(score_threshold), np.float32(-1))


@contextlib.contextmanager
def boxes_scoring_at_least(model: torch.nn.Module, score_threshold: float) -> Iterator[None]:
    """Drop detections scoring under `score_threshold` before the mask head runs, not after:
    on a dense page the mask head is most of the time. The instances at or above it are the
    same: NMS lets a box be suppressed only by a higher-scoring one, and the top-k detections
    kept are a prefix by score. (torchvision keeps scores strictly above its threshold, so it
    gets the float32 just below ours.)"""
    heads = model.roi_heads
    default = heads.score_thresh
    heads.score_thresh = max(default, float(just_below(score_threshold)))
    try:
        yield
    finally:
        heads.score_thresh = default


LABELS = ("fit", "all", "none")  # overlay score labels: where they fit, every one, none
FILL_ALPHA = 90  # of 255: the page shows through each mask


def instance_colour(index: int) -> tuple[int, int, int]:
    """A distinct, saturated colour per instance: hues a golden-ratio turn apart, so
    neighbours (in reading order) never share one."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def draw_overlay(rgb: np.ndarray, instances: list[Instance], labels: str = "fit") -> Image.Image:
    """The page with each instance's mask filled translucent and outlined in its own colour.

    Line width grows with the page (1 px up to 500 px sides). labels: `fit` writes a score
    above its box only where it overlaps no other label and stays on the page; `all` every
    score; `none` no text.
    """
    base = Image.fromarray(rgb).convert("RGBA")
    layer = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    width = max(1, round(max(base.size) / 500))
    colours = [instance_colour(i) for i in range(len(instances))]
    for inst, colour in zip(instances, colours):
        points = list(zip(inst.polygon[0::2], inst.polygon[1::2]))
        draw.polygon(points, fill=(*colour, FILL_ALPHA))
    for inst, colour in zip(instances, colours):
        points = list(zip(inst.polygon[0::2], inst.polygon[1::2]))
        draw.line(points + points[:1], fill=(*colour, 255), width=width, joint="curve")
    image = Image.alpha_composite(base, layer)
    if labels != "none":
        _draw_scores(ImageDraw.Draw(image), image.size, instances, colours, labels == "all")
    return image.convert("RGB")


def _draw_scores(draw: ImageDraw.ImageDraw, size: tuple[int, int], instances: list[Instance], colours: list,
                 every: bool) -> None:
    """Scores in black on their instance's colour (label_places says where)."""
    @functools.lru_cache(maxsize=None)  # a page's scores share a hundred texts at most
    def text_box(text):
        left, top, right, bottom = draw.textbbox((0, 0), text)
        return right - left, bottom - top, left, top

    for index, text, rect, (left, top) in label_places(instances, text_box, size, every):
        draw.rectangle(rect, fill=colours[index])
        draw.text((rect[0] - left, rect[1] - top), text, fill=(0, 0, 0))


LABEL_CELL = 32  # px: label_places looks for overlaps among the labels of the cells a label covers


def label_places(instances: list[Instance], text_box, size: tuple[int, int], every: bool) -> list[tuple]:
    """Where score labels go, highest score first: just above each box; unless `every`, only
    where a label stays on the page and overlaps no label placed before it (looked up in a grid
    of LABEL_CELL cells, not against every label: two that overlap share a cell).
    text_box(text) -> (width, height, left, top) of the drawn text. Returns (instance index,
    text, rect x0 y0 x1 y1, (left, top)) tuples."""
    placed: list[tuple] = []
    grid: dict[tuple[int, int], list[tuple]] = {}
    for index in sorted(range(len(instances)), key=lambda i: -instances[i].score):
        inst = instances[index]
        text = f"{inst.score:.2f}"
        width, height, left, top = text_box(text)
        x, y = inst.box[0], inst.box[1] - height - 2
        rect = (x, y, x + width, y + height)
        cells = [(cx, cy) for cx in range(int(rect[0] // LABEL_CELL), int(rect[2] // LABEL_CELL) + 1)
                 for cy in range(int(rect[1] // LABEL_CELL), int(rect[3] // LABEL_CELL) + 1)]
        fits = x >= 0 and y >= 0 and rect[2] <= size[0] and not any(
            rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3]
            for cell in cells for r in grid.get(cell, ()))
        if every or fits:
            placed.append((index, text, rect, (left, top)))
            for cell in cells:
                grid.setdefault(cell, []).append(rect)
    return placed


def write_predictions_csv(path: Path, instances: list[Instance]) -> None:
    """CSV in the dataset format (char,polygon_json) plus a score column; char is '?'."""
    write_annotation(path, [(UNKNOWN_CHAR, json.dumps(inst.polygon), f"{inst.score:.4f}") for inst in instances],
                     ("score",))


def predict_files(model: torch.nn.Module, inputs: list[Path], out_dir: Path, device: torch.device,
                  score_threshold: float, progress: bool = True, labels: str = "fit",
                  coco_segmentation: str | None = None, batch_size: int = 1,
                  autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                  follow_page: bool = False) -> dict[str, int]:
    """Predict every input image; write OUT/images (copies), OUT/annotations/*.csv and
    OUT/overlays/*.png, so OUT is a dataset that `charseg validate-data` (and training) accepts;
    with `coco_segmentation` (polygon or rle) also OUT/predictions_coco.json.

    Up to `batch_size` consecutive images of the same size go through the model together (the
    same size: no padding, so each image's instances do not depend on its neighbours). The next
    images are decoded and the last ones' files written in two threads while the model runs.
    An image that cannot be used (unreadable, over the size limits) is skipped and named.
    With `follow_page` each page's detection limit follows the page (predict_following_page).
    Returns {"images": n, "instances": m, "skipped": ["PATH: reason", ...], "at_limit": [the
    names of pages whose detections reached the limit], "raised": [(name, limit) of pages read
    again with a higher limit], "shrunk": shrink_warning's line or None, "seconds": from the
    first decode to the last file written}."""
    from tqdm import tqdm

    from ..data.coco import predictions_to_coco

    done, total, pages, skipped, at_limit, sizes, raised = 0, 0, [], [], [], [], []
    own_limit = model.roi_heads.detections_per_img
    started = time.perf_counter()
    writing: list[Future] = []  # at most a batch waits to be written (a writer's error stops the run)
    with ThreadPoolExecutor(1, thread_name_prefix="decode") as decoder, \
            ThreadPoolExecutor(1, thread_name_prefix="write") as writer, \
            tqdm(total=len(inputs), desc="predicting", unit="image", disable=None if progress else True) as bar:
        for batch in same_size_batches(decoded_images(decoder, inputs, skipped), lambda item: item[1].shape,
                                       batch_size):
            rgbs, reached, limits = [rgb for _, rgb in batch], [], []
            if follow_page:
                results = predict_following_page(model, rgbs, device, score_threshold, autocast, limits)
                raised += [(path.name, limit) for (path, _), limit in zip(batch, limits) if limit > own_limit]
                reached = [limit >= MAX_DETECTIONS for limit in limits]
            else:
                results = predict_arrays(model, rgbs, device, score_threshold, autocast, reached)
            at_limit += [path.name for (path, _), full in zip(batch, reached) if full]
            sizes += [(path.name, *rgb.shape[:2]) for path, rgb in batch]
            for (path, rgb), instances in zip(batch, results):
                writing.append(writer.submit(write_prediction, out_dir, path.stem, rgb, instances, labels))
                total += len(instances)
                if coco_segmentation:  # kept only for the COCO file
                    pages.append((f"{path.stem}.png", rgb.shape[1], rgb.shape[0], instances))
            while len(writing) > len(batch):
                writing.pop(0).result()
            done += len(batch)
            bar.update(done + len(skipped) - bar.n)
        for future in writing:
            future.result()
        bar.update(len(inputs) - bar.n)  # images skipped after the last batch
    if coco_segmentation:
        (out_dir / COCO_PREDICTIONS).write_text(json.dumps(predictions_to_coco(pages, coco_segmentation)),
                                                encoding="utf-8")
    return {"images": done, "instances": total, "skipped": skipped, "at_limit": at_limit, "raised": raised,
            "shrunk": shrink_warning(model, sizes), "seconds": time.perf_counter() - started}


def decoded_images(decoder: ThreadPoolExecutor, inputs: list[Path],
                   skipped: list[str]) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, RGB array) of each input, decoded in `decoder` one image ahead of the caller;
    an image that cannot be used is named in `skipped` instead."""
    ahead = decoder.submit(load_image_rgb, inputs[0]) if inputs else None
    for index, path in enumerate(inputs):
        current = ahead
        ahead = decoder.submit(load_image_rgb, inputs[index + 1]) if index + 1 < len(inputs) else None
        try:
            yield path, current.result()
        except ImageUnusable as exc:
            skipped.append(str(exc))


def same_size_batches(items: Iterable[T], size: Callable[[T], tuple], batch_size: int) -> Iterator[list[T]]:
    """Runs of up to `batch_size` consecutive items of one size. A page batched with a larger
    one is padded, and GroupNorm's statistics (and the features near the padding) then depend
    on its neighbour: each page must come out as it would alone."""
    batch: list[T] = []
    for item in items:
        if batch and (len(batch) == batch_size or size(item) != size(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


def write_prediction(out_dir: Path, stem: str, rgb: np.ndarray, instances: list[Instance], labels: str) -> None:
    """OUT/images/STEM.png (the page), OUT/annotations/STEM.csv and OUT/overlays/STEM.png."""
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(out_dir / "images" / f"{stem}.png")
    write_predictions_csv(out_dir / "annotations" / f"{stem}.csv", instances)
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    draw_overlay(rgb, instances, labels).save(out_dir / "overlays" / f"{stem}.png")
