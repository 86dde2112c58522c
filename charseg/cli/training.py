"""The training commands: train, resume, finetune (each one MLflow run, under torchrun too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .. import checkpoint as ckpt
from .. import jobs
from ..config import FINETUNE_LR_FACTOR, NORMS, TrainConfig
from ..jobs import TrackingChoices
from ..model.build import BACKBONES, WEIGHT_CHOICES
from ..precision import PRECISIONS
from ..training import distributed, runner
from .options import (DEVICE, LOG_EVERY, OUTPUT, REGISTER_AS, RUN, STOPPING, TRACKING, VAL_DIR, VAL_EVERY, WORKERS,
                      _anchor_sizes, _bool_opt, _given, _opt, _options, bounded, check_replay)

# The initial weights and architecture of a run from scratch or pretrained weights (train, sweep).
MODEL = (
    _opt("--weights", type=str, help=f"Initial weights: {' | '.join(WEIGHT_CHOICES)} | PATH to a torchvision state "
                                     "dict or charseg checkpoint."),
    _opt("--backbone", type=click.Choice(BACKBONES), help="ResNet FPN backbone; resnet18/34 are lighter for CPUs."),
    _opt("--fpn-channels", type=bounded("fpn_channels"),
         help="FPN output channels, and the mask head's width unless --mask-head-channels sets it; torchvision's 256, "
              "128 trains about 2.8x faster on a CPU."),
    _bool_opt("--mask-pixels", help="The mask predictor also reads the image's pixels inside each box at 28x28: "
                                    "glyphs of 10-30 px are only a few cells of the stride-4 features"),
    _opt("--mask-head-convs", type=bounded("mask_head_convs"),
         help="3x3 convolutions of the mask head before its deconvolution; torchvision's 4. Fewer cost less per "
              "detection in training and inference, at some mask quality (docs/FROM_SCRATCH.md)."),
    _opt("--mask-head-channels", type=bounded("mask_head_channels"),
         help="Width of the mask head's convolutions and of its predictor; 0 (the default) is the FPN's, as "
              "torchvision builds it. Narrower costs less per detection in training and inference "
              "(docs/FROM_SCRATCH.md); with --norm group a multiple of 32."),
    _opt("--norm", type=click.Choice(NORMS),
         help="Normalisation of a model trained from scratch: batch (BatchNorm in the backbone) or group "
              "(GroupNorm in the backbone, FPN and mask head; --weights none or a group checkpoint)."),
    _opt("--anchor-sizes", type=str, metavar="auto|S1,...,S5", callback=_anchor_sizes,
         help="RPN anchor size (px at the model's input) for each FPN level P2-P6; auto fits them to the "
              "training characters, e.g. 32,64,128,256,512 is torchvision's."),
)


@click.command("train")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@_options(*RUN, *MODEL, *TRACKING, REGISTER_AS)
@click.option("--config", "config_source", default="", metavar="FILE|RUN",
              help="Take every setting from a logged config: a YAML or JSON file (a run's config/config.json, "
                   "--print-config's output, settings by hand), a checkpoint, or an MLflow run (ID or runs:/...). "
                   "Options given here win; the run is tagged charseg.config_source.")
@click.option("--print-config", "--dry-run", "print_config", is_flag=True,
              help="Print the resolved settings and architecture (anchors and limits fitted to DATA_DIR) as YAML, "
                   "which --config reads back, and exit without training or an MLflow run.")
def train_command(data_dir: str, register_as: str, config_source: str, print_config: bool, **options: Any) -> None:
    """Train from pretrained (or random) initial weights on DATA_DIR.

    \b
    More processes (one per GPU, or gloo processes on a CPU), with PyTorch's launcher:
      torchrun --standalone --nproc-per-node K -m charseg train DATA_DIR ...
    Each reads --batch-size pages a step (global batch = batch size x K); rank 0 writes,
    validates and tracks one MLflow run. resume and finetune run under torchrun alike.
    """
    choices = TrackingChoices.pop(options)
    settings, replayed_from = jobs.replayed_config(config_source) if config_source else ({}, "")
    config = TrainConfig(data_dir=data_dir, **{**settings, **check_replay(_given(options))})
    if print_config:
        _print_plan(config)
        return
    with jobs.training_job(config.device):
        config.output_dir = distributed.broadcast_object(config.output_dir or runner.default_output_dir("train"))
        jobs.tracked(choices, config.output_dir, ckpt.Lineage(config_source=replayed_from),
                     lambda tracker: runner.train(config, tracker), register_as=register_as or None)


def _print_plan(config: TrainConfig) -> None:
    """`train --print-config`: the run's settings and ModelSpec as YAML, in the shape of the
    config/config.json a run logs."""
    import json

    import yaml

    plan = runner.plan_train(config)
    resolved = json.loads(json.dumps({"config": plan.config.to_dict(), "model_spec": plan.spec.to_dict()}))
    click.echo(yaml.safe_dump(resolved, sort_keys=False), nl=False)


@click.command("resume")
@click.argument("source")
@_options(_opt("--epochs", type=bounded("epochs", low=0), help="New total number of epochs (0: keep the checkpoint's)."),
          click.option("--epoch", type=bounded("epochs", low=0), default=0, show_default=True,
                       help="With a run ID or a folder: resume from this epoch's checkpoint (0: the latest)."),
          _opt("--data-dir", type=click.Path(exists=True, file_okay=False),
               help="Dataset folder, if it moved since the checkpoint was written."),
          _opt("--replay-dir", type=click.Path(exists=True, file_okay=False),
               help="A fine-tune's --replay-dir, if it moved since the checkpoint was written."),
          VAL_DIR, VAL_EVERY, *STOPPING, OUTPUT, WORKERS, LOG_EVERY, DEVICE,
          _opt("--precision", type=click.Choice(PRECISIONS),
               help="Change the run's precision (the resumed run is then not bit-exact) [default: the run's]"),
          click.option("--recompute-stages", type=bounded("recompute_stages"), default=None, metavar="N",
                       help="Change how many of the backbone's lowest stages the backward pass recomputes instead of "
                            "keeping their activations (train's --recompute-stages; the same gradients) "
                            "[default: the run's]"),
          *TRACKING, REGISTER_AS)
def resume_command(source: str, epoch: int, register_as: str, **options: Any) -> None:
    """Continue an interrupted run: model, optimizer, LR schedule, epoch and RNG.

    SOURCE is a checkpoint file, an output folder (its latest checkpoint that loads), an MLflow
    run ID (its latest checkpoint artifact) or an MLflow artifact URI (runs:/..., models:/...).
    Epochs continue the source's numbering.
    """
    choices = TrackingChoices.pop(options)
    overrides = _given(options)
    if overrides.get("epochs") == 0:
        del overrides["epochs"]
    with jobs.training_job(overrides.get("device")):
        jobs.resume_job(source, epoch, overrides, choices, register_as=register_as or None)


@click.command("finetune")
@click.argument("source")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run-id", default="", help="Take the checkpoint from this MLflow run (its best, else its last); "
                                           "SOURCE must then be empty (\"\").")
@_options(*RUN)
@click.option("--lr-factor", type=bounded("lr_factor"), default=None,
              help=f"Multiplier on the learning rate for fine-tuning [default: {FINETUNE_LR_FACTOR}]")
@_options(*TRACKING, REGISTER_AS)
def finetune_command(source: str, data_dir: str, run_id: str, register_as: str, **options: Any) -> None:
    """Fine-tune a checkpoint's weights on DATA_DIR with a fresh optimizer at 0.2x the LR.

    SOURCE is a checkpoint file, an MLflow run ID (its best checkpoint, else its last) or an
    MLflow artifact URI (runs:/..., models:/...). Backbone, input size and optimizer settings
    come from the checkpoint unless given. Epochs start at 1.
    """
    if bool(source) == bool(run_id):
        raise click.UsageError("give the checkpoint either as SOURCE or as --run-id, not both or neither")
    choices = TrackingChoices.pop(options)
    overrides = {"data_dir": data_dir, **check_replay(_given(options))}
    with jobs.training_job(overrides.get("device")):
        jobs.finetune_job(source or run_id, overrides, choices, register_as=register_as or None)


@click.command("sweep")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--space", "space_path", type=click.Path(exists=True, dir_okay=False), required=True,
              help="YAML search space: `SETTING: [choice, ...]` or `SETTING: {low: L, high: H, log: true}` for any "
                   "training setting, e.g. lr, lr_schedule, augment, epochs.")
@click.option("--trials", type=click.IntRange(1, 10_000), default=10, show_default=True,
              help="Trials to finish (completed or pruned); running the sweep again on its folder goes on to this.")
@_options(*RUN, *MODEL, *TRACKING, REGISTER_AS)
def sweep_command(data_dir: str, space_path: str, trials: int, register_as: str, **options: Any) -> None:
    """Search training settings with optuna on DATA_DIR: each trial a training run from the
    options given here with the settings the sampler picks from --space, an MLflow child run
    of one parent run, stopped early by optuna's median pruner when its validation metric
    (--best-metric) lags the other trials' after an epoch.

    \b
    OUTPUT_DIR holds optuna.db (the study) and each trial's folder: run the same command again
    (same --output-dir) after a kill and the sweep goes on where it was. The parent run carries
    the best trial's settings (tags best.*), its metric and its run; --register-as registers
    that trial's best checkpoint.
    """
    from .. import sweep

    choices = TrackingChoices.pop(options)
    base = sweep.settings_of(check_replay(_given(options)), data_dir)
    folder = Path(base.output_dir or runner.default_output_dir("sweep"))
    plan = sweep.Sweep(base, sweep.load_space(space_path), trials, folder, seed=base.seed)
    click.echo(f"sweep in {folder} (run this command again with --output-dir {folder} to go on after a stop)")
    with jobs.training_job("cpu"):
        for line in sweep.run_sweep(plan, choices, register_as=register_as or None):
            click.echo(line)
