"""A backbone that can recompute its lowest stages in the backward pass instead of keeping
their activations (activation checkpointing, torch.utils.checkpoint).

A model trained from scratch trains every ResNet stage, so the backward pass needs each
stage's activations; on a dense page the lowest stages (strides 2 to 16: a half to a
sixteenth of the page's side) hold most of them. `RecomputingFPN.recompute_stages` = N keeps only
the inputs of the stem and of each residual block of the N lowest stages (the stem and layer1
for 1, through layerN) and runs each of those again, one at a time, in the backward pass: less
memory for one more forward pass of them (TrainConfig.recompute_stages; figures in
docs/BENCHMARKS.md). Gradients, losses and BatchNorm's running statistics are the ones training
without it gives (the second forward pass leaves the statistics alone). A pretrained backbone's
frozen lowest stages keep nothing anyway; at inference nothing changes.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from ..config import RESNET_STAGES


class RecomputingFPN(BackboneWithFPN):
    """torchvision's BackboneWithFPN (the same modules and state dict) whose forward in training
    recomputes the body's `recompute_stages` lowest stages in the backward pass (module docstring)."""

    recompute_stages: int = 0  # 0: keep every activation, as BackboneWithFPN does

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.recompute_stages and self.training and torch.is_grad_enabled():
            return self.fpn(recomputed_body(self.body, x, self.recompute_stages))
        return super().forward(x)


def set_recompute_stages(model: nn.Module, stages: int) -> None:
    """Have MODEL's backbone (a RecomputingFPN, as build_model makes it) recompute its STAGES
    lowest stages in training (0: none)."""
    if not 0 <= stages <= RESNET_STAGES:
        raise ValueError(f"recompute_stages must be 0-{RESNET_STAGES}, got {stages}")
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, RecomputingFPN):
        if stages:
            raise TypeError(f"recompute_stages needs charseg's backbone (a RecomputingFPN), not {type(backbone)}")
        return
    backbone.recompute_stages = stages


def recomputed_body(body: nn.ModuleDict, x: torch.Tensor, stages: int) -> OrderedDict[str, torch.Tensor]:
    """BODY(x) (torchvision's IntermediateLayerGetter over a ResNet: the stem's modules, then
    layer1-layer4, returning the stages' outputs named in `body.return_layers`), with the stem and
    each residual block of the STAGES lowest stages run under a checkpoint of its own: the backward
    pass recomputes one block at a time, so no more than one block's activations are held again."""
    names = list(body.keys())
    first_stage = names.index("layer1")
    x = _recomputed([body[name] for name in names[:first_stage]], x)
    outputs = OrderedDict()
    for number, name in enumerate(names[first_stage:], start=1):
        if number <= stages:
            for block in body[name]:
                x = _recomputed([block], x)
        else:
            x = body[name](x)
        if name in body.return_layers:
            outputs[body.return_layers[name]] = x
    return outputs


def _recomputed(modules: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """MODULES run in order from X under a checkpoint: their activations are not kept but made
    again in the backward pass, where BatchNorm leaves its running statistics alone."""
    first_pass = [True]

    def run(t: torch.Tensor) -> torch.Tensor:
        recomputing, first_pass[0] = not first_pass[0], False
        with _running_stats_kept(modules) if recomputing else contextlib.nullcontext():
            for module in modules:
                t = module(t)
        return t

    return checkpoint(run, x, use_reentrant=False)


@contextlib.contextmanager
def _running_stats_kept(modules: list[nn.Module]) -> Iterator[None]:
    """Within it, the BatchNorm layers of MODULES normalise by the batch's statistics, as in
    training, and their running statistics stay as they are (a recomputation must not count the
    batch twice): a momentum of 0 keeps the running averages, and the batch count is put back."""
    norms = [m for module in modules for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    kept = [(norm.momentum, norm.num_batches_tracked.clone()) for norm in norms]
    for norm in norms:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, (momentum, batches) in zip(norms, kept):
            norm.momentum = momentum
            norm.num_batches_tracked.copy_(batches)
