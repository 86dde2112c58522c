"""Seeded sampling of anchors and proposals: each page draws from its own generator (seeded by
(seed, epoch, page)), so which samples a page gives depends on nothing else; and what each
loss averaged over, for weighing the losses of torchrun's processes."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

from ..data.loading import SAMPLE_SEED

# The salt of each sampler's seed (a page's SAMPLE_SEED plus the salt).
RPN_SALT, ROI_SALT = 0, 1
# Each loss is a mean over what one sampler drew in the batch: (sampler, "positive" or "sampled").
LOSS_DENOMINATORS = {"loss_objectness": ("rpn", "sampled"), "loss_rpn_box_reg": ("rpn", "sampled"),
                     "loss_classifier": ("roi", "sampled"), "loss_box_reg": ("roi", "sampled"),
                     "loss_mask": ("roi", "positive")}


class SeededSampler(BalancedPositiveNegativeSampler):
    """torchvision's balanced positive/negative sampler, drawing each page's sample from its
    own generator when the targets carry a `sample_seed` (training pages do): which anchors
    and proposals a page contributes then depends on (seed, epoch, page) only, not on the
    batch it is in, the process it runs in or the global RNG. Without seeds: stock sampling.

    Records what it drew (`drawn`: positives, all) for loss_denominators.
    """

    seeds: list[int] | None = None
    drawn: torch.Tensor | None = None

    def __call__(self, matched_idxs: list[torch.Tensor]):
        if self.seeds is None:
            pos, neg = super().__call__(matched_idxs)
        else:
            pos, neg = [], []
            for labels, seed in zip(matched_idxs, self.seeds):
                generator = torch.Generator().manual_seed(seed)
                positive = torch.where(labels >= 1)[0]
                negative = torch.where(labels == 0)[0]
                num_pos = min(positive.numel(), int(self.batch_size_per_image * self.positive_fraction))
                num_neg = min(negative.numel(), self.batch_size_per_image - num_pos)
                chosen_pos = positive[torch.randperm(positive.numel(), generator=generator)[:num_pos].to(labels.device)]
                chosen_neg = negative[torch.randperm(negative.numel(), generator=generator)[:num_neg].to(labels.device)]
                pos.append(torch.zeros_like(labels, dtype=torch.uint8).index_fill_(0, chosen_pos, 1))
                neg.append(torch.zeros_like(labels, dtype=torch.uint8).index_fill_(0, chosen_neg, 1))
        positives = sum(p.sum() for p in pos)
        self.drawn = torch.stack([positives, positives + sum(n.sum() for n in neg)]).float()
        return pos, neg

    def seed_from(self, targets: list[dict] | None, salt: int) -> None:
        """Seed the next draw from the targets' sample seeds (stock sampling when absent)."""
        if targets and all(SAMPLE_SEED in t for t in targets):
            self.seeds = [(int(t[SAMPLE_SEED]) + salt) % 2**63 for t in targets]
        else:
            self.seeds = None


def loss_denominators(model: nn.Module) -> dict[str, torch.Tensor]:
    """How many samples each loss of the last training forward averaged over (a 0-d tensor
    per loss name): multi-process training weighs each process's losses by these so that the
    averaged gradients equal one process's over the whole batch."""
    samplers = {"rpn": model.rpn.fg_bg_sampler, "roi": model.roi_heads.fg_bg_sampler}
    return {name: samplers[which].drawn[0 if kind == "positive" else 1]
            for name, (which, kind) in LOSS_DENOMINATORS.items()}
