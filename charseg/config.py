"""The one training configuration: every knob, its default and why."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MODES = ("train", "resume", "finetune")
LR_SCHEDULES = ("step", "cosine")
NORMS = ("batch", "group")
# How inference outlines a mask: snapped to the ink's edge at a level a learned chooser picks, or
# at the level that agrees best with the mask, or its own contour (inference/outlines.py).
OUTLINES = ("learned", "ink", "mask")
LOG_CHECKPOINTS = ("all", "last", "none")  # which checkpoints a run logs as MLflow artifacts
# Fine-tuning starts a fresh optimizer at this fraction of the learning rate (the seed script's rule).
FINETUNE_LR_FACTOR = 0.2
LIMITS = ("rpn_proposals_train", "rpn_proposals_test", "detections_per_img")
ANCHOR_LEVELS = 5  # FPN levels P2-P6, one anchor size each
RESNET_STAGES = 4  # the backbone's layer1-layer4 (--recompute-stages counts them)
MAX_ANCHOR = 8192  # px: no page the model reads is larger
MAX_PAGE_SCALE = 8.0  # --scale-train / --scale-test: beyond this a page is mostly interpolation
# Most data-loader workers a config may ask for; the command line allows at most the CPU count.
MAX_WORKERS = 256


@dataclass(frozen=True)
class Bound:
    """The values a numeric setting takes: [low, high] (an open end excludes its value), and
    why the high end is where it is. The one home of these limits: TrainConfig.validate(), the
    command line's option types and `--help` all read them."""

    low: float
    high: float
    why: str
    low_open: bool = False
    high_open: bool = False

    def check(self, name: str, value: float) -> None:
        """Raise ValueError naming `name`, the range and the reason when `value` is outside."""
        above_low = value > self.low if self.low_open else value >= self.low
        below_high = value < self.high if self.high_open else value <= self.high
        if not (above_low and below_high):  # NaN fails too
            raise ValueError(f"{name} must be in {self.text()} ({self.why}), got {value:g}")

    def text(self) -> str:
        """The range as [low, high], an open end with a round bracket."""
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# Every number a run reads, bounded by what its consumer can hold: the optimizer computes in
# float32 (an LR or decay past ~3.4e38 overflows it at the first step), each layer, page and
# limit is allocated as asked (an unbounded one asks for terabytes).
BOUNDS = {
    "epochs": Bound(1, 100_000, "a run of more epochs would not end"),
    "batch_size": Bound(1, 1024, "pages held in memory at once"),
    "lr": Bound(0, 1e6, "the optimizer's float32; far past the rates that diverge at once", low_open=True),
    "lr_factor": Bound(0, 10, "the LR times this stays a rate SGD can use", low_open=True),
    "momentum": Bound(0, 1, "SGD momentum"),
    "weight_decay": Bound(0, 1e6, "the optimizer's float32; far past any penalty that trains"),
    "lr_step_size": Bound(1, 100_000, "at most the most epochs"),
    "lr_gamma": Bound(0, 1, "a decay: the LR times this at each step", low_open=True),
    "warmup_iters": Bound(0, 10_000_000, "capped to the first epoch's iterations anyway"),
    "warmup_factor": Bound(0, 1, "a share of the LR", low_open=True),
    "clip_grad_norm": Bound(0, 1e6, "gradient norms are float32; 0 turns clipping off"),
    "fpn_channels": Bound(32, 1024, "torchvision's is 256; 1024 is 16 times its compute and memory"),
    "min_size": Bound(1, 8192, "a page resized past 8192 px does not fit in memory"),
    "max_size": Bound(1, 8192, "a page resized past 8192 px does not fit in memory"),
    "rpn_proposals_train": Bound(0, 100_000, "each proposal's features are held in memory"),
    "rpn_proposals_test": Bound(0, 100_000, "each proposal's features are held in memory"),
    "roi_samples": Bound(1, 100_000, "each sample's features are held in memory"),
    "mask_head_convs": Bound(1, 16, "torchvision's is 4; each one more is another 3x3 convolution per RoI"),
    "mask_head_channels": Bound(0, 1024, "0 is the FPN's width; 1024 is 16 times torchvision's compute per RoI"),
    "mask_dice": Bound(0, 100, "a loss weight; past this the mask loss drowns the detection losses"),
    "detections_per_img": Bound(0, 100_000, "each detection's mask is held in memory"),
    "val_fraction": Bound(0, 1, "a share of DATA_DIR; 1 would leave nothing to train on", high_open=True),
    "val_every": Bound(1, 100_000, "epochs; the last epoch always validates"),
    "replay_pages": Bound(1, 1_000_000, "pages read every epoch beside DATA_DIR's"),
    "score_threshold": Bound(0, 1, "a score"),
    "val_images_logged": Bound(0, 10_000, "images uploaded to MLflow each epoch"),
    "num_workers": Bound(0, MAX_WORKERS, "processes started for loading"),
    "log_every": Bound(1, 10_000_000, "iterations between loss reports"),
    "world_size": Bound(1, 100_000, "torchrun's processes"),
    "seed": Bound(0, 2**32 - 1, "numpy's seeds"),
    "recompute_stages": Bound(0, RESNET_STAGES, "ResNet has four stages"),
    "early_stop_patience": Bound(0, 100_000, "at most the most epochs; 0 turns early stopping off"),
    "time_budget": Bound(0, 525_600, "minutes: a year; 0 turns the budget off"),
}


def check_page_scale(name: str, value: float) -> None:
    """A page resize factor: 0 (off) or a finite factor in (0, MAX_PAGE_SCALE]."""
    if not (value == 0 or 0 < value <= MAX_PAGE_SCALE):  # NaN fails both
        raise ValueError(f"{name} must be 0 (resize to min_size) or a factor in (0, {MAX_PAGE_SCALE:g}], got {value}")


def parse_anchor_sizes(text: str) -> tuple[int, ...] | None:
    """`--anchor-sizes`: "auto" -> None (fit to the data), "32,64,128,256,512" -> a tuple.
    Raises ValueError with the rule."""
    if text.strip().lower() == "auto":
        return None
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        sizes = ()
    check_anchor_sizes(sizes, text)
    return sizes


def check_anchor_sizes(sizes: tuple[int, ...], given: object) -> None:
    """Raise ValueError unless `sizes` holds ANCHOR_LEVELS increasing positive integers."""
    if len(sizes) != ANCHOR_LEVELS or min(sizes) < 1 or max(sizes) > MAX_ANCHOR or list(sizes) != sorted(sizes):
        raise ValueError(f"anchor_sizes must be 'auto' or {ANCHOR_LEVELS} increasing positive integers of at most "
                         f"{MAX_ANCHOR} px, one per FPN level (e.g. 32,64,128,256,512), got {given!r}")


# Settings a replayed config (train --config) leaves to the new run: its data and folders, how
# it started, torchrun's process count.
NOT_REPLAYED = ("mode", "data_dir", "output_dir", "init_checkpoint", "world_size")


def replayed_settings(values: object, source: str) -> dict[str, Any]:
    """The TrainConfig settings of a replayed config: VALUES is the {"config": ...} a run logged
    (config/config.json, `train --print-config`) or a plain mapping of settings (a YAML file,
    keys spelled as options or fields); NOT_REPLAYED keys are dropped. Raises ValueError naming
    SOURCE for anything else."""
    settings = values.get("config", values) if isinstance(values, dict) else None
    if not isinstance(settings, dict):
        raise ValueError(f"{source}: not a charseg config: expected a mapping of settings (lr: 0.01, ...) or the "
                         "config/config.json a run logged")
    settings = {str(k).replace("-", "_"): v for k, v in settings.items()}
    unknown = sorted(set(settings) - set(SETTING_TYPES))
    if unknown:
        raise ValueError(f"{source}: unknown settings {unknown}; `charseg train --help` lists them (as options)")
    return {k: _typed(k, v, SETTING_TYPES[k], source) for k, v in settings.items() if k not in NOT_REPLAYED}


def _typed(name: str, value: Any, kind: str, source: str) -> Any:
    """VALUE as the TrainConfig field NAME of type KIND holds it (YAML gives "1e-3" as text, a
    JSON list for a tuple); ValueError naming SOURCE when it is not one."""
    if value is None and "None" in kind:
        return None
    try:
        if kind.startswith("tuple"):
            return parse_anchor_sizes(value) if isinstance(value, str) else tuple(int(v) for v in value)
        if kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            if isinstance(value, bool):
                return value
        elif kind.startswith("int") and not isinstance(value, bool):
            number = float(value)
            if number.is_integer():
                return int(number)
        elif kind == "float" and not isinstance(value, bool):
            return float(value)
        elif kind == "str" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{source}: {name} must be {kind.split(' |')[0]}, got {value!r}")


@dataclass
class TrainConfig:
    """Everything a training run needs; stored in every checkpoint and logged to MLflow."""

    mode: str = "train"  # train | resume | finetune: how the run started
    data_dir: str = ""  # DATA_DIR holding images/ and annotations/
    output_dir: str = ""  # where checkpoints are written
    epochs: int = 10  # total epochs; resume continues up to this number
    batch_size: int = 2  # images per optimizer step
    lr: float = 0.005  # base SGD learning rate
    lr_factor: float = 1.0  # multiplier on lr; fine-tune uses FINETUNE_LR_FACTOR
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # L2 penalty on all trainable parameters
    # step: StepLR (the seed script's: x lr_gamma every lr_step_size epochs); cosine: the LR
    # follows half a cosine from its peak to 0 over every iteration of the run, so a short run
    # spends no epochs at a tenth of the rate and a long one still anneals.
    lr_schedule: str = "step"
    lr_step_size: int = 3  # StepLR: decay the LR every this many epochs
    lr_gamma: float = 0.1  # StepLR: multiply the LR by this at each step
    warmup_iters: int = 1000  # linear warm-up length, capped to the first epoch's iterations
    warmup_factor: float = 0.001  # LR multiplier at the first warm-up iteration
    clip_grad_norm: float = 10.0  # max total gradient norm; 0 turns clipping off
    seed: int = 15107  # seeds python, numpy, torch, CUDA, shuffling and loader workers
    weights: str = "coco"  # coco | imagenet | none | path to a local weights file
    backbone: str = "resnet50"  # resnet50 | resnet34 | resnet18
    norm: str = "batch"  # normalisation trained from scratch: batch | group (GroupNorm; --weights none only)
    fpn_channels: int = 256  # FPN outputs, and mask head width unless mask_head_channels (torchvision: 256)
    mask_pixels: bool = False  # the mask predictor also reads the input pixels inside each box (small glyphs)
    mask_head_convs: int = 4  # 3x3 convolutions of the mask head (torchvision: 4; fewer are cheaper per RoI)
    mask_head_channels: int = 0  # their width and the predictor's; 0: the FPN's (torchvision's head)
    # Weight of a Dice term added to the mask loss (1 - Dice of each mask against its target,
    # averaged): it scores a mask by its overlap, as AP75 does, where per-pixel BCE lets a small
    # glyph's outline stay blurred. 0: BCE alone (torchvision's).
    mask_dice: float = 0.0
    min_size: int = 800  # shorter image side after the model's resize
    max_size: int = 1333  # longer image side cap after the model's resize
    # Resize by a factor of each page's own size instead (long side still capped at max_size):
    # glyphs are sized in pixels, not as a share of their page. 0: the min_size rule.
    scale_train: float = 0.0  # in training
    scale_test: float = 0.0  # at inference (validation, evaluate, predict, serving)
    # How inference outlines each mask (validation included): "learned" and "ink" snap its contour
    # to the ink's edge on the page where the two agree, as the dataset format outlines a glyph, at
    # the level a learned chooser picks or at the one agreeing best with the mask; "mask" keeps
    # the mask's own contour (ModelSpec.outline).
    outline: str = "learned"
    # What the user asked of the architecture; the model a run trains is its ModelSpec
    # (architecture.resolve_spec), which resolves every None. Limits: None fits them to the
    # densest image of the data, since pages hold hundreds to thousands of characters and no
    # detection limit below that count can find them all.
    rpn_proposals_train: int | None = None  # RPN proposals kept per image (pre and post NMS) in training
    rpn_proposals_test: int | None = None  # RPN proposals kept per image at inference
    roi_samples: int = 512  # proposals sampled per image for the box/mask head losses
    detections_per_img: int | None = None  # most detections per image, also COCO maxDets
    # RPN anchor sizes for FPN levels P2-P6, e.g. (32, 64, 128, 256, 512) (torchvision's); None
    # fits them to the training characters (anchors.py). Train only: resume and fine-tune keep
    # the checkpoint's.
    anchor_sizes: tuple[int, ...] | None = None
    val_dir: str = ""  # a separate validation dataset; "" splits val_fraction off data_dir
    val_fraction: float = 0.1  # share of data_dir held out for validation (by seed); 0: no validation
    # Validate (and log held-out overlays) after every val_every-th epoch, the last one and one a
    # --time-budget ends the run after; best.pth is the best of those. Early stopping is checked
    # after each validation.
    val_every: int = 1
    # Rehearsal (fine-tune): replay_pages pages of replay_dir (the source model's own domain),
    # chosen by the seed, train beside DATA_DIR's so the model keeps what it knew. "": none.
    replay_dir: str = ""
    replay_pages: int = 20
    best_metric: str = "segm_AP"  # validation metric that picks best.pth (count_abs_error: lower wins)
    score_threshold: float = 0.5  # detections counted by the character metrics and drawn on overlays
    val_images_logged: int = 3  # validation (and held-out) images with predicted outlines logged each epoch
    # Pages made differently from the training data (e.g. `charseg generate --held-out`): each
    # epoch, val_images_logged of them are logged with the model's outlines; after the last
    # epoch the final model is evaluated on all of them. "": none.
    heldout_dir: str = ""
    # Random rotation, scale, shift, contrast, blur and noise of each training image, its
    # polygons moved with it (augment.py); drawn from (seed, epoch, image), so resume stays exact.
    augment: bool = False
    num_workers: int = 2  # data-loader worker processes; 0 loads in the main process
    save_every_epoch: bool = True  # write a checkpoint after every epoch
    save_versioned: bool = True  # model_epoch_001.pth, ... instead of one overwritten last.pth
    log_every: int = 10  # report per-step losses every this many iterations
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Training processes (torchrun: --nproc-per-node x nodes), set from the launcher's
    # WORLD_SIZE, not an option: each reads batch_size pages a step, so the global batch is
    # batch_size x world_size.
    world_size: int = 1
    # Forward pass precision (precision.py): auto | fp32 | bf16 | fp16 (CUDA only, with a
    # GradScaler). A run records the one it used; auto is fp32 in training for now.
    precision: str = "auto"
    # Multi-process training of live BatchNorm (--norm batch from scratch): statistics over the
    # global batch instead of each process's own pages. Frozen BatchNorm and GroupNorm need nothing.
    sync_batchnorm: bool = False
    # The backbone's lowest stages (1: stem and layer1; up to 4) whose activations are recomputed
    # in the backward pass instead of kept (model/recompute.py): less memory for more time when
    # they train (from scratch); the same gradients. 0: every activation kept.
    recompute_stages: int = 0
    init_checkpoint: str = ""  # fine-tune / resume: the checkpoint the run started from
    # Stopping rules (training/stopping.py), checked after each epoch's validation; the run then
    # writes its final model and ends FINISHED with the reason. Both count across resumes.
    early_stop_patience: int = 0  # stop after this many epochs without a better best_metric; 0: off
    time_budget: float = 0.0  # minutes of training (all resumes together); the epoch under way finishes; 0: off

    @property
    def effective_lr(self) -> float:
        """The learning rate the optimizer starts with (after warm-up)."""
        return self.lr * self.lr_factor

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, safe for torch.save(weights_only) and MLflow params."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config from `to_dict()` output; unknown keys are a ValueError.

        Checkpoints written before ModelSpec was the only home of the architecture hold
        anchor_sizes as text and their fitted limits: __post_init__ reads both.
        """
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**values)

    def __post_init__(self) -> None:
        # The command line's (and older checkpoints') spellings of a request: anchor sizes as
        # text ("auto", "16,32,64,128,256") or a list, 0 for a limit to fit.
        if isinstance(self.anchor_sizes, str):
            self.anchor_sizes = parse_anchor_sizes(self.anchor_sizes)
        elif self.anchor_sizes is not None:
            self.anchor_sizes = tuple(self.anchor_sizes)
        for name in LIMITS:
            if getattr(self, name) == 0:
                setattr(self, name, None)

    def validate(self) -> None:
        """Raise ValueError with a clear message for values no run can use."""
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{item.name} must be a finite number, got {value}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name, bound in BOUNDS.items():
            value = getattr(self, name)
            if value is not None:  # a limit of None is fitted to the data
                bound.check(name, value)
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        for name in ("scale_train", "scale_test"):
            check_page_scale(name, getattr(self, name))
        if self.anchor_sizes is not None:
            check_anchor_sizes(tuple(self.anchor_sizes), ",".join(map(str, self.anchor_sizes)))
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.outline not in OUTLINES:
            raise ValueError(f"outline must be one of {', '.join(OUTLINES)}, got {self.outline!r}")
        if self.early_stop_patience and not (self.val_dir or self.val_fraction):
            raise ValueError("--early-stop-patience compares validation metrics, and this run has no validation "
                             "pages: pass --val-fraction (above 0) or --val-dir")


# Every TrainConfig setting and its type as written in the class ("int | None", ...): what a
# replayed config, a sweep's space and the command line's option types are checked against.
SETTING_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
