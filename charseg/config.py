"""The one training configuration: every knob, its default and why."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

MODES = ("train", "resume", "finetune")
# Fine-tuning starts a fresh optimizer at this fraction of the learning rate (seed script v1.2).
FINETUNE_LR_FACTOR = 0.2
# fit_limits: detections cover the densest image with a margin (never below MIN_DETECTIONS);
# the RPN keeps PROPOSALS_PER_DETECTION proposals per detection (never below torchvision's
# 2000 in training and 1000 at inference), as NMS and the score threshold drop many.
MIN_DETECTIONS = 500
DETECTION_MARGIN = 1.2
PROPOSALS_PER_DETECTION = 2
MIN_PROPOSALS_TRAIN, MIN_PROPOSALS_TEST = 2000, 1000
LIMITS = ("rpn_proposals_train", "rpn_proposals_test", "detections_per_img")
ANCHOR_LEVELS = 5  # FPN levels P2-P6, one anchor size each
# Fields that shape the model (ModelSpec); fine-tune inherits those that are not LIMITS from
# its source checkpoint (limits are fitted to the fine-tuning data).
MODEL_OPTIONS = ("min_size", "max_size", "rpn_proposals_train", "rpn_proposals_test", "roi_samples",
                 "detections_per_img")


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
    lr_step_size: int = 3  # StepLR: decay the LR every this many epochs
    lr_gamma: float = 0.1  # StepLR: multiply the LR by this at each step
    warmup_iters: int = 1000  # linear warm-up length, capped to the first epoch's iterations
    warmup_factor: float = 0.001  # LR multiplier at the first warm-up iteration
    clip_grad_norm: float = 10.0  # max total gradient norm; 0 turns clipping off
    seed: int = 15107  # seeds python, numpy, torch, CUDA, shuffling and loader workers
    weights: str = "coco"  # coco | imagenet | none | path to a local weights file
    backbone: str = "resnet50"  # resnet50 | resnet34 | resnet18
    min_size: int = 800  # shorter image side after the model's resize
    max_size: int = 1333  # longer image side cap after the model's resize
    # Limits; 0 fits them to the densest image of the data (fit_limits): pages hold hundreds to
    # thousands of characters, and no detection limit below that count can find them all.
    rpn_proposals_train: int = 0  # RPN proposals kept per image (pre and post NMS) in training
    rpn_proposals_test: int = 0  # RPN proposals kept per image at inference
    roi_samples: int = 512  # proposals sampled per image for the box/mask head losses
    detections_per_img: int = 0  # most detections per image, also COCO maxDets
    # RPN anchor sizes for FPN levels P2-P6: "auto" fits them to the training set's characters
    # (anchors.py); or five sizes such as "32,64,128,256,512" (torchvision's). Train only:
    # resume and fine-tune keep the checkpoint's.
    anchor_sizes: str = "auto"
    val_dir: str = ""  # a separate validation dataset; "" splits val_fraction off data_dir
    val_fraction: float = 0.1  # share of data_dir held out for validation (by seed); 0: no validation
    best_metric: str = "segm_AP"  # validation metric that picks best.pth (count_abs_error: lower wins)
    score_threshold: float = 0.5  # detections counted by the character metrics and drawn on overlays
    val_images_logged: int = 3  # validation images with predicted outlines logged each epoch
    num_workers: int = 2  # data-loader worker processes; 0 loads in the main process
    save_every_epoch: bool = True  # write a checkpoint after every epoch
    save_versioned: bool = True  # model_epoch_001.pth, ... instead of one overwritten last.pth
    log_every: int = 10  # report per-step losses every this many iterations
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    init_checkpoint: str = ""  # fine-tune / resume: the checkpoint the run started from

    def model_options(self) -> dict[str, int]:
        """Input size and detection limits, as ModelSpec fields."""
        return {k: getattr(self, k) for k in MODEL_OPTIONS}

    def fit_limits(self, most_characters: int) -> "TrainConfig":
        """This config with every limit left at 0 fitted to an image of `most_characters`."""
        detections = self.detections_per_img or max(
            MIN_DETECTIONS, -(-int(most_characters * DETECTION_MARGIN) // 100) * 100)
        fitted = {"detections_per_img": detections,
                  "rpn_proposals_train": max(MIN_PROPOSALS_TRAIN, PROPOSALS_PER_DETECTION * detections),
                  "rpn_proposals_test": max(MIN_PROPOSALS_TEST, PROPOSALS_PER_DETECTION * detections)}
        return dataclasses.replace(self, **{k: getattr(self, k) or fitted[k] for k in LIMITS})

    def fixed_anchor_sizes(self) -> tuple[int, ...] | None:
        """The anchor sizes given, or None for "auto". Raises ValueError with the rule."""
        if self.anchor_sizes.strip().lower() == "auto":
            return None
        try:
            sizes = tuple(int(part) for part in self.anchor_sizes.split(","))
        except ValueError:
            sizes = ()
        if len(sizes) != ANCHOR_LEVELS or min(sizes) < 1 or list(sizes) != sorted(sizes):
            raise ValueError(f"anchor_sizes must be 'auto' or {ANCHOR_LEVELS} increasing positive integers, one "
                             f"per FPN level (e.g. 32,64,128,256,512), got {self.anchor_sizes!r}")
        return sizes

    @property
    def effective_lr(self) -> float:
        """The learning rate the optimizer starts with (after warm-up)."""
        return self.lr * self.lr_factor

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, safe for torch.save(weights_only) and MLflow params."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        """Rebuild a config from `to_dict()` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**values)

    def validate(self) -> None:
        """Raise ValueError with a clear message for values no run can use."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "min_size": self.min_size,
                    "max_size": self.max_size, "lr_step_size": self.lr_step_size, "log_every": self.log_every,
                    "roi_samples": self.roi_samples}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in LIMITS:
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 1, or 0 to fit it to the data, got {getattr(self, name)}")
        if not self.lr > 0 or not self.lr_factor > 0:
            raise ValueError(f"learning rate must be positive, got lr={self.lr} x {self.lr_factor}")
        if self.min_size > self.max_size:
            raise ValueError(f"min_size ({self.min_size}) must not exceed max_size ({self.max_size})")
        if self.num_workers < 0 or self.warmup_iters < 0 or self.clip_grad_norm < 0:
            raise ValueError("num_workers, warmup_iters and clip_grad_norm must not be negative")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.score_threshold <= 1:
            raise ValueError(f"score_threshold must be in [0, 1], got {self.score_threshold}")
        self.fixed_anchor_sizes()
        if not 0 < self.warmup_factor <= 1:
            raise ValueError(f"warmup_factor must be in (0, 1], got {self.warmup_factor}")
