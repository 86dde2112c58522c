"""The RPN of dense pages: anchor-to-box matching only where boxes can overlap, NMS comparing only
boxes that can suppress each other (nms.py), float32 anchors and outputs whatever the autocast
precision."""

from __future__ import annotations

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops

from . import nms
from .heads import PIXELS
from .sampling import RPN_SALT, SeededSampler

# Anchors per chunk in the RPN's matching (compared with the GT boxes near them only).
ANCHOR_CHUNK = 512


class BandedMatchingRPN(RegionProposalNetwork):
    """RPN whose anchor-to-GT matching computes IoU only where boxes can overlap.

    Stock matching builds a G x A IoU matrix (and box_iou's G x A x 2 intermediates): on a
    1024x1024 page with 1,700 characters and 262k anchors that is 445M pairs, gigabytes and
    most of a training step. Almost all of those pairs are zero: a glyph overlaps only the
    anchors around it. Anchors are sorted into compact chunks (same height, nearby rows) and
    each chunk is compared only with the GT boxes that touch its extent; the matches are
    exactly the stock ones (incl. low-quality matches and their ties).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fg_bg_sampler = SeededSampler(self.fg_bg_sampler.batch_size_per_image,
                                           self.fg_bg_sampler.positive_fraction)

    def forward(self, images, features, targets=None):
        self.fg_bg_sampler.seed_from(targets, RPN_SALT)
        # The RPN has one anchor size per FPN level: the input pixels are not a level.
        return super().forward(images, {k: v for k, v in features.items() if k != PIXELS}, targets)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        """torchvision's, with nms.batched_nms: the same proposals, on a dense page in a tenth of the time."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)  # no backprop through objectness
        levels = torch.cat([torch.full((n,), idx, dtype=torch.int64, device=proposals.device)
                            for idx, n in enumerate(num_anchors_per_level)]).reshape(1, -1).expand_as(objectness)
        top_n_idx = self._get_top_n_idx(objectness, num_anchors_per_level)  # per level, before NMS
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        objectness, levels, proposals = (t[batch_idx, top_n_idx] for t in (objectness, levels, proposals))
        final_boxes, final_scores = [], []
        for boxes, scores, lvl, img_shape in zip(proposals, torch.sigmoid(objectness), levels, image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, img_shape)
            keep = box_ops.remove_small_boxes(boxes, self.min_size)
            keep = keep[scores[keep] >= self.score_thresh]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = nms.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]  # per level
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def assign_targets_to_anchors(self, anchors, targets):
        labels, matched_gt_boxes = [], []
        for anchors_per_image, target in zip(anchors, targets):
            gt_boxes = target["boxes"]
            if gt_boxes.numel() == 0:  # an image without characters: every anchor is background (as stock)
                matched_gt_boxes.append(torch.zeros(anchors_per_image.shape, dtype=torch.float32,
                                                    device=anchors_per_image.device))
                labels.append(torch.zeros(anchors_per_image.shape[0], dtype=torch.float32,
                                          device=anchors_per_image.device))
                continue
            matched_idxs = self._match(gt_boxes, anchors_per_image)
            matched_gt_boxes.append(gt_boxes[matched_idxs.clamp(min=0)])
            labels_per_image = (matched_idxs >= 0).to(dtype=torch.float32)
            labels_per_image[matched_idxs == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
            labels_per_image[matched_idxs == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(labels_per_image)
        return labels, matched_gt_boxes

    def _match(self, gt_boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
        """torchvision's Matcher over overlapping (GT, anchor-chunk) pairs; same result as the full matrix."""
        matcher = self.proposal_matcher
        n = anchors.shape[0]
        # Anchors that overlap no GT keep value 0 (below any threshold), as in the full matrix.
        matched_vals = anchors.new_zeros(n)
        matches = torch.zeros(n, dtype=torch.int64, device=anchors.device)
        best_per_gt = gt_boxes.new_zeros(gt_boxes.shape[0])
        pairs = list(overlapping_chunks(gt_boxes, anchors, ANCHOR_CHUNK))
        for anchor_idx, gt_idx in pairs:
            quality = self.box_similarity(gt_boxes[gt_idx], anchors[anchor_idx])
            vals, idx = quality.max(dim=0)
            matched_vals[anchor_idx], matches[anchor_idx] = vals, gt_idx[idx]
            best_per_gt[gt_idx] = torch.maximum(best_per_gt[gt_idx], quality.max(dim=1).values)
        if matcher.allow_low_quality_matches and bool((best_per_gt == 0).any()):
            # A GT that overlaps no anchor at all: stock then "matches" it to every zero-IoU
            # anchor. Rare (a box off the anchor grid); reproduce it with the full matrix.
            return matcher(self.box_similarity(gt_boxes, anchors))
        all_matches = matches.clone()
        below = matched_vals < matcher.low_threshold
        between = (matched_vals >= matcher.low_threshold) & (matched_vals < matcher.high_threshold)
        matches[below] = matcher.BELOW_LOW_THRESHOLD
        matches[between] = matcher.BETWEEN_THRESHOLDS
        if matcher.allow_low_quality_matches:
            # Each GT keeps its best anchors (ties included), even below the threshold.
            for anchor_idx, gt_idx in pairs:
                quality = self.box_similarity(gt_boxes[gt_idx], anchors[anchor_idx])
                update = anchor_idx[torch.where(quality == best_per_gt[gt_idx, None])[1]]
                matches[update] = all_matches[update]
        return matches


def overlapping_chunks(boxes: torch.Tensor, anchors: torch.Tensor, chunk: int):
    """Yield (anchor indices, indices of the boxes that touch those anchors' extent).

    Anchors are ordered by rounded height, then top edge, so a chunk is a band of one
    anchor size and its extent is tight; a box outside the extent overlaps none of them.
    """
    order = torch.argsort(anchors[:, 1], stable=True)
    heights = torch.round(anchors[order, 3] - anchors[order, 1])
    order = order[torch.argsort(heights, stable=True)]
    for start in range(0, anchors.shape[0], chunk):
        anchor_idx = order[start:start + chunk]
        part = anchors[anchor_idx]
        x1, y1 = part[:, 0].min(), part[:, 1].min()
        x2, y2 = part[:, 2].max(), part[:, 3].max()
        near = (boxes[:, 0] <= x2) & (boxes[:, 2] >= x1) & (boxes[:, 1] <= y2) & (boxes[:, 3] >= y1)
        box_idx = near.nonzero().squeeze(1)
        if box_idx.numel():
            yield anchor_idx, box_idx


class Float32Anchors(AnchorGenerator):
    """Anchors in float32 whatever the features' dtype (torchvision takes it from them: in
    bfloat16 a 1024 px page's anchor corners would be off by up to 4 px)."""

    def forward(self, image_list, feature_maps):
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in feature_maps]
        return super().forward(image_list, shapes)

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device):
        # A model built on the meta device for a checkpoint to fill (inference.load_model_for_inference)
        # holds meta cell anchors: they are no parameter the load sets, so make them now.
        if any(anchors.is_meta for anchors in self.cell_anchors):
            self.cell_anchors = [self.generate_anchors(size, ratios)
                                 for size, ratios in zip(self.sizes, self.aspect_ratios)]
        super().set_cell_anchors(dtype, device)


class Float32RPNHead(RPNHead):
    """torchvision's RPN head whose objectness and box deltas come out in float32 (they are
    decoded into boxes)."""

    def forward(self, x):
        logits, deltas = super().forward(x)
        return [t.float() for t in logits], [t.float() for t in deltas]
