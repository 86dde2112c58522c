"""int8 inference on the CPU (`--precision int8`): the model's convolutions and fully
connected layers quantised after calibration on the user's own pages.

On CPUs without native bfloat16 (AVX2) float32 was the only fast choice; int8 runs the
convolutions in fbgemm's integer kernels (AVX2, AVX-512 VNNI) through PyTorch's static
quantisation (FX graph mode, the x86 backend): weights per output channel, activations per
tensor with ranges observed on a few pages run through the model first. Quantised: the ResNet
body, the FPN's convolutions, the box head, the mask head and the mask predictor's
convolutions (a dense page's time is mostly the mask head's, run once per detection).
What stays float32: the RPN head, RoI pooling, GroupNorm layers (run between a dequantise and
a quantise), box and mask decoding, and every output. The checkpoint is not changed: the
quantised model lives in the process, or in a calibration cache (`--calibration-cache FILE`,
int8_cache.py) from which later processes load it instead of calibrating and converting again.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from ..data.images import PAGE_SUFFIXES, ImageUnusable, load_image_rgb, pages_in
from ..data.loading import image_to_tensor
from ..errors import CharsegError
from ..model.frozen_norm import plain_convolutions
from ..model.heads import PixelMaskPredictor
from .int8_cache import model_fingerprint, read_cache, write_cache
from .predict import detection_limit

ENGINE = "x86"  # PyTorch's default quantised engine on x86: fbgemm's kernels, onednn's where they win
CALIBRATION_PAGES = 4  # pages whose activations set the int8 ranges (the first of the input by default)
# Detections per calibration page whose mask-head activations are observed: the best-scoring
# ones show the heads' value ranges; every detection of a dense page would make the calibration
# cost more than the float32 pass it is meant to shorten.
CALIBRATION_DETECTIONS = 256

log = logging.getLogger("charseg")


def quantizable_parts(model: nn.Module) -> dict[str, tuple[torch.Tensor, ...]]:
    """The parts of MODEL that int8 replaces (dotted names), each with an example input.

    The ResNet body is quantised whole, the FPN convolution by convolution (its forward takes
    a dict, which FX cannot trace), the RoI heads whole, a --mask-pixels predictor part by part
    (its forward also takes the page and the boxes); the RPN head (a list of levels) stays
    float32."""
    heads = model.roi_heads
    channels = model.backbone.out_channels
    box, mask = heads.box_roi_pool.output_size[0], heads.mask_roi_pool.output_size[0]
    parts: dict[str, tuple[torch.Tensor, ...]] = {"backbone.body": (torch.zeros(1, 3, 64, 64),)}
    with torch.no_grad():
        levels = list(model.backbone.body(*parts["backbone.body"]).values())
    for i, level in enumerate(levels):
        parts[f"backbone.fpn.inner_blocks.{i}"] = (level,)
        parts[f"backbone.fpn.layer_blocks.{i}"] = (torch.zeros(1, channels, *level.shape[-2:]),)
    if isinstance(heads.box_head, TwoMLPHead):
        parts["roi_heads.box_head"] = (torch.zeros(2, channels, box, box),)
    if isinstance(heads.mask_head, MaskRCNNHeads):
        parts["roi_heads.mask_head"] = (torch.zeros(2, channels, mask, mask),)
    predictor = heads.mask_predictor
    if type(predictor) is MaskRCNNPredictor:
        parts["roi_heads.mask_predictor"] = (torch.zeros(2, predictor.conv5_mask.in_channels, mask, mask),)
    elif isinstance(predictor, PixelMaskPredictor):
        parts["roi_heads.mask_predictor.conv5_mask"] = (torch.zeros(2, predictor.conv5_mask.in_channels, mask, mask),)
        refine_in = predictor.pixel_refine[0]
        refine_in = refine_in[0] if isinstance(refine_in, nn.Sequential) else refine_in
        parts["roi_heads.mask_predictor.pixel_refine"] = (torch.zeros(2, refine_in.in_channels, 2 * mask, 2 * mask),)
    return parts


def _qconfig_mapping():
    """Weights per output channel (per tensor where fbgemm allows no other: a transposed
    convolution), activations per tensor over their calibration min..max in 7 bits: PyTorch's
    x86 default range, which CPUs without VNNI (AVX2) need to keep their 16-bit sums from
    saturating. Min..max, not PyTorch's histogram: half the calibration time on a document
    page, and the demo's model scored within 0.01 either way on its held-out pages."""
    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.observer import (MinMaxObserver, default_per_channel_weight_observer,
                                                default_weight_observer)

    activation = MinMaxObserver.with_args(reduce_range=True)
    mapping = QConfigMapping().set_global(QConfig(activation=activation, weight=default_per_channel_weight_observer))
    return mapping.set_object_type(nn.ConvTranspose2d, QConfig(activation=activation, weight=default_weight_observer))


@contextmanager
def _quiet_deprecation():
    # torch.ao.quantization warns on every call that it moves to torchao; it is what torch ships.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\.")
        yield


def quantize_model(model: nn.Module, calibrate: Callable[[nn.Module], list[str]],
                   cache: str | Path | None = None, chosen_pages: Sequence[str] | None = None) -> str:
    """Replace MODEL's quantizable_parts (backbone body, FPN convolutions, RoI heads) by int8
    ones, in place.

    CALIBRATE(model) runs the model (float32, observers in those parts) over the calibration
    pages and returns their names. With CACHE (int8_cache): where that file exists, the int8
    parts it holds are used instead (neither CALIBRATE nor the FX conversion runs;
    CalibrationCacheError where it was made for other weights or on pages outside CHOSEN_PAGES,
    the names of the pages the user chose to calibrate on); else it is written after the
    conversion. MODEL must be a CPU model in eval mode. Returns a line saying what was
    quantised. Raises CharsegError where PyTorch has no x86 int8 engine, MODEL is not on the CPU
    or no calibration page could be read."""
    if ENGINE not in torch.backends.quantized.supported_engines:
        raise CharsegError(f"--precision int8 needs PyTorch's {ENGINE!r} quantised engine, which this build lacks "
                           f"(it has {', '.join(torch.backends.quantized.supported_engines)}); use fp32")
    if next(model.parameters()).device.type != "cpu":
        raise CharsegError("--precision int8 runs on the CPU only; pass --device cpu, or use bf16 / fp16 on CUDA")
    parts = quantizable_parts(model)
    torch.backends.quantized.engine = ENGINE
    cache = Path(cache) if cache is not None else None
    fingerprint = model_fingerprint(model) if cache is not None else None  # before any part is swapped
    if cache is not None and cache.is_file():
        converted, pages = read_cache(cache, list(parts), fingerprint, chosen_pages)
        source = f"calibration read from {cache}, made on {len(pages)} page{'s' * (len(pages) != 1)}"
    else:
        converted, pages = _calibrate_and_convert(model, parts, calibrate)
        source = f"calibrated on {len(pages)} page{'s' * (len(pages) != 1)}"
        if cache is not None:
            write_cache(cache, converted, parts, fingerprint, pages)
            source += f", written to {cache}"
    _swap(model, converted)
    what = f"int8 {_summary(parts)} ({source}), the rest float32"
    log.info("inference precision %s", what)
    return what


def _calibrate_and_convert(model: nn.Module, parts: dict[str, tuple[torch.Tensor, ...]],
                           calibrate: Callable[[nn.Module], list[str]]) -> tuple[dict[str, nn.Module], list[str]]:
    """PARTS of MODEL prepared with observers, calibrated by CALIBRATE (run with them in MODEL,
    the float parts put back after) and converted to int8: (the int8 parts by name, the pages)."""
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    mapping = _qconfig_mapping()
    with _quiet_deprecation():
        floats = {name: model.get_submodule(name) for name in parts}
        # In a Sequential, a part that is one torch.nn layer is traced as that layer, not through its forward.
        observed = {name: prepare_fx(nn.Sequential(plain_convolutions(copy.deepcopy(floats[name]))), mapping, example)
                    for name, example in parts.items()}
        _swap(model, observed)
        try:
            with torch.inference_mode():
                pages = calibrate(model)
        finally:
            _swap(model, floats)
        if not pages:
            raise CharsegError("--precision int8: no calibration page could be read")
        return {name: convert_fx(module) for name, module in observed.items()}, pages


def _swap(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def _summary(parts: dict) -> str:
    """The parts' owners, once each: backbone.body, backbone.fpn, roi_heads.box_head, ..."""
    owners = dict.fromkeys(".".join(name.split(".")[:2]) for name in parts)
    return ", ".join(owners)


def page_calibration(paths: Sequence[Path], pages: int = CALIBRATION_PAGES) -> Callable[[nn.Module], list[str]]:
    """A calibration for quantize_model: the model run once over each of the first PAGES
    readable images of PATHS (unreadable ones are passed over; predict names them), keeping
    at most CALIBRATION_DETECTIONS per page; it returns their file names."""
    def calibrate(model: nn.Module) -> list[str]:
        read = []
        with detection_limit(model, min(CALIBRATION_DETECTIONS, model.roi_heads.detections_per_img)):
            for path in paths:
                if len(read) == pages:
                    break
                try:
                    rgb = load_image_rgb(path)
                except ImageUnusable:
                    continue
                model([image_to_tensor(rgb)])
                read.append(path.name)
        return read
    return calibrate


def calibration_pages(calibration_dir: str | None, inputs: Sequence[Path]) -> list[Path]:
    """The images --calibration-dir names (sorted), else INPUTS. Raises CharsegError on a folder
    without images."""
    if calibration_dir is None:
        return list(inputs)
    folder = Path(calibration_dir)
    found = pages_in(folder, recursive=True)[0] if folder.is_dir() else []
    if not found:
        raise CharsegError(f"--calibration-dir {calibration_dir}: no {'/'.join(PAGE_SUFFIXES)} image in it; name a "
                           "folder of pages like the ones you predict")
    return found


def quantize_on_pages(model: nn.Module, calibration_dir: str | None, inputs: Sequence[Path],
                      cache: str | None = None) -> str:
    """quantize_model calibrated on the first pages of CALIBRATION_DIR, else of INPUTS (the
    pages the command reads), or the int8 parts of CACHE where that file exists (then written
    otherwise): `--precision int8` of predict and evaluate."""
    paths = calibration_pages(calibration_dir, inputs)
    # pages the user chose (--calibration-dir): a cache made on others is refused
    chosen = [path.name for path in paths] if calibration_dir is not None else None
    return quantize_model(model, page_calibration(paths), cache, chosen)
