"""Outlines snapped to the ink (inference/outlines.py) and the rule a model carries (ModelSpec.outline)."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from charseg.config import TrainConfig
from charseg.data.dataset import scan_dataset
from charseg.data.heldout import generate_heldout
from charseg.data.images import load_image_rgb
from charseg.inference.outlines import snap_to_ink
from charseg.model.build import ModelSpec
from charseg.polygons import box_mask_to_polygon, flat_polygon, polygon_boxes, polygon_mask_targets


@pytest.fixture(scope="module")
def heldout_pages(tmp_path_factory):
    """Pages of another process than training's: rotated lines of text, textured paper, blur and
    noise, each glyph annotated on its pixels' edges (charseg generate --held-out)."""
    out = tmp_path_factory.mktemp("heldout") / "pages"
    generate_heldout(out, num_images=3, seed=11)
    return [(load_image_rgb(s.image_path), s.polygons) for s in scan_dataset(out).samples]


def iou(a: list[float], b: list[float], height: int, width: int) -> float:
    rles = mask_utils.frPyObjects([a, b], height, width)
    return float(mask_utils.iou([rles[0]], [rles[1]], [0])[0, 0])


def snapped_and_rough(pages, change, learned: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per annotated glyph: the IoU with its annotation of a rough outline (its 28x28 mask in its
    box, grown by a pixel as a detector's, blurred: a mask about right at IoU 0.5 and wrong at
    0.75, as the demo's on held-out pages), and of that outline snapped to the ink of
    change(page) (at the level the learned chooser picks, if LEARNED)."""
    snapped, rough = [], []
    for rgb, polygons in pages:
        page = change(rgb)
        height, width = page.shape[:2]
        boxes = polygon_boxes(polygons) + np.array([-1, -1, 1, 1], dtype=np.float32)
        for points, box, target in zip(polygons, boxes, polygon_mask_targets(polygons, boxes, 28, 0.0)):
            outline = box_mask_to_polygon(cv2.GaussianBlur(target, (0, 0), 3.5), box, 0.5, bounds=(width, height))
            if outline:
                rough.append(iou(outline, flat_polygon(points), height, width))
                snapped.append(iou(snap_to_ink(page, list(box), outline, learned), flat_polygon(points), height, width))
    return np.array(snapped), np.array(rough)


@pytest.mark.parametrize("rule", ["ink", "learned"])
@pytest.mark.parametrize("change", ["none", "light on dark", "coloured"])
def test_outlines_snapped_to_the_ink_follow_the_annotated_glyphs(heldout_pages, change, rule):
    """Rough outlines come closer to the annotator's outline, the ink's edge, on blurred, noisy,
    rotated pages, whatever the ink's colour against the paper's, by either rule's level."""
    changes = {"none": lambda rgb: rgb, "light on dark": lambda rgb: 255 - rgb,
               "coloured": lambda rgb: (rgb * np.array([1.0, 0.45, 0.2])).astype(np.uint8)}
    snapped, rough = snapped_and_rough(heldout_pages, changes[change], learned=rule == "learned")
    assert len(snapped) > 150
    assert np.median(snapped) > np.median(rough) + 0.04, (np.median(snapped), np.median(rough))
    assert np.mean(snapped >= 0.75) > np.mean(rough >= 0.75) + 0.1, (np.mean(snapped >= 0.75), np.mean(rough >= 0.75))


def test_an_outline_stays_where_the_ink_does_not_agree_with_it():
    """No ink (flat paper), or ink in the box that is not the mask's shape (a blob in a corner
    while the mask is elsewhere): the mask's own outline is kept, unchanged."""
    paper = np.full((40, 40, 3), 200, np.uint8)
    outline = [10.0, 10.0, 20.0, 10.0, 20.0, 24.0, 10.0, 24.0]
    box = [9.0, 9.0, 30.0, 30.0]
    assert snap_to_ink(paper, box, outline) == outline
    page = paper.copy()
    page[22:30, 22:30] = 20  # ink, but not where the mask is
    assert snap_to_ink(page, box, outline) == outline
    page[10:24, 10:20] = 20  # ink where the mask is: the outline follows its edge
    assert iou(snap_to_ink(page, box, outline), outline, 40, 40) == pytest.approx(1.0)


def test_a_glyph_s_outline_encloses_its_counters():
    """An o's ink is a ring; its outline, as the dataset's polygons outline it, is the outer edge
    with the counter inside."""
    page = np.full((40, 40, 3), 230, np.uint8)
    ys, xs = np.mgrid[0:40, 0:40]
    ring = (np.hypot(ys - 19.5, xs - 19.5) < 9) & (np.hypot(ys - 19.5, xs - 19.5) > 5)
    page[ring] = 30
    disc = (np.hypot(ys - 19.5, xs - 19.5) < 9).astype(np.uint8)
    truth = mask_utils.encode(np.asfortranarray(disc))
    rough = [11.0, 11.0, 29.0, 11.0, 29.0, 29.0, 11.0, 29.0]  # the ring's box: a square mask
    snapped = mask_utils.frPyObjects([snap_to_ink(page, [10.0, 10.0, 30.0, 30.0], rough)], 40, 40)
    assert mask_utils.iou(snapped, [truth], [0])[0, 0] > 0.95


def test_the_learned_rule_s_weights_fit_its_features(heldout_pages):
    """The chooser's weights (written by bench/outline_chooser.py) take one input per level
    feature and window feature, for the levels they were learned at, and score each candidate;
    the chooser returns one of the window's outlines."""
    from charseg.inference import ink_chooser_weights
    from charseg.inference.outlines import (CHOSEN_LEVELS, choose_level, chooser_inputs, chooser_scores, ink_window,
                                            level_features, window_features)

    rgb, polygons = heldout_pages[0]
    box = polygon_boxes(polygons[:1])[0]
    window = ink_window(rgb, list(box), flat_polygon(polygons[0]), CHOSEN_LEVELS, parts=True)
    assert tuple(ink_chooser_weights.LEVELS) == CHOSEN_LEVELS
    inputs = chooser_inputs(level_features(window), window_features(window))
    hidden = np.asarray(ink_chooser_weights.HIDDEN)
    assert inputs.shape == (len(window.candidates), hidden.shape[0]) and len(window.candidates) == len(CHOSEN_LEVELS)
    assert np.asarray(ink_chooser_weights.HIDDEN_BIAS).shape == np.asarray(ink_chooser_weights.OUTPUT).shape == (
        hidden.shape[1],)
    scores = chooser_scores(inputs)
    assert scores.shape == (len(CHOSEN_LEVELS),) and np.isfinite(scores).all() and np.ptp(scores) > 0
    chosen = choose_level(window)
    assert any(chosen is ink for _, ink in window.candidates)


def test_new_models_outline_by_the_ink_and_older_checkpoints_by_their_masks():
    """TrainConfig.outline (default learned) becomes the model's ModelSpec.outline; a checkpoint
    written before the field keeps its masks' outlines; an unknown rule is refused."""
    from charseg.model.architecture import resolve_spec

    assert TrainConfig().outline == "learned"
    assert resolve_spec(TrainConfig(weights="none", anchor_sizes=(16, 32, 64, 128, 256)), [], []).outline == "learned"
    assert resolve_spec(TrainConfig(weights="none", anchor_sizes=(16, 32, 64, 128, 256), outline="mask"),
                        [], []).outline == "mask"
    old = {k: v for k, v in ModelSpec().to_dict().items() if k != "outline"}
    assert ModelSpec.from_dict(old).outline == "mask"
    with pytest.raises(ValueError, match="outline must be one of learned, ink, mask"):
        ModelSpec.from_dict({**old, "outline": "hull"})
    with pytest.raises(ValueError, match="outline must be one of learned, ink, mask"):
        TrainConfig(outline="hull").validate()
    source = dataclasses.replace(ModelSpec(), outline="mask")
    finetuned = resolve_spec(TrainConfig(mode="finetune", outline="ink"), [], [], source=source)
    assert finetuned.outline == "ink"


def test_output_to_instances_outlines_by_the_rule_it_is_given():
    """The same box mask (blurred, a little fat) on a page with the glyph's ink: `mask` traces the
    mask, `ink` and `learned` outline the ink it agrees with."""
    import torch

    from charseg.inference.predict import output_to_instances

    page = np.full((48, 48, 3), 225, np.uint8)
    page[12:36, 20:26] = 40  # an I, 6 px wide
    target = np.zeros((28, 28), np.float32)
    target[2:26, 8:20] = 1.0  # its mask over the box (18, 10, 28, 38), 2 px too wide each side
    output = {"boxes": torch.tensor([[19.0, 11.0, 27.0, 37.0]]), "scores": torch.ones(1),
              "labels": torch.ones(1, dtype=torch.int64), "box_masks": torch.from_numpy(target)[None],
              "mask_frames": torch.tensor([[14.0, 10.0, 32.0, 38.0]])}
    truth = [20.0, 12.0, 26.0, 12.0, 26.0, 36.0, 20.0, 36.0]
    [by_mask] = output_to_instances(output, 0.5, page, "mask")
    [by_ink] = output_to_instances(output, 0.5, page, "ink")
    [by_learned] = output_to_instances(output, 0.5, page, "learned")
    assert iou(by_mask.polygon, truth, 48, 48) < 0.85
    assert iou(by_ink.polygon, truth, 48, 48) == pytest.approx(1.0)
    assert iou(by_learned.polygon, truth, 48, 48) == pytest.approx(1.0)


def test_the_outline_rule_is_the_checkpoint_s_unless_a_command_or_a_call_gives_another(light_checkpoint,
                                                                                     tiny_dataset):
    import pandas as pd
    import torch

    from charseg.errors import CharsegError
    from charseg.inference.predict import load_model_for_inference, outline_rule
    from charseg.inference.serving import CharsegPredictor

    model, spec, _ = load_model_for_inference(light_checkpoint, torch.device("cpu"))
    assert spec.outline == outline_rule(model) == "learned"  # a new run's default
    model, spec, _ = load_model_for_inference(light_checkpoint, torch.device("cpu"), outline="mask")
    assert spec.outline == outline_rule(model) == "mask"
    predictor = CharsegPredictor(str(light_checkpoint), device="cpu", precision="fp32")
    images = pd.DataFrame({"image": [(tiny_dataset / "images" / "00001.png").read_bytes()]})
    with pytest.raises(CharsegError, match="outline must be one of learned, ink, mask"):
        predictor.predict(images, {"outline": "hull"})
    predictor.predict(images, {"outline": "mask", "score_threshold": 0.0})
    assert outline_rule(predictor.model) == "learned"  # the call's rule ended with the call
