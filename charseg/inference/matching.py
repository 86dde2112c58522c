"""Matching detections to characters on pages of thousands: only pairs whose boxes overlap.

pycocotools' COCOeval computes the IoU of every detection with every character of a page and
then matches them in pure Python, detections x characters x IoU thresholds: minutes for a page
of 2,000 characters, hours for a document page of 15,000. A pair whose boxes do not overlap has
IoU 0, below every threshold, so it can never match. `SparseCOCOeval` computes and scans only
the pairs whose boxes overlap, with COCOeval's own rules in its own order: the same matches,
hence the same AP to the last bit (tests/test_evaluation.py compares them).
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.cocoeval import COCOeval

ROWS_PER_CHUNK = 1024  # detections compared with every character's box at once


class Candidates:
    """Each detection's characters whose boxes overlap its box, with the pairs' IoUs: row D of a
    detections x characters IoU matrix without its zeros (`columns(d)`, `ious(d)`)."""

    def __init__(self, columns: list[np.ndarray], ious: list[np.ndarray]):
        self._columns, self._ious = columns, ious

    def __len__(self) -> int:
        return len(self._columns)

    def columns(self, row: int) -> np.ndarray:
        return self._columns[row]

    def ious(self, row: int) -> np.ndarray:
        return self._ious[row]


def overlapping(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> list[np.ndarray]:
    """For each of DET_BOXES (N x 4, COCO x, y, w, h), the indices of GT_BOXES it overlaps (a
    positive intersection), ascending."""
    det, gt = np.asarray(det_boxes, np.float64).reshape(-1, 4), np.asarray(gt_boxes, np.float64).reshape(-1, 4)
    gx1, gy1, gx2, gy2 = gt[:, 0], gt[:, 1], gt[:, 0] + gt[:, 2], gt[:, 1] + gt[:, 3]
    found = []
    for start in range(0, len(det), ROWS_PER_CHUNK):
        d = det[start:start + ROWS_PER_CHUNK, :, None]
        hits = ((np.minimum(d[:, 0] + d[:, 2], gx2) > np.maximum(d[:, 0], gx1))
                & (np.minimum(d[:, 1] + d[:, 3], gy2) > np.maximum(d[:, 1], gy1)))
        found += [np.flatnonzero(row) for row in hits]
    return found


def candidate_ious(dets: list, gts: list, iscrowd: list[int], boxes: bool) -> Candidates:
    """The IoUs of DETS with the GTS their boxes overlap (pycocotools' IoU: RLEs, or COCO boxes when
    BOXES), crowd regions as pycocotools counts them."""
    if boxes:
        det_boxes, gt_boxes = np.asarray(dets, np.float64), np.asarray(gts, np.float64)
    else:
        det_boxes = mask_utils.toBbox(dets) if dets else np.zeros((0, 4))
        gt_boxes = mask_utils.toBbox(gts) if gts else np.zeros((0, 4))
    columns = overlapping(det_boxes, gt_boxes) if len(gts) else [np.zeros(0, int) for _ in dets]
    ious = []
    for det, cols in zip(dets, columns):
        if len(cols):
            ious.append(np.asarray(mask_utils.iou([det], [gts[j] for j in cols], [iscrowd[j] for j in cols]),
                                   np.float64).reshape(-1))
        else:
            ious.append(np.zeros(0))
    return Candidates(columns, ious)


def greedy_matches(candidates: Candidates, threshold: float) -> int:
    """One-to-one matches at IoU >= THRESHOLD, detections in their order (by score), each taking
    its best unmatched character (of equals, the last): the number of detections matched."""
    matched: set[int] = set()
    for row in range(len(candidates)):
        best = max(((iou, j) for j, iou in zip(candidates.columns(row).tolist(), candidates.ious(row).tolist())
                    if j not in matched and iou >= threshold), default=None)
        if best is not None:
            matched.add(best[1])
    return len(matched)


class SparseCOCOeval(COCOeval):
    """COCOeval with IoUs computed and scanned only where boxes overlap: its results exactly."""

    def computeIoU(self, imgId, catId):  # noqa: N802, N803  (COCOeval's names)
        gt, dt = self._gts_dts(imgId, catId)
        if not gt and not dt:
            return []
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")][:self.params.maxDets[-1]]
        key = "segmentation" if self.params.iouType == "segm" else "bbox"
        return candidate_ious([d[key] for d in dt], [g[key] for g in gt], [int(g["iscrowd"]) for g in gt],
                              boxes=key == "bbox")

    def evaluateImg(self, imgId, catId, aRng, maxDet):  # noqa: N802, N803
        gt, dt = self._gts_dts(imgId, catId)
        if not gt and not dt:
            return None
        for g in gt:
            g["_ignore"] = int(bool(g["ignore"] or g["area"] < aRng[0] or g["area"] > aRng[1]))
        gtind = np.argsort([g["_ignore"] for g in gt], kind="mergesort")
        gt = [gt[i] for i in gtind]
        dt = [dt[i] for i in np.argsort([-d["score"] for d in dt], kind="mergesort")[:maxDet]]
        iscrowd = [int(g["iscrowd"]) for g in gt]
        gt_ignore = np.array([g["_ignore"] for g in gt])
        thresholds = self.params.iouThrs
        gt_matches, dt_matches = np.zeros((len(thresholds), len(gt))), np.zeros((len(thresholds), len(dt)))
        dt_ignore = np.zeros((len(thresholds), len(dt)))
        candidates = self.ious[imgId, catId]
        if len(candidates):
            position = np.empty(len(gtind), int)
            position[gtind] = np.arange(len(gtind))  # a character's place once ignored ones are sorted last
            rows = []
            for dind in range(len(dt)):
                places = position[candidates.columns(dind)]
                order = np.argsort(places, kind="mergesort")
                rows.append(list(zip(places[order].tolist(), candidates.ious(dind)[order].tolist())))
            for tind, threshold in enumerate(thresholds):
                for dind, d in enumerate(dt):
                    m = _best_character(rows[dind], min(threshold, 1 - 1e-10), gt_matches[tind], iscrowd, gt_ignore)
                    if m >= 0:
                        dt_ignore[tind, dind] = gt_ignore[m]
                        dt_matches[tind, dind] = gt[m]["id"]
                        gt_matches[tind, m] = d["id"]
        outside = np.array([d["area"] < aRng[0] or d["area"] > aRng[1] for d in dt]).reshape((1, len(dt)))
        dt_ignore = np.logical_or(dt_ignore, np.logical_and(dt_matches == 0, np.repeat(outside, len(thresholds), 0)))
        return {"image_id": imgId, "category_id": catId, "aRng": aRng, "maxDet": maxDet,
                "dtIds": [d["id"] for d in dt], "gtIds": [g["id"] for g in gt], "dtMatches": dt_matches,
                "gtMatches": gt_matches, "dtScores": [d["score"] for d in dt], "gtIgnore": gt_ignore,
                "dtIgnore": dt_ignore}

    def _gts_dts(self, img_id, cat_id) -> tuple[list, list]:
        if self.params.useCats:
            return self._gts[img_id, cat_id], self._dts[img_id, cat_id]
        return ([g for c in self.params.catIds for g in self._gts[img_id, c]],
                [d for c in self.params.catIds for d in self._dts[img_id, c]])


def _best_character(row: list[tuple[int, float]], iou: float, gt_matches: np.ndarray, iscrowd: list[int],
                    gt_ignore: np.ndarray) -> int:
    """COCOeval.evaluateImg's choice for one detection, over its overlapping characters ROW
    ((place, IoU), places ascending): the best unmatched one at IoU >= IOU, regular characters
    before ignored ones; -1 for none."""
    m = -1
    for gind, value in row:
        if gt_matches[gind] > 0 and not iscrowd[gind]:
            continue
        if m > -1 and gt_ignore[m] == 0 and gt_ignore[gind] == 1:
            break
        if value < iou:
            continue
        iou, m = value, gind
    return m
