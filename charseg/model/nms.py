"""Non-maximum suppression on dense pages: torchvision's greedy NMS, comparing only boxes that can
suppress each other.

torchvision's CPU kernel compares each kept box with every later box of its category: kept x all
pairs. A page of thousands of characters gives the RPN hundreds of thousands of proposals and keeps
most, so that is billions of IoUs and most of a reading's time, while a box can only be suppressed
by a box of nearly its size and place (IoU above the threshold). Here those pairs are found on a
grid, and the greedy order is resolved over them: the same boxes are kept.
"""

from __future__ import annotations

import math

import torch
from torchvision.ops import boxes as box_ops

# Fewer boxes than this: torchvision's batched_nms as it is (a grid would not pay).
DENSE_BOXES = 4000
# Below this IoU threshold a box can suppress boxes of very different sizes: torchvision's.
MIN_THRESHOLD = 0.25
_NEIGHBOURS = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1)]


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """torchvision.ops.batched_nms, on the CPU by pairs found on a grid (torchvision's own
    elsewhere): the indices of the boxes (x1, y1, x2, y2) kept by greedy NMS (a box is dropped
    when a kept box of the same IDXS value with a higher score overlaps it with IoU above
    IOU_THRESHOLD), by decreasing score. The same boxes are kept; only the order among equal
    scores, which torchvision leaves open, may differ."""
    if (boxes.shape[0] < DENSE_BOXES or iou_threshold < MIN_THRESHOLD or boxes.device.type != "cpu"
            or torch.jit.is_tracing() or torch.jit.is_scripting()):
        return box_ops.batched_nms(boxes, scores, idxs, iou_threshold)
    boxes = boxes.detach()
    order = torch.argsort(scores.detach(), descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    first, later = suppressing_pairs(boxes, idxs, iou_threshold)
    swap = rank[first] > rank[later]
    first, later = torch.where(swap, later, first), torch.where(swap, first, later)
    kept = greedy_kept(order.numel(), first, later)
    return order[kept[order]]


def suppressing_pairs(boxes: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every pair of boxes of one IDXS value with IoU above IOU_THRESHOLD, once each (as two
    index tensors), the IoU computed as torchvision's kernel computes it.

    Such boxes are alike: each side of one is more than IOU_THRESHOLD of the other's, and their
    top-left corners lie less than (1 - IOU_THRESHOLD) of the larger box apart. Boxes are filed by
    size class (powers of two of their longer side) on a grid of cells that large, so a box
    finds its partners in the 3 x 3 cells around it, in its own size class and the next few.
    """
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1) * (y2 - y1)
    real = torch.nonzero((x2 > x1) & (y2 > y1)).squeeze(1)  # an empty box has IoU 0 with every box
    size = torch.maximum(x2 - x1, y2 - y1)[real].double()
    classes = torch.floor(torch.log2(size.clamp(min=2.0 ** -8))).long()
    reach = math.ceil(-math.log2(iou_threshold))  # size classes a partner may lie above
    category = idxs[real].long()
    corner = torch.stack([x1[real], y1[real]], 1).double()
    corner = corner - corner.min(0).values
    side = (1.0 - iou_threshold) * 2.0 ** (1 + reach)  # a size class's cell, over 2 ** class
    keys = _cell_keys(category, classes, torch.floor(corner / torch.exp2(classes.double())[:, None] / side).long())
    sorted_keys, filed = torch.sort(keys)
    found_a, found_b = [], []
    for step in range(reach + 1):
        target = classes + step
        at = torch.floor(corner / torch.exp2(target.double())[:, None] / side).long()
        for offset in torch.tensor(_NEIGHBOURS):
            query = _cell_keys(category, target, at + offset)
            lo = torch.searchsorted(sorted_keys, query)
            counts = torch.searchsorted(sorted_keys, query, right=True) - lo
            a = torch.repeat_interleave(counts)  # each box, once per key matching its query
            b = filed[_ranges(lo, counts)]
            once = (a < b) if step == 0 else torch.ones_like(a, dtype=torch.bool)
            found_a.append(a[once])
            found_b.append(b[once])
    a, b = real[torch.cat(found_a)], real[torch.cat(found_b)]
    inter = ((torch.minimum(x2[a], x2[b]) - torch.maximum(x1[a], x1[b])).clamp(min=0)
             * (torch.minimum(y2[a], y2[b]) - torch.maximum(y1[a], y1[b])).clamp(min=0))
    iou = inter / (areas[a] + areas[b] - inter)
    close = iou > iou_threshold
    return a[close], b[close]


def _cell_keys(category: torch.Tensor, size_class: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """One int64 key per (category, size class, cell column, cell row)."""
    # Columns and rows keep 20 bits: past them distant boxes share a key (more candidates, none
    # lost, as clamping keeps neighbouring cells neighbours).
    column, row = (cells + 1).clamp(0, 2 ** 20 - 1).unbind(1)  # -1 (a neighbour of column 0) -> 0
    return (((category * 64 + size_class + 16) << 20 | column) << 20) | row


def _ranges(starts: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """starts[0], starts[0] + 1, ... (counts[0] values), then the same from starts[1], ..."""
    begins = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum())) - torch.repeat_interleave(begins - starts, counts)


def greedy_kept(count: int, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """Which of COUNT boxes greedy NMS keeps, given every suppressing pair (FIRST before LATER in
    score order): a box is kept when no kept box before it suppresses it. Resolved in rounds:
    each round drops the boxes a kept box suppresses, then keeps every box whose suppressors
    are all decided and none kept (at least the first undecided one: it ends)."""
    unknown, kept, dropped = 0, 1, 2
    status = torch.zeros(count, dtype=torch.int8)
    while True:
        hit = later[status[first] == kept]
        status[hit[status[hit] == unknown]] = dropped
        undecided = status == unknown
        if not bool(undecided.any()):
            return status == kept
        waiting = torch.zeros(count, dtype=torch.bool)
        waiting[later[status[first] == unknown]] = True
        status[undecided & ~waiting] = kept
