"""Matching on pages of thousands: only overlapping pairs, pycocotools' results exactly."""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from charseg.inference.matching import SparseCOCOeval, candidate_ious, greedy_matches


def crowded_page(seed: int, characters: int, side: int, crowds: int = 0) -> tuple[COCO, list[dict]]:
    """Characters as random boxes on a page, some touching, a few crowd regions; detections
    jittered from them (some twice, with equal scores and equal IoUs), missed ones and strays."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, side - 12, (characters, 2)).round()
    wh = rng.integers(3, 12, (characters, 2))
    anns = []
    for i, ((x, y), (w, h)) in enumerate(zip(xy, wh)):
        anns.append({"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x, y, w, h], "area": float(w * h),
                     "iscrowd": int(i < crowds), "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    gt = COCO()
    gt.dataset = {"images": [{"id": 1, "height": side, "width": side}], "categories": [{"id": 1}],
                  "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    dets = []
    for (x, y), (w, h) in zip(xy, wh):
        for _ in range(rng.choice([0, 1, 1, 1, 2])):
            box = [x + rng.integers(-2, 3), y + rng.integers(-2, 3), w + rng.integers(-2, 3), h]
            dets.append({"image_id": 1, "category_id": 1, "score": float(rng.choice([0.9, 0.7, 0.7, 0.5])),
                         "bbox": [float(v) for v in box]})
    for x, y in rng.uniform(0, side - 8, (characters // 10, 2)):
        dets.append({"image_id": 1, "category_id": 1, "score": 0.3, "bbox": [float(x), float(y), 6.0, 7.0]})
    for d in dets:
        x, y, w, h = d["bbox"]
        w, h = max(w, 1.0), max(h, 1.0)
        d["bbox"] = [x, y, w, h]
        d["segmentation"] = mask_utils.frPyObjects([[x, y, x + w, y, x + w, y + h, x, y + h]], side, side)[0]
    return gt, dets


def coco_run(cls, gt: COCO, dets: list[dict], iou_type: str) -> tuple[COCOeval, float]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = cls(gt, gt.loadRes([dict(d) for d in dets]), iou_type)
        coco_eval.params.maxDets = [1, 10, 10_000]
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_eval, time.perf_counter() - start


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_sparse_cocoeval_gives_pycocotools_results_exactly(iou_type):
    """Touching characters, crowd regions, ties in score and IoU, COCO's area ranges: every match
    and every precision the same as pycocotools' own COCOeval."""
    gt, dets = crowded_page(seed=3, characters=400, side=160, crowds=8)
    dense, _ = coco_run(COCOeval, gt, dets, iou_type)
    sparse, _ = coco_run(SparseCOCOeval, gt, dets, iou_type)
    assert len(dense.evalImgs) == len(sparse.evalImgs) == 4  # one per area range
    for a, b in zip(dense.evalImgs, sparse.evalImgs):
        for key in ("dtIds", "gtIds", "dtScores"):
            assert a[key] == b[key]
        for key in ("dtMatches", "gtMatches", "gtIgnore", "dtIgnore"):
            np.testing.assert_array_equal(a[key], b[key])
    assert (dense.eval["precision"] > 0).any()
    np.testing.assert_array_equal(dense.eval["precision"], sparse.eval["precision"])
    np.testing.assert_array_equal(dense.eval["recall"], sparse.eval["recall"])


def test_greedy_matches_are_the_all_pairs_matches():
    gt, dets = crowded_page(seed=5, characters=300, side=120)
    gts = [mask_utils.frPyObjects(a["segmentation"], 120, 120)[0] for a in gt.dataset["annotations"]]
    det_rles = [d["segmentation"] for d in sorted(dets, key=lambda d: -d["score"])]
    ious = mask_utils.iou(det_rles, gts, [0] * len(gts))
    for threshold in (0.5, 0.75):
        matched, expected = set(), 0
        for row in ious:
            options = [(iou, j) for j, iou in enumerate(row) if j not in matched and iou >= threshold]
            if options:
                matched.add(max(options)[1])
                expected += 1
        assert 20 < expected == greedy_matches(candidate_ious(det_rles, gts, [0] * len(gts), boxes=False), threshold)


def test_a_page_of_thousands_is_matched_in_seconds():
    """4,000 characters: pycocotools compares every pair in Python (about 160 M steps), the
    sparse pass only the overlapping ones."""
    gt, dets = crowded_page(seed=7, characters=4000, side=1100)
    sparse, seconds = coco_run(SparseCOCOeval, gt, dets, "segm")
    assert seconds < 30 and (sparse.eval["precision"] > 0).any()
