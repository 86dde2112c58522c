"""The options of charseg's commands: types bounded by config.BOUNDS, the option tables each
command shares, and what a training command's tracking options hold."""

from __future__ import annotations

import os
from typing import Any, Callable

import click

from ..config import (BOUNDS, LOG_CHECKPOINTS, LR_SCHEDULES, MAX_PAGE_SCALE, OUTLINES, RESNET_STAGES, SETTING_TYPES,
                      TrainConfig, parse_anchor_sizes)
from ..inference.evaluate import METRICS
from ..precision import INFERENCE_PRECISIONS, PRECISIONS
from ..precision import resolve as resolve_precision
from ..precision import resolve_device

_DEFAULTS = TrainConfig()


class FiniteFloat(click.FloatRange):
    """click.FloatRange that also refuses NaN and infinity (a NaN passes every range check)."""

    name = "float"

    def convert(self, value, param, ctx):
        import math

        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class _BlankIsUnset:
    """A type whose "" means "not given" (None), as `_given` reads "" of a text option: an
    MLproject parameter left at its default "" keeps what the option's absence keeps (the
    checkpoint's value on resume and fine-tune, TrainConfig's default on train)."""

    def convert(self, value, param, ctx):
        return None if value == "" else super().convert(value, param, ctx)


class BlankIntRange(_BlankIsUnset, click.IntRange):
    pass


class BlankFiniteFloat(_BlankIsUnset, FiniteFloat):
    pass


class BlankChoice(_BlankIsUnset, click.Choice):
    pass


class BlankBool(_BlankIsUnset, click.types.BoolParamType):
    pass


class BlankPath(_BlankIsUnset, click.Path):
    pass


# --scale-train / --scale-test: 0 (the --min-size rule) or a factor up to MAX_PAGE_SCALE.
PAGE_SCALE = FiniteFloat(min=0, max=MAX_PAGE_SCALE)


def bounded(field: str, low: float | None = None) -> click.ParamType:
    """The option type of a TrainConfig setting: its BOUNDS range (shown by --help), an int or
    a finite float as the field is, "" meaning not given (_BlankIsUnset); `low` replaces the
    lower end (0 meaning "keep")."""
    bound = BOUNDS[field]
    low = bound.low if low is None else low
    if "float" in SETTING_TYPES[field]:
        return BlankFiniteFloat(min=low, max=bound.high, min_open=bound.low_open and low == bound.low,
                                max_open=bound.high_open)
    return BlankIntRange(min=int(low), max=int(bound.high))


# Seeds numpy accepts (0 to 2**32 - 1); torch and python take them too.
SEED = bounded("seed")


# Worker processes: at most one per CPU of this machine (a larger number only adds processes),
# or the default on a machine of fewer CPUs.
MAX_WORKERS_HERE = max(os.cpu_count() or 1, _DEFAULTS.num_workers)


WORKER_COUNT = click.IntRange(min=0, max=MAX_WORKERS_HERE)


def _opt(*decls: str, help: str, field: str | None = None, **kwargs) -> Callable:
    """An option whose default stays None (so only given values override; "" is not given
    either) but whose help shows the TrainConfig default."""
    if isinstance(kwargs.get("type"), click.Choice) and not isinstance(kwargs["type"], BlankChoice):
        kwargs["type"] = BlankChoice(kwargs["type"].choices)
    name = field or decls[0].lstrip("-").split("/")[0].replace("-", "_")
    if getattr(_DEFAULTS, name, "") != "":
        default = getattr(_DEFAULTS, name)
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        if default is None:  # TrainConfig's "fit it to the data"
            shown = "auto" if name == "anchor_sizes" else 0
        help = f"{help} [default: {shown}]"
    return click.option(*decls, name, default=None, help=help, **kwargs)


def _options(*opts: Callable) -> Callable:
    def decorate(func: Callable) -> Callable:
        for opt in reversed(opts):
            func = opt(func)
        return func
    return decorate


def _bool_opt(*decls: str, help: str) -> Callable:
    """A boolean that works as a flag (--opt), with a value (--opt false) and from MLproject."""
    return _opt(*decls, type=BlankBool(), is_flag=False, flag_value=True, help=f"{help} (true/false)",
                metavar="[BOOL]")


OUTPUT = _opt("--output-dir", type=click.Path(file_okay=False),
              help="Folder for checkpoints [default: outputs/<timestamp>-<mode>; resume: the checkpoint's folder]")


EPOCHS = _opt("--epochs", type=bounded("epochs"), help="Total number of epochs (resume: the new total).")


DEVICE = _opt("--device", type=str, help="auto (CUDA when available), cpu, cuda or cuda:N.")


WORKERS = _opt("--num-workers", type=WORKER_COUNT,
               help=f"Data-loader worker processes (0: main process), at most this machine's CPU count "
                    f"({MAX_WORKERS_HERE}).")


LOG_EVERY = _opt("--log-every", type=bounded("log_every"), help="Report per-step losses every N iterations.")


SAVE_EVERY = _bool_opt("--save-every-epoch",
                       help="Write a checkpoint after every epoch (the final model is always written)")


SAVE_VERSIONED = _bool_opt("--save-versioned",
                           help="Name checkpoints model_epoch_001.pth, ... instead of overwriting last.pth")


SCALE_TRAIN_HELP = ("Resize each training page by this factor of its own size instead of its shorter side to "
                    "--min-size (--max-size still caps the longer side): glyphs are sized in pixels, not as a "
                    "share of the page. 0: the --min-size rule.")


SCALE_TEST_HELP = ("The same at inference (validation, evaluate, predict, the registered model); a little above "
                   "the training scale, small glyphs are found more often. A page whose characters come out smaller "
                   "than the training pages' median is read again, enlarged to it (up to twice). 0: the --min-size "
                   "rule.")


OUTLINE_HELP = ("How each mask becomes a character's outline: learned and ink snap the mask's contour to the ink's "
                "edge on the page (pixels between the paper's and the ink's colour, outlined on their edges as the "
                "dataset format outlines a glyph) wherever the two agree at IoU 0.5 or more, else keep it; learned "
                "takes the level between paper and ink that a chooser learned against annotated pages picks, ink the "
                "level whose outline agrees best with the mask; mask keeps the mask's own contour (for annotations "
                "that do not follow the ink).")


HYPER = (
    _opt("--batch-size", type=bounded("batch_size"), help="Images per optimizer step."),
    _opt("--lr", type=bounded("lr"), help="Base SGD learning rate."),
    _opt("--momentum", type=bounded("momentum"), help="SGD momentum."),
    _opt("--weight-decay", type=bounded("weight_decay"), help="SGD weight decay."),
    _opt("--lr-schedule", type=click.Choice(LR_SCHEDULES),
         help="step: x --lr-gamma every --lr-step-size epochs (the seed script's); cosine: half a cosine from "
              "the LR to 0 over the whole run, whatever its length."),
    _opt("--lr-step-size", type=bounded("lr_step_size"), help="StepLR: decay the LR every N epochs."),
    _opt("--lr-gamma", type=bounded("lr_gamma"), help="StepLR: LR multiplier at each decay."),
    _opt("--warmup-iters", type=bounded("warmup_iters"), help="Linear LR warm-up iterations (capped to one epoch; 0: off)."),
    _opt("--warmup-factor", type=bounded("warmup_factor"),
         help="LR multiplier at the first warm-up iteration."),
    _opt("--clip-grad-norm", type=bounded("clip_grad_norm"), help="Clip the total gradient norm to this (0: off)."),
    _opt("--seed", type=SEED, help="Random seed (python, numpy, torch, CUDA, shuffling, workers)."),
    _opt("--min-size", type=bounded("min_size"), help="Shorter image side after the model's resize."),
    _opt("--max-size", type=bounded("max_size"), help="Longer image side cap after the model's resize."),
    _opt("--scale-train", type=PAGE_SCALE, help=SCALE_TRAIN_HELP),
    _opt("--scale-test", type=PAGE_SCALE, help=SCALE_TEST_HELP),
    _opt("--outline", type=click.Choice(OUTLINES),
         help=OUTLINE_HELP + " Stored with the model: validation, evaluate, predict and the registered model use it."),
    _opt("--rpn-proposals-train", type=bounded("rpn_proposals_train"),
         help="RPN proposals kept per image in training (0: max(2000, 2 x detections per image))."),
    _opt("--rpn-proposals-test", type=bounded("rpn_proposals_test"),
         help="RPN proposals kept per image at inference (0: max(1000, 2 x detections per image))."),
    _opt("--roi-samples", type=bounded("roi_samples"), help="Proposals sampled per image for the head losses."),
    _opt("--mask-dice", type=bounded("mask_dice"),
         help="Weight of a Dice term added to the mask loss: it scores each mask by its overlap with the "
              "character, as AP75 does (0: per-pixel BCE alone, torchvision's loss)."),
    _opt("--detections-per-img", type=bounded("detections_per_img"),
         help="Most detections returned per image, also COCO maxDets (0: max(500, 1.2 x the characters of "
              "the densest image))."),
)


VAL_DIR = _opt("--val-dir", type=click.Path(file_okay=False),
               help="Separate validation dataset [default: hold out --val-fraction of DATA_DIR]")

VAL_EVERY = _opt("--val-every", type=bounded("val_every"), metavar="EPOCHS",
                 help="Validate, and log held-out overlays, after every this many epochs and after the last "
                      "(best.pth is the best of the epochs validated; early stopping is checked at each validation).")


VALIDATION = (
    VAL_DIR,
    _opt("--val-fraction", type=bounded("val_fraction"),
         help="Share of DATA_DIR held out for validation, chosen by the seed (0: no validation)."),
    VAL_EVERY,
    _opt("--best-metric", type=click.Choice(METRICS), help="Validation metric that picks best.pth."),
    _opt("--score-threshold", type=bounded("score_threshold"),
         help="Detections counted by the character metrics and drawn on logged images."),
    _opt("--val-images-logged", type=bounded("val_images_logged"),
         help="Validation (and held-out) images with predicted outlines logged to MLflow each epoch."),
    _opt("--heldout-dir", type=click.Path(file_okay=False),
         help="Pages made differently from the training data (charseg generate --held-out): a few logged "
              "with the model's outlines each epoch, all evaluated after the last [default: none]"),
)


AUGMENT = _bool_opt("--augment", help="Randomly rotate (+-12 deg), scale, shift, re-light, blur and add noise to "
                                       "each training image, its polygons moved with it")


PRECISION_HELP = ("Forward pass precision: fp32, bf16 (autocast; weights, losses, anchors and box decoding stay "
                  "float32; fast only where the device computes it natively, else emulated and slower, with a "
                  "warning) or fp16 (CUDA, with a loss scaler). auto: {auto}. Checkpoints are float32 either way.")


PRECISION = _opt("--precision", type=click.Choice(PRECISIONS),
                 help=PRECISION_HELP.format(auto="fp32 in training (bf16-trained models matched fp32 on held-out pages: "
                                                "docs/BENCHMARKS.md)"))


class AutoPrecisionOption(click.Option):
    """--precision whose help also says what `auto` picks on the machine showing it (worked
    out when --help is shown, not at every start)."""

    def get_help_record(self, ctx: click.Context):
        try:
            chosen, why = resolve_precision("auto", resolve_device("auto"), training=False)
            here = f" On this machine auto is {chosen} ({why.removeprefix('auto: ')})."
        except RuntimeError as exc:  # a broken CUDA set-up must not break --help
            here = f" (What auto picks here could not be found: {exc}.)"
        original, self.help = self.help, f"{self.help}{here}"
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = original


INFERENCE_PRECISION = click.option(
    "--precision", type=click.Choice(INFERENCE_PRECISIONS), default="auto", show_default=True,
    cls=AutoPrecisionOption,
    help=PRECISION_HELP.format(auto="bf16 where the device computes it natively (a CUDA GPU of compute capability "
                                    "8.0 or later; a CPU with amx_bf16 or avx512_bf16 in /proc/cpuinfo), else fp32")
    + " int8 (CPU): the backbone, FPN, box and mask heads quantised to int8 after a calibration pass over a few "
      "pages (--calibration-dir), the rest float32; for CPUs without native bf16, on folders or pages of many "
      "characters (docs/PRECISION.md).")


CALIBRATION_DIR = click.option(
    "--calibration-dir", type=click.Path(exists=True, file_okay=False), default=None,
    help="With --precision int8: a folder of pages like yours whose first few images set the int8 value ranges. "
         "Default: the first few input pages.")


CALIBRATION_CACHE = click.option(
    "--calibration-cache", type=click.Path(dir_okay=False), default=None,
    help="With --precision int8: a file that keeps the int8 model a calibration made. Where it does not exist, the "
         "calibration runs and the quantised parts are written to it; where it does, they are loaded and neither "
         "the calibration pass nor the quantisation runs. It belongs to one model and one torch (a file made for "
         "other weights, by another torch, or with --calibration-dir on other pages, is refused with the fix).")


def check_int8_options(precision: str, calibration_dir: str | None, calibration_cache: str | None) -> None:
    """--calibration-dir and --calibration-cache mean something with --precision int8 only."""
    given = [name for name, value in (("--calibration-dir", calibration_dir),
                                      ("--calibration-cache", calibration_cache)) if value is not None]
    if given and precision != "int8":
        raise click.UsageError(f"{' and '.join(given)} set int8's calibration; add --precision int8 or leave "
                               f"{'them' if len(given) > 1 else 'it'} out")


SYNC_BATCHNORM = _bool_opt("--sync-batchnorm", help="Under torchrun, live BatchNorm (--norm batch from scratch) "
                                                    "normalises over the global batch instead of each process's pages")


RECOMPUTE_STAGES = _opt(
    "--recompute-stages", type=bounded("recompute_stages"), metavar="N",
    help=f"Recompute the backbone's N lowest stages (1: the stem and layer1, up to {RESNET_STAGES}) in the backward "
         "pass instead of keeping their activations: less memory for about one more forward pass of them, with the "
         "same gradients. It pays where those stages train (--weights none) on large pages; 0 keeps everything "
         "(figures: docs/BENCHMARKS.md).")


STOPPING = (
    _opt("--early-stop-patience", type=bounded("early_stop_patience"), metavar="EPOCHS",
         help="Stop after this many epochs without a better --best-metric on the validation pages, then write the "
              "final model (0: off)."),
    _opt("--time-budget", type=bounded("time_budget"), metavar="MINUTES",
         help="Stop after the epoch during which the run's training time (every resume counted) reaches this, "
              "then validate and write the final model (0: off)."),
)


REPLAY = (
    _opt("--replay-dir", type=click.Path(file_okay=False),
         help="Another dataset trained on beside DATA_DIR: in a fine-tune, the source model's own domain (e.g. the "
              "data it was trained on), so the model keeps what it knew (rehearsal). --replay-pages of its pages, "
              "chosen by the seed, join the training pages; validation stays DATA_DIR's [default: none]"),
    _opt("--replay-pages", type=bounded("replay_pages"),
         help="Pages of --replay-dir trained on (all of them where it holds fewer, said so)."),
)


def check_replay(given: dict[str, Any]) -> dict[str, Any]:
    """GIVEN (the options set) unchanged, unless --replay-pages comes without its folder."""
    if "replay_pages" in given and not given.get("replay_dir"):
        raise click.UsageError("--replay-pages counts pages of --replay-dir; give the folder too, or leave it out")
    return given


RUN = (OUTPUT, EPOCHS, *HYPER, AUGMENT, *VALIDATION, *REPLAY, *STOPPING, WORKERS, SAVE_EVERY, SAVE_VERSIONED, LOG_EVERY,
       DEVICE, PRECISION, SYNC_BATCHNORM, RECOMPUTE_STAGES)


def _given(options: dict[str, Any]) -> dict[str, Any]:
    """Options the user set: None (not given) and "" (an empty MLproject parameter) are dropped."""
    return {k: v for k, v in options.items() if v is not None and v != ""}


def _anchor_sizes(ctx: click.Context, param: click.Parameter, value: str | None):
    """--anchor-sizes text -> None (auto: fit them) or a tuple of sizes; a bad value is one clear error."""
    if value is None or value == "":
        return None
    try:
        return parse_anchor_sizes(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


TRACKING = (
    click.option("--experiment-name", default=None,
                 help="MLflow experiment [default: $MLFLOW_EXPERIMENT_NAME or charseg; under `mlflow run`: its own]"),
    click.option("--log-checkpoints", type=click.Choice(LOG_CHECKPOINTS), default="last", show_default=True,
                 help="Checkpoints uploaded as MLflow artifacts: every one, the latest (enough to resume) "
                      "plus the final model, or none."),
    click.option("--system-metrics/--no-system-metrics", default=True, show_default=True,
                 help="Log CPU, memory, disk, network and GPU use as the run's system/* metrics (MLflow's own "
                      "sampler, every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL s, default 10)."),
    click.option("--offline", is_flag=True,
                 help="Record the run in OUTPUT_DIR/offline-tracking, not on the tracking server (air-gapped "
                      "machines); `charseg sync OUTPUT_DIR` uploads it later. A server that does not answer at the "
                      "start has the same effect, with a warning."),
)


REGISTER_AS = click.option(
    "--register-as", default="", help="After training, register the run's best checkpoint (else its final model) in "
                                      "the MLflow model registry under this name (champion alias if it wins).")


MODEL_SOURCE = click.option(
    "--model", "model_source", required=True,
    help="A checkpoint file, an output folder or an MLflow run ID (its best, else its latest checkpoint), "
         "runs:/... or models:/NAME@champion.")


SCORE = click.option("--score-threshold", type=bounded("score_threshold"), default=0.5, show_default=True,
                     help="Keep detections scoring at least this.")


DEVICE_OPT = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")


SCALE_TEST_OVERRIDE = click.option("--scale-test", type=BlankFiniteFloat(min=0, max=MAX_PAGE_SCALE), default=None,
                                   help=f"{SCALE_TEST_HELP} [default: the checkpoint's; given, every page is read "
                                        "at this one scale]")
OUTLINE_OVERRIDE = click.option("--outline", type=click.Choice(OUTLINES), default=None,
                                help=f"{OUTLINE_HELP} [default: the checkpoint's; mask for models trained before "
                                     "the option]")
