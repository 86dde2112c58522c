"""RoI pooling as one weighted gather of channel vectors (the op's sample points and bilinear
weights; torch's embedding_bag sums them on every core), in float32."""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import MultiScaleRoIAlign, roi_align
# MultiScaleRoIAlign's own steps, so GatherRoIAlign keeps its levels and scales exactly.
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales


def roi_align_taps(rois: torch.Tensor, spatial_scale: float, height: int, width: int,
                   output_size: tuple[int, int], sampling_ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each output bin of roi_align (aligned=False) reads a feature map of HEIGHT x WIDTH
    and with what weight: (index, weight), each (rois x bins, sampling_ratio² x 4 corners).
    index counts pixels over the batch (image, y, x). The sample points, the clamping at the
    borders and the bilinear weights are those of torchvision's CPU kernel
    (roi_align_common.h), in the same float32 operations; samples outside the map weigh 0."""
    (bins_h, bins_w), grid = output_size, sampling_ratio
    start_w, start_h = rois[:, 1] * spatial_scale, rois[:, 2] * spatial_scale
    roi_w = (rois[:, 3] * spatial_scale - start_w).clamp(min=1.0)
    roi_h = (rois[:, 4] * spatial_scale - start_h).clamp(min=1.0)

    def axis(start, roi_size, bins, size):
        """Each bin's sample points along one axis: low/high pixel and their weights, (R, bins, grid)."""
        bin_size = (roi_size / bins)[:, None, None]
        steps = torch.arange(bins, dtype=rois.dtype, device=rois.device)[None, :, None]
        offsets = (torch.arange(grid, dtype=rois.dtype, device=rois.device) + 0.5)[None, None, :]
        pos = start[:, None, None] + steps * bin_size + offsets * bin_size / grid
        outside = (pos < -1.0) | (pos > size)
        pos = pos.clamp(min=0.0)
        low = pos.long()
        last = low >= size - 1
        low = low.clamp(max=size - 1)
        high = torch.where(last, low, low + 1)
        frac = torch.where(last, 0.0, pos - low)
        return low, high, 1.0 - frac, frac, outside

    y_low, y_high, y_w0, y_w1, y_out = (t[:, :, :, None, None] for t in axis(start_h, roi_h, bins_h, height))
    x_low, x_high, x_w0, x_w1, x_out = (t[:, None, None, :, :] for t in axis(start_w, roi_w, bins_w, width))
    image = rois[:, 0].long()[:, None, None, None, None] * (height * width)
    rows_low, rows_high = image + y_low * width, image + y_high * width
    # (R, bin y, sample y, bin x, sample x, corner), corners in the kernel's order
    index = torch.stack([rows_low + x_low, rows_low + x_high, rows_high + x_low, rows_high + x_high], -1)
    weight = torch.stack([y_w0 * x_w0, y_w0 * x_w1, y_w1 * x_w0, y_w1 * x_w1], -1)
    weight = weight.masked_fill((y_out | x_out)[..., None], 0.0)
    taps = grid * grid * 4
    return (index.transpose(2, 3).reshape(-1, taps), weight.transpose(2, 3).reshape(-1, taps))


def gather_roi_align(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                     spatial_scale: float, sampling_ratio: int) -> torch.Tensor:
    """roi_align (aligned=False, as MultiScaleRoIAlign) in float32. On a CPU, one weighted
    gather of channel vectors (embedding_bag over the channels-last feature map, rows
    `roi_align_taps`): all channels of a sample point at once and on every core, where
    torchvision's CPU kernel recomputes each point per channel on one core, and its backward
    scatters per channel too (a third of a 256² training step). The same values up to the
    order of float additions. On other devices, or with an adaptive sampling ratio, the op itself."""
    features, rois = features.float(), rois.float()  # its kernels are float32 (autocast casts so too)
    if features.device.type != "cpu" or sampling_ratio <= 0:
        return roi_align(features, rois, output_size, spatial_scale, sampling_ratio)
    n, channels, height, width = features.shape
    index, weight = roi_align_taps(rois, spatial_scale, height, width, tuple(output_size), sampling_ratio)
    table = features.permute(0, 2, 3, 1).reshape(n * height * width, channels)  # a view when channels-last
    pooled = F.embedding_bag(index, table, per_sample_weights=weight / (sampling_ratio * sampling_ratio), mode="sum")
    return pooled.view(len(rois), *output_size, channels).permute(0, 3, 1, 2)


class GatherRoIAlign(MultiScaleRoIAlign):
    """MultiScaleRoIAlign whose per-level pooling is gather_roi_align: the same levels, scales
    and outputs (channels-last, as the heads' convolutions read them). Traced for export
    (inference/export.py), it is torchvision's: roi_align is an ONNX and TorchScript op,
    embedding_bag with per-sample weights is not."""

    def forward(self, x, boxes, image_shapes):
        if torchvision._is_tracing():
            return super().forward(x, boxes, image_shapes)
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        if len(features) == 1:
            return gather_roi_align(features[0], rois, self.output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        channels = features[0].shape[1]
        result = rois.new_zeros((len(rois), *self.output_size, channels), dtype=torch.float32).permute(0, 3, 1, 2)
        for level, (feature, scale) in enumerate(zip(features, self.scales)):
            in_level = torch.where(levels == level)[0]
            result[in_level] = gather_roi_align(feature, rois[in_level], self.output_size, scale,
                                                self.sampling_ratio)
        return result


def float32_features(features: dict[str, torch.Tensor], levels: Collection[str]) -> dict[str, torch.Tensor]:
    """The feature maps RoI pooling reads, in float32, cast once per forward: roi_align runs in
    float32 under autocast (torchvision's CPU kernel has no bfloat16), and each level it is
    given would otherwise be cast on every call (once per mask chunk, 4 levels each). Reordered
    once too: on a CPU the LEVELS it gathers from into channels-last, which gather_roi_align
    reads as a view (a no-op for build_model's layout outside autocast; a model trained NCHW,
    training_memory_format, would otherwise copy each level on every call); elsewhere every map
    into NCHW, which torchvision's roi_align reads."""

    def cast(name: str, v: torch.Tensor) -> torch.Tensor:
        if not v.is_floating_point():
            return v
        if v.device.type != "cpu":
            return v.float().contiguous()
        return v.float().contiguous(memory_format=torch.channels_last) if name in levels else v.float()

    return {k: cast(k, v) for k, v in features.items()}
