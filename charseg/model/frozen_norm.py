"""Frozen BatchNorm applied by the convolution before it: one pass over a feature map instead of
three, and the backbone kept in bfloat16 under autocast."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

_RECOMPUTE = object()  # FrozenBNConv2d's saved weight, recomputed in backward


class FrozenBNConv2d(nn.Conv2d):
    """A convolution and the FrozenBatchNorm2d after it, computed as one convolution whose
    weight and bias are scaled by the norm (weight * scale, shift): the same function, one
    pass over the feature map instead of three. The norm's buffers stay in the norm (state
    dicts unchanged) and are read on every call, so loading or moving the model is seen;
    gradients reach the weight through the scaling, and in training the scaled weight the
    convolution's backward needs is recomputed then instead of kept from forward (a copy of
    every trainable weight less at the peak). Under bf16 autocast this also keeps the
    backbone in bfloat16: FrozenBatchNorm2d's float32 scale promotes its output to float32."""

    @classmethod
    def folding(cls, conv: nn.Conv2d, norm: "FoldedFrozenBatchNorm2d") -> "FrozenBNConv2d":
        """CONV, holding its own parameters (no copy), applying NORM (the module that follows
        it and holds the norm's buffers)."""
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode, device="meta")  # no fill drawn
        folded.weight, folded.bias = conv.weight, conv.bias
        folded.frozen_norm = (norm,)  # a tuple: not registered as a child, so no second state-dict entry
        return folded

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The norm as a factor of the weight (out x 1 x 1 x 1) and the bias it makes."""
        norm = self.frozen_norm[0]
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
        shift = norm.bias - norm.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias * scale
        return scale.reshape(-1, 1, 1, 1), shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        if not (torch.is_grad_enabled() and self.weight.requires_grad):
            return self._conv_forward(x, self.weight * scale, shift)
        # Training: the convolution's backward needs its (scaled) weight; recompute it then
        # rather than keep a copy of every trainable weight from forward to backward.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None

        def scaled() -> torch.Tensor:
            weight = self.weight * scale
            return weight if dtype is None else weight.to(dtype)  # the cast autocast would make

        weight = scaled()
        address = weight.data_ptr()  # the hooks must not hold the weight itself

        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: _RECOMPUTE if t.data_ptr() == address and t.shape == self.weight.shape else t,
                lambda t: scaled().detach() if t is _RECOMPUTE else t):
            return self._conv_forward(x, weight, shift)


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A FrozenBatchNorm2d whose FrozenBNConv2d applies it: passes its input through."""

    @classmethod
    def taking_over(cls, norm: FrozenBatchNorm2d) -> "FoldedFrozenBatchNorm2d":
        """A folded norm holding NORM's own buffers (no copy)."""
        folded = cls(norm.weight.shape[0], eps=norm.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            setattr(folded, name, getattr(norm, name))
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frozen_norm_pairs(module: nn.Module):
    """(parent, convolution's name, its norm's name) for each convolution followed by a
    FrozenBatchNorm2d in torchvision's ResNets: `convN` / `bnN` of the stem and of each block,
    and a downsample's Sequential(conv, norm)."""
    for parent in module.modules():
        children = dict(parent.named_children())
        for name, conv in children.items():
            norm_name = "bn" + name[4:] if name.startswith("conv") else ""
            if isinstance(parent, nn.Sequential) and name.isdigit():
                norm_name = str(int(name) + 1)
            if type(conv) is nn.Conv2d and type(children.get(norm_name)) is FrozenBatchNorm2d:
                yield parent, name, norm_name


def fold_frozen_norms(module: nn.Module) -> nn.Module:
    """Each FrozenBatchNorm2d of MODULE applied by the convolution before it: both replaced by
    a FrozenBNConv2d and a FoldedFrozenBatchNorm2d holding the same parameters and buffers
    under the same names (state dicts unchanged)."""
    for parent, conv_name, norm_name in list(frozen_norm_pairs(module)):
        norm = FoldedFrozenBatchNorm2d.taking_over(getattr(parent, norm_name))
        setattr(parent, norm_name, norm)
        setattr(parent, conv_name, FrozenBNConv2d.folding(getattr(parent, conv_name), norm))
    return module


def plain_convolutions(module: nn.Module) -> nn.Module:
    """MODULE, in place, with each FrozenBNConv2d a plain nn.Conv2d holding the weight and bias
    it computes and each FoldedFrozenBatchNorm2d an Identity: the same function in modules a
    tracer knows (torch.fx, for int8 inference). The norms' buffers are gone, so the state dict
    differs: for a copy used at inference only."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, FrozenBNConv2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                                  child.dilation, child.groups, True, child.padding_mode)
                with torch.no_grad():
                    scale, shift = child.scale_and_shift()
                    plain.weight.copy_(child.weight * scale)
                    plain.bias.copy_(shift)
                setattr(parent, name, plain)
            elif isinstance(child, FoldedFrozenBatchNorm2d):
                setattr(parent, name, nn.Identity())
    return module
