"""charseg's NMS for dense pages keeps exactly the boxes torchvision's keeps."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import boxes as box_ops

from charseg.model import nms
from charseg.model.build import build_model, spec_for_weights


def crowded_boxes(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """COUNT boxes in clusters of ten (proposals around one glyph), sizes from 1 to ~150 px,
    some empty, a seventh of the scores tied at 1.0, three categories."""
    gen = torch.Generator().manual_seed(seed)
    centres = (torch.rand(count // 10, 2, generator=gen) * 2000).repeat_interleave(10, 0)
    centres = centres + torch.randn(count, 2, generator=gen) * 3
    scale = torch.exp(torch.randn(count // 10, 1, generator=gen) * 0.8).repeat_interleave(10, 0)
    sizes = (torch.rand(count, 2, generator=gen) * 30 + 1) * scale
    sizes[::97, 0] = 0.0  # empty boxes: IoU 0 with every box
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], 1)
    scores = torch.rand(count, generator=gen)
    scores[::7] = 1.0
    return boxes, scores, torch.randint(0, 3, (count,), generator=gen)


@pytest.mark.parametrize("threshold", [0.7, 0.5, 0.3])
def test_dense_nms_keeps_what_torchvision_keeps(threshold):
    boxes, scores, categories = crowded_boxes(3 * nms.DENSE_BOXES, seed=int(threshold * 10))
    stock = box_ops.batched_nms(boxes, scores, categories, threshold)
    ours = nms.batched_nms(boxes, scores, categories, threshold)
    assert set(ours.tolist()) == set(stock.tolist())
    assert torch.equal(scores[ours], scores[stock])  # by decreasing score
    assert 0.3 * len(boxes) < len(ours) < len(boxes)  # a test where NMS drops many and keeps many


def test_suppression_follows_the_greedy_order_down_a_chain():
    """a suppresses b, b would suppress c: b is dropped, so c is kept; d overlaps c and is dropped."""
    first, later = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3])
    assert nms.greedy_kept(5, first, later).tolist() == [True, False, True, False, True]


def test_every_pair_above_the_threshold_is_found_once():
    boxes, _, categories = crowded_boxes(2000, seed=5)
    a, b = nms.suppressing_pairs(boxes, categories, 0.6)
    found = {tuple(sorted(p)) for p in zip(a.tolist(), b.tolist())}
    iou = box_ops.box_iou(boxes, boxes)
    iou[categories[:, None] != categories[None, :]] = 0
    expected = {(i, j) for i, j in torch.nonzero(torch.triu(iou > 0.6, diagonal=1)).tolist()}
    assert len(found) == len(a) and found == expected and len(expected) > 50


def test_the_rpn_proposes_what_torchvision_proposes_on_a_dense_page():
    """BandedMatchingRPN.filter_proposals (charseg's NMS) against torchvision's own, same inputs:
    20,000 anchors over three levels, the limits of a dense page. Equal scores (sigmoid makes
    some) may come in another order, which torchvision leaves open."""
    spec = spec_for_weights("resnet18", "none", min_size=64, max_size=64)
    ours, stock = build_model(spec).rpn, build_model(spec, polygon_native=False).rpn
    per_level = [12000, 6000, 2000]
    gen = torch.Generator().manual_seed(2)
    boxes, _, _ = crowded_boxes(sum(per_level), seed=3)
    proposals = boxes.clamp(0, 2000)[None].repeat(2, 1, 1)
    objectness = torch.randn(2, len(boxes), generator=gen)
    for rpn in (ours, stock):
        rpn.eval()
        rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"] = 8000, 9000
    got = ours.filter_proposals(proposals, objectness, [(1900, 2000), (2000, 1500)], per_level)
    expected = stock.filter_proposals(proposals, objectness, [(1900, 2000), (2000, 1500)], per_level)
    for got_boxes, expected_boxes in zip(got[0], expected[0]):
        assert {tuple(b) for b in got_boxes.tolist()} == {tuple(b) for b in expected_boxes.tolist()}
        assert len(got_boxes) == 9000
    for got_scores, expected_scores in zip(got[1], expected[1]):
        assert torch.equal(got_scores, expected_scores)
