"""Build Mask R-CNN (ResNet FPN) for N classes with the chosen initial weights."""

from __future__ import annotations

import inspect
import urllib.error
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models import ResNet18_Weights, ResNet34_Weights, ResNet50_Weights, resnet
from torchvision.models.detection import FasterRCNN, MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..config import NORMS, OUTLINES
from ..errors import WeightsError, empty_file, reason
from ..polygons import PIXEL_CENTRE
from .frozen_norm import fold_frozen_norms
from .heads import PasteFreeTransform, PixelFPN, PixelMaskPredictor, PolygonMaskRCNN, PolygonRoIHeads
from .recompute import RecomputingFPN
from .roi_pool import GatherRoIAlign
from .rpn import BandedMatchingRPN, Float32Anchors, Float32RPNHead

NUM_CLASSES = 2  # background 0, character 1
BACKBONES = ("resnet50", "resnet34", "resnet18")
WEIGHT_CHOICES = ("coco", "imagenet", "none")  # or a path to a local file
GROUPS = 32  # GroupNorm groups (Wu and He, 2018): every ResNet, FPN and head width divides by 32
BOX_REPRESENTATION = 1024  # the box head's two fully connected layers (TwoMLPHead), as torchvision
_IMAGENET = {"resnet50": ResNet50_Weights.IMAGENET1K_V1, "resnet34": ResNet34_Weights.IMAGENET1K_V1,
             "resnet18": ResNet18_Weights.IMAGENET1K_V1}
# RPN anchors: one size per FPN level (P2-P6, strides 4-64), three aspect ratios (height/width)
# per location, so the RPN head keeps the shape of torchvision's (and COCO weights still fit).
STOCK_ANCHOR_SIZES = (32, 64, 128, 256, 512)  # torchvision's, for COCO objects; charseg fits its own (anchors.py)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
# The pixel refine of new --mask-pixels models: 3x3 convolutions with these dilations see
# 31x31 cells, the whole box. On held-out glyph boxes a pixel-only head of this shape reached
# mask IoU 0.645 (81% of boxes >= 0.5) in 300 steps where two plain convolutions reached 0.536
# (57%) (bench/mask_head.py, docs/FROM_SCRATCH.md).
PIXEL_DILATIONS = (2, 4, 8, 1)
# Keys of the class-specific layers, re-initialised when a file was trained for other classes.
_HEAD_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.mask_fcn_logits.")
# The predictors that COCO weights leave to a new model (their deconvolution included).
_PREDICTOR_PREFIXES = ("roi_heads.box_predictor.", "roi_heads.mask_predictor.")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture facts needed to rebuild a model before loading its weights."""

    backbone: str = "resnet50"
    num_classes: int = NUM_CLASSES
    min_size: int = 800
    max_size: int = 1333
    # > 0: each page is resized by this factor of its own size (training, inference) instead of
    # its short side to min_size; max_size still caps the long side. Characters are sized in
    # pixels, not as a share of their page: resizing pages to one side rescales their glyphs.
    scale_train: float = 0.0
    scale_test: float = 0.0
    # Pretrained backbones keep frozen BatchNorm statistics (as torchvision does); a
    # backbone trained from scratch needs live normalisation to train at all.
    frozen_bn: bool = True
    # Live normalisation from scratch: "batch" (torchvision's BatchNorm in the backbone), or
    # "group": GroupNorm in the backbone, the FPN and the mask head, as He, Girshick and
    # Dollar train Mask R-CNN from scratch (batch statistics of 2 images are too noisy, and
    # the running averages used at inference drift away from them).
    norm: str = "batch"
    # FPN output channels, also the width of the mask head: 256 is torchvision's; 128 trains
    # a small model (few, simple classes) about 2.8x faster per step on a CPU.
    fpn_channels: int = 256
    # The mask predictor also reads the input pixels inside each box at 28x28 (model/heads.
    # PixelMaskPredictor): small glyphs are a few cells of the stride-4 features.
    mask_pixels: bool = False
    # Dilations of the PixelMaskPredictor's refining blocks after its first convolution:
    # (2, 4, 8, 1) sees the whole 28x28 box, so it can fill a glyph's outline; () is the first
    # version's two plain convolutions (a 5x5 view), which checkpoints without this field have.
    pixel_dilations: tuple[int, ...] = ()
    # 3x3 convolutions of the mask head before the predictor's deconvolution: torchvision's 4
    # (and every checkpoint without this field). Fewer are cheaper per RoI, in training and at
    # inference; what each count scores is in docs/FROM_SCRATCH.md.
    mask_head_convs: int = 4
    # Their width, and the predictor's deconvolution's: 0 (every checkpoint without this field)
    # is the FPN's, as torchvision builds it. Narrower is cheaper per RoI (docs/FROM_SCRATCH.md).
    mask_head_channels: int = 0
    trainable_layers: int = 3  # backbone stages trained, counted from the top (0-5)
    # torchvision's COCO weights were converted with FrozenBatchNorm eps 0 and must keep it.
    frozen_bn_eps: float = 1e-5
    # Proposal, sampler and detection limits (torchvision's defaults).
    rpn_proposals_train: int = 2000  # RPN proposals kept per image before and after NMS, training
    rpn_proposals_test: int = 1000  # the same at inference
    roi_samples: int = 512  # proposals sampled per image for the box and mask heads' losses
    detections_per_img: int = 100  # most detections returned per image
    # RPN anchor size per FPN level; torchvision's unless the run chose others (checkpoints
    # written before this field existed were trained with these).
    anchor_sizes: tuple[int, ...] = STOCK_ANCHOR_SIZES
    # Each mask covers its box itself (targets rasterised in the box; --mask-pixels reads the
    # pixels with roi_align aligned=True, as detectron2's ROIAlignV2), not stock torchvision's
    # frame half a pixel (of the resized page) past it, which cuts every character's left and
    # top half pixel off its mask. False: checkpoints written before this field.
    mask_in_box: bool = False
    # Weight of the Dice term of the mask loss (TrainConfig.mask_dice); 0: BCE alone, as
    # checkpoints without this field were trained.
    mask_dice: float = 0.0
    # Median character height of the training pages, px, at their own size (0: unknown, as in
    # checkpoints without this field). A page-scaled model reads a page whose characters are
    # smaller than this again, enlarged (PolygonMaskRCNN.glyph_height).
    glyph_height: float = 0.0
    # px at the model's input: at inference each mask is outlined in its box grown by this on
    # every side (PolygonRoIHeads.grown_for_masks); the reported box is not grown. 0: in the box
    # itself, as checkpoints without this field do.
    mask_box_margin: float = 0.0
    # How inference outlines each mask (inference/outlines.py): "learned" and "ink" snap the mask's
    # contour to the ink's edge on the page where the two agree (at the level a learned chooser
    # picks, or at the one agreeing best with the mask); "mask" keeps the mask's own contour, as
    # checkpoints without this field do.
    outline: str = "mask"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        """Rebuild a spec from `to_dict()` output (a checkpoint's `model_spec`). Fields it lacks
        take their defaults (older checkpoints); unknown fields are a ValueError."""
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model_spec keys: {sorted(unknown)}")
        values = dict(values)
        if values.get("outline", "mask") not in OUTLINES:
            raise ValueError(f"model_spec outline must be one of {', '.join(OUTLINES)}, got {values['outline']!r}")
        for key in ("anchor_sizes", "pixel_dilations"):  # any sequence of ints; a tuple keeps the spec hashable
            if key in values:
                values[key] = tuple(int(size) for size in values[key])
        return cls(**values)

    def detector_kwargs(self) -> dict:
        """Keyword arguments of torchvision's MaskRCNN for this spec."""
        return {"min_size": self.min_size, "max_size": self.max_size,
                "rpn_pre_nms_top_n_train": self.rpn_proposals_train, "rpn_post_nms_top_n_train": self.rpn_proposals_train,
                "rpn_pre_nms_top_n_test": self.rpn_proposals_test, "rpn_post_nms_top_n_test": self.rpn_proposals_test,
                "box_batch_size_per_image": self.roi_samples, "box_detections_per_img": self.detections_per_img,
                "rpn_anchor_generator": AnchorGenerator(tuple((size,) for size in self.anchor_sizes),
                                                        (ANCHOR_RATIOS,) * len(self.anchor_sizes))}


def spec_for_weights(backbone: str, weights: str, **sizes_and_limits) -> ModelSpec:
    """The architecture torchvision uses for this initialisation.

    sizes_and_limits: min_size, max_size, anchor_sizes and the ModelSpec limit fields.
    """
    if backbone not in BACKBONES:
        raise WeightsError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")
    norm = sizes_and_limits.pop("norm", "batch")
    if norm not in NORMS:
        raise WeightsError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    if norm == "group" and weights in ("coco", "imagenet"):
        raise WeightsError(f"--norm group trains from scratch: {weights} weights were trained with BatchNorm; "
                           "pass --weights none (or a checkpoint trained with --norm group)")
    if norm == "group" and sizes_and_limits.get("fpn_channels", 256) % GROUPS:
        raise WeightsError(f"--norm group splits channels into {GROUPS} groups: --fpn-channels must be a multiple "
                           f"of {GROUPS}, got {sizes_and_limits['fpn_channels']}")
    if weights == "coco" and sizes_and_limits.get("fpn_channels", 256) != 256:
        raise WeightsError("COCO Mask R-CNN weights have 256 FPN channels; drop --fpn-channels or pass "
                           "--weights imagenet or none")
    if norm == "group" and sizes_and_limits.get("mask_head_channels", 0) % GROUPS:
        raise WeightsError(f"--norm group splits channels into {GROUPS} groups: --mask-head-channels must be a "
                           f"multiple of {GROUPS}, got {sizes_and_limits['mask_head_channels']}")
    if weights == "coco" and sizes_and_limits.get("mask_head_channels", 0) not in (0, 256):
        raise WeightsError("COCO Mask R-CNN weights have a mask head of 256 channels; drop --mask-head-channels "
                           "or pass --weights imagenet or none")
    if weights == "coco" and sizes_and_limits.get("mask_head_convs", 4) != 4:
        raise WeightsError("COCO Mask R-CNN weights have a mask head of 4 convolutions; drop --mask-head-convs "
                           "or pass --weights imagenet or none")
    pretrained = weights != "none" and norm == "batch"
    dilations = PIXEL_DILATIONS if sizes_and_limits.get("mask_pixels") else ()
    return ModelSpec(backbone=backbone, frozen_bn=pretrained, trainable_layers=3 if pretrained else 5,
                     frozen_bn_eps=0.0 if weights == "coco" else 1e-5, norm=norm, pixel_dilations=dilations,
                     mask_in_box=True, **sizes_and_limits)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels)


def build_model(spec: ModelSpec, polygon_native: bool = True) -> MaskRCNN:
    """A randomly initialised Mask R-CNN with this architecture: a PolygonMaskRCNN
    (model/heads.py and its neighbours: polygon mask targets, banded anchor matching, box-sized mask outputs,
    frozen norms folded into their convolutions, channels-last weights) whose state dict is
    torchvision's. polygon_native=False gives torchvision's own MaskRCNN with full-image masks
    (for comparisons)."""
    if spec.frozen_bn:
        norm_layer = misc_nn_ops.FrozenBatchNorm2d
    else:
        norm_layer = group_norm if spec.norm == "group" else nn.BatchNorm2d
    body = resnet.__dict__[spec.backbone](weights=None, norm_layer=norm_layer)
    for module in body.modules():
        if isinstance(module, misc_nn_ops.FrozenBatchNorm2d):
            module.eps = spec.frozen_bn_eps
    # GroupNorm also in the FPN and the mask head: torchvision's maskrcnn_resnet50_fpn_v2 layout.
    head_norm = group_norm if spec.norm == "group" else None
    if not polygon_native:
        if spec.mask_pixels:
            raise ValueError("mask_pixels needs the polygon-native heads; stock torchvision has no such predictor")
        if spec.scale_train or spec.scale_test:
            raise ValueError("scale_train / scale_test need charseg's transform; stock torchvision resizes to min_size")
        backbone = fpn_backbone(body, spec.trainable_layers, spec.fpn_channels, head_norm)
        return MaskRCNN(backbone, **_heads(spec, head_norm), **spec.detector_kwargs())
    backbone = fpn_backbone(body, spec.trainable_layers, spec.fpn_channels, head_norm,
                            PixelFPN if spec.mask_pixels else RecomputingFPN)
    fold_frozen_norms(backbone)
    model = _polygon_mask_rcnn(backbone, spec, **_heads(spec, head_norm))
    # oneDNN's convolutions run channels-last without reordering each input and output.
    return model.to(memory_format=torch.channels_last)


def build_model_from_state(spec: ModelSpec, state: dict[str, torch.Tensor]) -> MaskRCNN:
    """build_model(spec) holding STATE's tensors (a checkpoint's model state, loaded strictly):
    no initial weight is drawn, and none allocated only to be overwritten. Built on the meta
    device with the random fills skipped (there torch.nn.init's draws run through torch._refs,
    whose first call imports torch._dynamo, a large share of a start), then given STATE's
    tensors, each in the dtype and memory format build_model gives it."""
    with torch.device("meta"), _RandomFillsSkipped():
        model = build_model(spec)
    expected = model.state_dict()
    state = {key: value.to(expected[key].dtype) if key in expected else value for key, value in state.items()}
    model.load_state_dict(state, assign=True)
    return model.to(memory_format=torch.channels_last)


class _RandomFillsSkipped(TorchFunctionMode):
    """Within it, the random fills of torch.nn.init and of the layers' reset_parameters return
    their tensor untouched. A torch function mode: scoped to this block and thread, where
    patching torch.nn.init would change it for the whole process."""

    # The nn.init functions that dispatch to a mode themselves, and the Tensor methods that the
    # others (kaiming_normal_, xavier_*) end in.
    SKIPPED = frozenset({nn.init.uniform_, nn.init.normal_, nn.init.kaiming_uniform_, nn.init.trunc_normal_,
                         torch.Tensor.uniform_, torch.Tensor.normal_})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


# torchvision's own defaults for what charseg does not set (thresholds, samplers, image norm).
_TORCHVISION = {name: p.default for name, p in inspect.signature(FasterRCNN.__init__).parameters.items()}
_IMAGE_MEAN, _IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # FasterRCNN's for image_mean=None


def _polygon_mask_rcnn(backbone: BackboneWithFPN, spec: ModelSpec, num_classes: int | None = None,
                       box_predictor: nn.Module | None = None, mask_head: nn.Module | None = None,
                       mask_predictor: nn.Module | None = None) -> PolygonMaskRCNN:
    """MaskRCNN(backbone, ...) as torchvision assembles it, from charseg's parts: each part
    made in the order torchvision's constructors make it, so a seed gives the same weights."""
    tv, channels = _TORCHVISION, backbone.out_channels
    if mask_head is None:
        mask_head = MaskRCNNHeads(channels, (256, 256, 256, 256), 1)
    if mask_predictor is None:
        mask_predictor = MaskRCNNPredictor(256, 256, num_classes)
    anchors = Float32Anchors(tuple((size,) for size in spec.anchor_sizes), (ANCHOR_RATIOS,) * len(spec.anchor_sizes))
    rpn = BandedMatchingRPN(
        anchors, Float32RPNHead(channels, anchors.num_anchors_per_location()[0]), tv["rpn_fg_iou_thresh"],
        tv["rpn_bg_iou_thresh"], tv["rpn_batch_size_per_image"], tv["rpn_positive_fraction"],
        {"training": spec.rpn_proposals_train, "testing": spec.rpn_proposals_test},
        {"training": spec.rpn_proposals_train, "testing": spec.rpn_proposals_test}, tv["rpn_nms_thresh"],
        score_thresh=tv["rpn_score_thresh"])
    box_head = TwoMLPHead(channels * 7 ** 2, BOX_REPRESENTATION)
    if box_predictor is None:
        box_predictor = FastRCNNPredictor(BOX_REPRESENTATION, num_classes)
    offset = 0.0 if spec.mask_in_box else PIXEL_CENTRE
    roi_heads = PolygonRoIHeads(
        GatherRoIAlign(["0", "1", "2", "3"], 7, 2), box_head, box_predictor, tv["box_fg_iou_thresh"],
        tv["box_bg_iou_thresh"], spec.roi_samples, tv["box_positive_fraction"], tv["bbox_reg_weights"],
        tv["box_score_thresh"], tv["box_nms_thresh"], spec.detections_per_img,
        mask_roi_pool=GatherRoIAlign(["0", "1", "2", "3"], 14, 2), mask_head=mask_head,
        mask_predictor=mask_predictor, mask_frame_offset=offset, mask_dice=spec.mask_dice,
        mask_box_margin=spec.mask_box_margin, outline=spec.outline)
    transform = PasteFreeTransform(spec.min_size, spec.max_size, _IMAGE_MEAN, _IMAGE_STD,
                                   page_scales=(spec.scale_train, spec.scale_test), mask_frame_offset=offset)
    return PolygonMaskRCNN(backbone, rpn, roi_heads, transform, spec.glyph_height)


def fpn_backbone(body: nn.Module, trainable_layers: int, channels: int, norm_layer=None,
                 kind: type[BackboneWithFPN] = BackboneWithFPN) -> BackboneWithFPN:
    """torchvision's _resnet_fpn_extractor (stages 1-4, P6 by max pooling, the lower stages
    frozen) with `channels` FPN outputs instead of its fixed 256; KIND: BackboneWithFPN or a
    subclass (RecomputingFPN, PixelFPN)."""
    layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        layers_to_train.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in layers_to_train):
            parameter.requires_grad_(False)
    stage2 = body.inplanes // 8
    return kind(body, {f"layer{k}": str(k - 1) for k in (1, 2, 3, 4)},
                           [stage2 * 2 ** (k - 1) for k in (1, 2, 3, 4)], channels,
                           extra_blocks=LastLevelMaxPool(), norm_layer=norm_layer)


def _heads(spec: ModelSpec, norm_layer) -> dict:
    """MaskRCNN's head arguments: torchvision's defaults for 256 channels without norm and its
    4-convolution mask head; otherwise a mask head of `mask_head_convs` convolutions of
    `mask_head_channels` (0: as wide as the FPN), normalised with `norm_layer`, its predictor
    reading the pixels too with `mask_pixels`."""
    width = spec.mask_head_channels or spec.fpn_channels
    if spec.fpn_channels == 256 == width and norm_layer is None and not spec.mask_pixels and spec.mask_head_convs == 4:
        return {"num_classes": spec.num_classes}
    if spec.mask_pixels:
        predictor = PixelMaskPredictor(width, width, spec.num_classes, dilations=spec.pixel_dilations,
                                       aligned=spec.mask_in_box)
    else:
        predictor = MaskRCNNPredictor(width, width, spec.num_classes)
    return {"num_classes": None, "box_predictor": FastRCNNPredictor(BOX_REPRESENTATION, spec.num_classes),
            "mask_head": MaskRCNNHeads(spec.fpn_channels, [width] * spec.mask_head_convs, 1, norm_layer=norm_layer),
            "mask_predictor": predictor}


def _offline_error(what: str, exc: Exception) -> WeightsError:
    return WeightsError(
        f"could not download the {what} weights ({exc}). Without internet pass `--weights none` "
        "(random init) or `--weights PATH` to a local file (a torchvision state dict such as "
        "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth, or a charseg checkpoint)")


def create_model(spec: ModelSpec, weights: str) -> tuple[MaskRCNN, str]:
    """Build the model of `spec` initialised from `weights`.

    weights: "coco" (COCO Mask R-CNN, heads replaced), "imagenet" (backbone only), "none",
    or a path to a torchvision state dict or charseg checkpoint.
    Returns (model, one line describing what was loaded).
    """
    if weights == "coco":
        if spec.backbone != "resnet50":
            raise WeightsError(f"COCO Mask R-CNN weights exist only for resnet50, not {spec.backbone}; "
                               "pass `--weights imagenet` or `--weights none`")
        model = build_model(spec)  # the spec's model whole: page scales, --mask-pixels, its mask frame
        try:
            state = MaskRCNN_ResNet50_FPN_Weights.COCO_V1.get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError) as exc:
            raise _offline_error("COCO Mask R-CNN", exc) from exc
        # COCO's 91-class predictors are not loaded: new ones for our classes, as torchvision's
        # fine-tuning tutorial replaces them.
        kept = {k: v for k, v in state.items() if not k.startswith(_PREDICTOR_PREFIXES)}
        result = model.load_state_dict(kept, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(_PREDICTOR_PREFIXES)]
        if missing or result.unexpected_keys:
            raise WeightsError(f"COCO Mask R-CNN weights do not fit this model (missing {missing[:3]}, "
                               f"unexpected {result.unexpected_keys[:3]})")
        return model, "COCO Mask R-CNN weights, box and mask predictors re-initialised"
    if weights == "imagenet":
        model = build_model(spec)
        try:
            state = _IMAGENET[spec.backbone].get_state_dict(progress=True, check_hash=True)
        except (urllib.error.URLError, OSError) as exc:
            raise _offline_error(f"ImageNet {spec.backbone}", exc) from exc
        _load_backbone_body(model, state, f"ImageNet {spec.backbone}")
        return model, f"ImageNet {spec.backbone} backbone, detection layers random"
    if weights == "none":
        return build_model(spec), "random initialisation"
    model = build_model(spec)
    return model, load_weights_file(model, Path(weights))


def load_weights_file(model: MaskRCNN, path: Path) -> str:
    """Load a local torchvision state dict or charseg checkpoint into `model`.

    Class-specific heads of another class count are re-initialised; any other mismatch is an
    error that names the file. Returns a one-line description.
    """
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found; pass coco, imagenet, none or an existing file")
    if empty := empty_file(path):
        raise WeightsError(f"{path}: not a PyTorch weights file: {empty}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for foreign files
        raise WeightsError(f"{path}: not a PyTorch weights file ({reason(exc)})") from exc
    if isinstance(state, dict) and "model" in state and "format" in state:
        state = state["model"]  # a charseg checkpoint
    elif isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # torchvision reference-script checkpoints
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: holds no state dict of tensors; expected a torchvision state dict "
                           "or a charseg checkpoint")
    if any(k.startswith("backbone.") for k in state):
        return _load_detector(model, state, path)
    if "conv1.weight" in state:
        return _load_backbone_body(model, state, str(path))
    raise WeightsError(f"{path}: keys {sorted(state)[:3]}... fit neither Mask R-CNN nor a ResNet; "
                       "expected a torchvision Mask R-CNN/ResNet state dict or a charseg checkpoint")


def _load_detector(model: MaskRCNN, state: dict, path: Path) -> str:
    own = model.state_dict()
    reinitialised = sorted(k for k in state if k.startswith(_HEAD_PREFIXES) and k in own
                           and state[k].shape != own[k].shape)
    state = {k: v for k, v in state.items() if k not in reinitialised}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in reinitialised]
    if missing or result.unexpected_keys:
        raise WeightsError(f"{path}: does not fit a {model.backbone.body.__class__.__name__} Mask R-CNN "
                           f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}); "
                           "check --backbone")
    if reinitialised:
        return f"weights from {path}, class heads re-initialised for {NUM_CLASSES} classes"
    return f"weights from {path}"


def _load_backbone_body(model: MaskRCNN, state: dict, source: str) -> str:
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = model.backbone.body.load_state_dict(body, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"{source}: ResNet weights do not fit the backbone (missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}); check --backbone")
    return f"backbone weights from {source}"
