"""click commands: parse options into a config and call the runner; no training logic here."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import click

from . import checkpoint as ckpt
from .config import (BOUNDS, FINETUNE_LR_FACTOR, LOG_CHECKPOINTS, LR_SCHEDULES, MAX_PAGE_SCALE, NORMS, TrainConfig,
                     parse_anchor_sizes)
from .data.coco import CHAR_FROM_HELP, SEGMENTATIONS, export_coco, import_coco
from .data.dataset import scan_dataset
from .data.generate import LAYOUTS, MAX_CHARS, MAX_FONT_SIZE, MAX_IMAGES, MAX_SIDE, generate_dataset
from .data.heldout import generate_heldout
from .errors import CharsegError
from .inference.evaluate import METRICS
from .inference.predict import COCO_PREDICTIONS, LABELS
from .model.build import BACKBONES, WEIGHT_CHOICES
from .precision import PRECISIONS
from .precision import resolve as resolve_precision
from .training import distributed, runner

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


# --scale-train / --scale-test: 0 (the --min-size rule) or a factor up to MAX_PAGE_SCALE.
PAGE_SCALE = FiniteFloat(min=0, max=MAX_PAGE_SCALE)

_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def bounded(field: str, low: float | None = None) -> click.ParamType:
    """The option type of a TrainConfig setting: its BOUNDS range (shown by --help), an int or
    a finite float as the field is; `low` replaces the lower end (0 meaning "keep")."""
    bound = BOUNDS[field]
    low = bound.low if low is None else low
    if "float" in _FIELD_TYPES[field]:
        return FiniteFloat(min=low, max=bound.high, min_open=bound.low_open and low == bound.low,
                           max_open=bound.high_open)
    return click.IntRange(min=int(low), max=int(bound.high))


# Seeds numpy accepts (0 to 2**32 - 1); torch and python take them too.
SEED = bounded("seed")
# Worker processes: at most one per CPU of this machine (a larger number only adds processes),
# or the default on a machine of fewer CPUs.
MAX_WORKERS_HERE = max(os.cpu_count() or 1, _DEFAULTS.num_workers)
WORKER_COUNT = click.IntRange(min=0, max=MAX_WORKERS_HERE)


def _opt(*decls: str, help: str, field: str | None = None, **kwargs) -> Callable:
    """An option whose default stays None (so only given values override) but whose help
    shows the TrainConfig default."""
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
    return _opt(*decls, type=click.BOOL, is_flag=False, flag_value=True, help=f"{help} (true/false)",
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
                   "the training scale, small glyphs are found more often. 0: the --min-size rule.")
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
    _opt("--rpn-proposals-train", type=bounded("rpn_proposals_train"),
         help="RPN proposals kept per image in training (0: max(2000, 2 x detections per image))."),
    _opt("--rpn-proposals-test", type=bounded("rpn_proposals_test"),
         help="RPN proposals kept per image at inference (0: max(1000, 2 x detections per image))."),
    _opt("--roi-samples", type=bounded("roi_samples"), help="Proposals sampled per image for the head losses."),
    _opt("--detections-per-img", type=bounded("detections_per_img"),
         help="Most detections returned per image, also COCO maxDets (0: max(500, 1.2 x the characters of "
              "the densest image))."),
)
VAL_DIR = _opt("--val-dir", type=click.Path(file_okay=False),
               help="Separate validation dataset [default: hold out --val-fraction of DATA_DIR]")
VALIDATION = (
    VAL_DIR,
    _opt("--val-fraction", type=bounded("val_fraction"),
         help="Share of DATA_DIR held out for validation, chosen by the seed (0: no validation)."),
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
                 help=PRECISION_HELP.format(auto="fp32 in training (bf16-trained models matched fp32 on held-out pages "
                                                "in five seed pairs, -0.0003 segm_AP50 on average, -0.021..+0.009 per "
                                                "seed: docs/BENCHMARKS.md)"))


class AutoPrecisionOption(click.Option):
    """--precision whose help also says what `auto` picks on the machine showing it (worked
    out when --help is shown, not at every start)."""

    def get_help_record(self, ctx: click.Context):
        try:
            chosen, why = resolve_precision("auto", runner.resolve_device("auto"), training=False)
            here = f" On this machine auto is {chosen} ({why.removeprefix('auto: ')})."
        except RuntimeError as exc:  # a broken CUDA set-up must not break --help
            here = f" (What auto picks here could not be found: {exc}.)"
        original, self.help = self.help, f"{self.help}{here}"
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = original


INFERENCE_PRECISION = click.option(
    "--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True, cls=AutoPrecisionOption,
    help=PRECISION_HELP.format(auto="bf16 where the device computes it natively (a CUDA GPU of compute capability "
                                    "8.0 or later; a CPU with amx_bf16 or avx512_bf16 in /proc/cpuinfo), else fp32"))
SYNC_BATCHNORM = _bool_opt("--sync-batchnorm", help="Under torchrun, live BatchNorm (--norm batch from scratch) "
                                                    "normalises over the global batch instead of each process's pages")
RUN = (OUTPUT, EPOCHS, *HYPER, AUGMENT, *VALIDATION, WORKERS, SAVE_EVERY, SAVE_VERSIONED, LOG_EVERY, DEVICE,
       PRECISION, SYNC_BATCHNORM)


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


@dataclass
class TrackingChoices:
    """The TRACKING options of a training command."""

    experiment_name: str | None
    log_checkpoints: str
    system_metrics: bool
    offline: bool

    @classmethod
    def pop(cls, options: dict[str, Any]) -> "TrackingChoices":
        return cls(*(options.pop(f.name) for f in dataclasses.fields(cls)))


@contextlib.contextmanager
def _training_job(device: str | None) -> Iterator[distributed.World]:
    """A training command's processes: one, or torchrun's (joined into one job here; ranks
    other than 0 print warnings and errors only)."""
    world = distributed.world()
    if world.distributed and not world.main:
        logging.getLogger().setLevel(logging.WARNING)
    device_type = runner.resolve_device(device or "auto").type if world.distributed else "cpu"
    with distributed.process_group(device_type) as joined:
        yield joined


def _tracked(choices: TrackingChoices, output_dir: str, lineage: ckpt.Lineage,
             action: Callable[[runner.Tracker], runner.RunResult], register_as: str | None = None) -> None:
    """Run `action` inside an MLflow run (registering its best checkpoint when asked); print
    where its results are. Under torchrun only rank 0 tracks: the other ranks run `action`
    untracked and leave any error of theirs for rank 0 to report as the run's failure."""
    world = distributed.world()
    if not world.main:
        try:
            action(runner.NullTracker())
        except BaseException as exc:
            distributed.record_error(output_dir, world.rank, exc)
            raise
        return
    from . import tracking

    tracker = tracking.MlflowTracker(log_checkpoints=choices.log_checkpoints, lineage=lineage)
    with tracking.tracked_run(choices.experiment_name, system_metrics=choices.system_metrics, output_dir=output_dir,
                              offline=choices.offline, tracker=tracker) as run_id:
        result = _naming_failed_rank(output_dir, lambda: action(tracker))
        registration = None
        if register_as and tracker.continuing:  # training is done; the registry is on the server that is away
            logging.getLogger("charseg").warning(
                "warning: not registered as %s: the tracking server does not answer; after `charseg sync %s`, run "
                "`charseg register %s --name %s`", register_as, output_dir, run_id, register_as)
        elif register_as:
            registration = tracking.register_checkpoint(runner.best_or_final(result), register_as, run_id)
    click.echo(f"checkpoints in {result.output_dir}; final model {result.final_checkpoint}")
    if result.best.get("epoch"):
        best = runner.best_or_final(result)
        where = best if best != result.final_checkpoint else "best.pth of the run this one resumed (not beaten here)"
        click.echo(f"best {result.best['metric']} {result.best['value']:.4f} at epoch {result.best['epoch']}: {where}")
    if result.heldout:
        click.echo("held-out pages (final model): " + ", ".join(
            f"{k} {result.heldout[k]:.3f}" for k in ("segm_AP50", "char_f1", "bbox_AP50", "segm_AP")))
    if registration:
        click.echo(registration.message)
    _echo_run(run_id)


def _naming_failed_rank(output_dir: str, call: Callable[[], runner.RunResult]) -> runner.RunResult:
    """call(); when it fails because another rank did (a broken connection, torchrun's SIGTERM),
    raise that rank's own error instead."""
    try:
        return call()
    except Exception as exc:
        world = distributed.world()
        if not world.distributed:
            raise
        distributed.ignore_termination()  # torchrun's SIGTERM: finish recording the failure first
        errors = {}
        for _ in range(50):  # the failed rank writes its error before its process ends
            errors = distributed.peer_errors(output_dir, world.size)
            if errors or not isinstance(exc, (distributed.Terminated, RuntimeError)):
                break
            time.sleep(0.1)
        if not errors:
            raise
        rank, message = min(errors.items())
        raise CharsegError(f"rank {rank} of {world.size} failed: {message}") from exc


def _echo_run(run_id: str) -> None:
    from . import tracking

    uri = tracking.current_tracking_uri()
    click.echo(f"MLflow run {run_id} at {uri}; view it with: mlflow ui --backend-store-uri {uri}")


@contextlib.contextmanager
def _source_checkpoint(source: str, *, prefer_best: bool, epoch: int | None = None, under: str | None = None):
    """Yield (local checkpoint path, lineage) for SOURCE; a download lives until the block ends,
    in a temporary folder of UNDER (a training's output folder, whose next writer removes it
    should this process be killed) or else of the system's temp folder.

    Under torchrun, rank 0 alone downloads from MLflow and sends the file to the other ranks
    (other machines included); a path that exists for rank 0 is read by every rank."""
    world = distributed.world()
    remote = distributed.broadcast_object(not Path(source).exists())
    if world.distributed and remote and not world.main:
        with tempfile.TemporaryDirectory(prefix="charseg-rank-") as download_dir:
            yield distributed.broadcast_file(None, Path(download_dir)), ckpt.Lineage()
        return
    local = None if remote else ckpt.local_checkpoint(source, prefer_best=prefer_best, epoch=epoch)
    if local is not None:  # a file or folder: MLflow is not even imported (predict starts sooner)
        yield local, ckpt.Lineage(source_uri=str(local.resolve()))
        return
    from . import tracking

    if under and world.main:
        Path(under).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=ckpt.download_prefix(), suffix=".tmp",
                                     dir=under if world.main else None) as download_dir:
        path, lineage = tracking.resolve_checkpoint(source, Path(download_dir), prefer_best=prefer_best, epoch=epoch)
        if world.distributed and remote:
            distributed.broadcast_file(path, Path(download_dir))
        yield path, lineage


class CharsegGroup(click.Group):
    """The one error boundary: a CharsegError from any command is printed as one line
    (`Error: ...`, exit 1), never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CharsegError as exc:
            raise click.ClickException(str(exc)) from exc


@click.group(cls=CharsegGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="charseg")
@click.option("-q", "--quiet", is_flag=True, help="Print warnings and errors only.")
def cli(quiet: bool) -> None:
    """Train Mask R-CNN to find and outline every character in an image.

    \b
    A dataset is DATA_DIR/images/00001.png with DATA_DIR/annotations/00001.csv,
    CSV header `char,polygon_json`, polygon a flat JSON list [x1,y1,x2,y2,...].
    Every training command is tracked in MLflow: $MLFLOW_TRACKING_URI, default sqlite:///mlflow.db.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)


@cli.command("train")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@_options(*RUN)
@_opt("--weights", type=str,
      help=f"Initial weights: {' | '.join(WEIGHT_CHOICES)} | PATH to a torchvision state dict or charseg checkpoint.")
@_opt("--backbone", type=click.Choice(BACKBONES), help="ResNet FPN backbone; resnet18/34 are lighter for CPUs.")
@_opt("--fpn-channels", type=bounded("fpn_channels"),
      help="FPN output channels and mask head width; torchvision's 256, 128 trains about 2.8x faster on a CPU.")
@_bool_opt("--mask-pixels", help="The mask predictor also reads the image's pixels inside each box at 28x28: "
                                 "glyphs of 10-30 px are only a few cells of the stride-4 features")
@_opt("--norm", type=click.Choice(NORMS),
      help="Normalisation of a model trained from scratch: batch (BatchNorm in the backbone) or group "
           "(GroupNorm in the backbone, FPN and mask head; --weights none or a group checkpoint).")
@_opt("--anchor-sizes", type=str, metavar="auto|S1,...,S5", callback=_anchor_sizes,
      help="RPN anchor size (px at the model's input) for each FPN level P2-P6; auto fits them to the "
           "training characters, e.g. 32,64,128,256,512 is torchvision's.")
@_options(*TRACKING)
@click.option("--register-as", default="", help="After training, register the best checkpoint in the MLflow "
                                               "model registry under this name (champion alias if it wins).")
def train_command(data_dir: str, register_as: str, **options: Any) -> None:
    """Train from pretrained (or random) initial weights on DATA_DIR.

    \b
    More processes (one per GPU, or gloo processes on a CPU), with PyTorch's launcher:
      torchrun --standalone --nproc-per-node K -m charseg train DATA_DIR ...
    Each reads --batch-size pages a step (global batch = batch size x K); rank 0 writes,
    validates and tracks one MLflow run. resume and finetune run under torchrun alike.
    """
    choices = TrackingChoices.pop(options)
    config = TrainConfig(data_dir=data_dir, **_given(options))
    with _training_job(config.device):
        config.output_dir = distributed.broadcast_object(config.output_dir or runner.default_output_dir("train"))
        _tracked(choices, config.output_dir, ckpt.Lineage(), lambda tracker: runner.train(config, tracker),
                 register_as=register_as or None)


@cli.command("resume")
@click.argument("source")
@_options(_opt("--epochs", type=bounded("epochs", low=0), help="New total number of epochs (0: keep the checkpoint's)."),
          click.option("--epoch", type=bounded("epochs", low=0), default=0, show_default=True,
                       help="With a run ID or a folder: resume from this epoch's checkpoint (0: the latest)."),
          _opt("--data-dir", type=click.Path(exists=True, file_okay=False),
               help="Dataset folder, if it moved since the checkpoint was written."),
          VAL_DIR, OUTPUT, WORKERS, LOG_EVERY, DEVICE,
          _opt("--precision", type=click.Choice(PRECISIONS),
               help="Change the run's precision (the resumed run is then not bit-exact) [default: the run's]"),
          *TRACKING)
def resume_command(source: str, epoch: int, **options: Any) -> None:
    """Continue an interrupted run: model, optimizer, LR schedule, epoch and RNG.

    SOURCE is a checkpoint file, an output folder (its latest checkpoint that loads), an MLflow
    run ID (its latest checkpoint artifact) or an MLflow artifact URI (runs:/..., models:/...).
    Epochs continue the source's numbering.
    """
    choices = TrackingChoices.pop(options)
    overrides = _given(options)
    if overrides.get("epochs") == 0:
        del overrides["epochs"]
    with _training_job(overrides.get("device")):
        _resume(source, epoch, overrides, choices)


def _resume(source: str, epoch: int, overrides: dict[str, Any], choices: TrackingChoices) -> None:
    if not Path(source).exists():  # to be downloaded: write next to nothing temporary
        overrides.setdefault("output_dir", runner.default_output_dir("resume"))
    if "output_dir" in overrides:
        overrides["output_dir"] = distributed.broadcast_object(overrides["output_dir"])
    with _source_checkpoint(source, prefer_best=False, epoch=epoch or None,
                            under=overrides.get("output_dir")) as (path, lineage):
        try:
            plan = runner.plan_resume(path, overrides)
        except runner.TrainingAlreadyComplete as exc:
            click.echo(str(exc).replace(str(path), source))
            return
        # A checkpoint file names the run that wrote it: link to it as a resume by run ID does.
        lineage.source_run_id = lineage.source_run_id or plan.state.get("run_id", "")
        _tracked(choices, plan.config.output_dir, lineage, lambda tracker: runner.resume(plan, tracker=tracker))


@cli.command("finetune")
@click.argument("source")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--run-id", default="", help="Take the checkpoint from this MLflow run (its best, else its last); "
                                           "SOURCE must then be empty (\"\").")
@_options(*RUN)
@click.option("--lr-factor", type=bounded("lr_factor"), default=None,
              help=f"Multiplier on the learning rate for fine-tuning [default: {FINETUNE_LR_FACTOR}]")
@_options(*TRACKING)
def finetune_command(source: str, data_dir: str, run_id: str, **options: Any) -> None:
    """Fine-tune a checkpoint's weights on DATA_DIR with a fresh optimizer at 0.2x the LR.

    SOURCE is a checkpoint file, an MLflow run ID (its best checkpoint, else its last) or an
    MLflow artifact URI (runs:/..., models:/...). Backbone, input size and optimizer settings
    come from the checkpoint unless given. Epochs start at 1.
    """
    if bool(source) == bool(run_id):
        raise click.UsageError("give the checkpoint either as SOURCE or as --run-id, not both or neither")
    choices = TrackingChoices.pop(options)
    overrides = {"data_dir": data_dir, **_given(options)}
    with _training_job(overrides.get("device")):
        overrides["output_dir"] = distributed.broadcast_object(overrides.get("output_dir")
                                                               or runner.default_output_dir("finetune"))
        with _source_checkpoint(source or run_id, prefer_best=True, under=overrides["output_dir"]) as (path, lineage):
            _tracked(choices, overrides["output_dir"], lineage,
                     lambda tracker: runner.finetune(path, overrides, tracker))


MODEL_SOURCE = click.option(
    "--model", "model_source", required=True,
    help="A checkpoint file, an output folder or an MLflow run ID (its best, else its latest checkpoint), "
         "runs:/... or models:/NAME@champion.")
SCORE = click.option("--score-threshold", type=bounded("score_threshold"), default=0.5, show_default=True,
                     help="Keep detections scoring at least this.")
DEVICE_OPT = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
SCALE_TEST_OVERRIDE = click.option("--scale-test", type=PAGE_SCALE, default=None,
                                   help=f"{SCALE_TEST_HELP} [default: the checkpoint's]")


@cli.command("evaluate")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@MODEL_SOURCE
@SCORE
@click.option("--detections-per-img", type=bounded("detections_per_img", low=1), default=None,
              help="Detections per image and COCO maxDets [default: the checkpoint's].")
@SCALE_TEST_OVERRIDE
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="metrics.json", show_default=True,
              help="Where to write the metrics as JSON.")
@DEVICE_OPT
@INFERENCE_PRECISION
@click.option("--experiment-name", default=None, help="MLflow experiment for the evaluation run.")
def evaluate_command(data_dir: str, model_source: str, score_threshold: float, detections_per_img: int | None,
                     scale_test: float | None, out_path: str, device: str, precision: str,
                     experiment_name: str | None) -> None:
    """Evaluate a model on DATA_DIR: COCO bbox/segm AP, AP50, AP75 and character precision,
    recall, F1 at mask IoU 0.5 and count error; printed, written as JSON, logged to MLflow."""
    from . import tracking

    with _source_checkpoint(model_source, prefer_best=True) as (path, lineage):
        with tracking.tracked_run(experiment_name) as run_id:
            result = runner.evaluate_checkpoint(path, data_dir, device=device, score_threshold=score_threshold,
                                                detections_per_img=detections_per_img, scale_test=scale_test,
                                                precision=precision)
            Path(out_path).write_text(json.dumps(result.metrics, indent=2) + "\n")
            tracking.log_evaluation(result.metrics, lineage, data_dir, result.samples, Path(out_path))
    for key, value in result.metrics.items():
        click.echo(f"{key:16s} {value:.4f}")
    click.echo(f"metrics written to {out_path}")
    _echo_run(run_id)


@cli.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@MODEL_SOURCE
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output folder: images/, annotations/*.csv (char,polygon_json,score) and overlays/*.png.")
@SCORE
@SCALE_TEST_OVERRIDE
@DEVICE_OPT
@click.option("--format", "output_format", type=click.Choice(("csv", "coco")), default="csv", show_default=True,
              help="csv: the dataset layout only; coco: also OUT/predictions_coco.json, COCO instances JSON with a "
                   "score per annotation (pycocotools, FiftyOne, CVAT read it).")
@click.option("--coco-segmentation", type=click.Choice(SEGMENTATIONS), default="polygon", show_default=True,
              help="With --format coco: each mask as its outline polygon or as COCO RLE.")
@click.option("--labels", type=click.Choice(LABELS), default="fit", show_default=True,
              help="Score labels on the overlays: only where they overlap no other label, every one, or none.")
@click.option("--batch-size", type=bounded("batch_size"), default=1, show_default=True,
              help="Images of the same size that go through the model together (consecutive ones, in file name "
                   "order). The same detections as one at a time, up to float rounding (batched convolutions may "
                   "take other kernels). Worth raising on a GPU; a CPU gains little.")
@INFERENCE_PRECISION
def predict_command(inputs: tuple[str, ...], model_source: str, out_dir: str, score_threshold: float,
                    scale_test: float | None, device: str, output_format: str, coco_segmentation: str,
                    labels: str, batch_size: int, precision: str) -> None:
    """Find and outline every character in INPUT images (files or folders).

    The output folder is a dataset: `charseg validate-data OUT` accepts it and it can be
    fine-tuned on after review. The char column is '?' (the model does not read characters).
    """
    from .data.images import IMAGE_SUFFIXES
    from .inference.predict import load_model_for_inference, predict_files

    paths: list[Path] = []
    for item in map(Path, inputs):
        paths += sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if item.is_dir() else [item]
    if not paths:
        raise click.ClickException(f"no .png/.jpg/.jpeg image in {', '.join(inputs)}")
    _check_distinct_names(paths)
    with _source_checkpoint(model_source, prefer_best=True) as (path, _):
        torch_device = runner.resolve_device(device)
        model, _, _ = load_model_for_inference(path, torch_device, scale_test=scale_test, precision=precision)
        summary = predict_files(model, paths, Path(out_dir), torch_device, score_threshold, labels=labels,
                                coco_segmentation=coco_segmentation if output_format == "coco" else None,
                                batch_size=batch_size)
    for line in summary["skipped"]:
        click.echo(f"skipped {line}", err=True)
    click.echo(f"{summary['instances']} characters in {summary['images']} images; written to {out_dir}"
               + (f"; {len(summary['skipped'])} images skipped (above)" if summary["skipped"] else ""))
    if output_format == "coco":
        click.echo(f"COCO JSON: {Path(out_dir) / COCO_PREDICTIONS}")


def _check_distinct_names(paths: list[Path]) -> None:
    """predict names its outputs after each image's stem: two inputs of one stem (a.png and
    a.jpg, or one file given twice) would overwrite each other's CSV and overlay."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise click.ClickException(
                f"{seen[path.stem]} and {path} would both be written as {path.stem}.csv and {path.stem}.png in "
                "--out; rename one, or predict them into separate --out folders")
        seen[path.stem] = path


@cli.command("sync")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--tracking-uri", default=None,
              help="The server to upload to [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].")
def sync_command(output_dir: str, tracking_uri: str | None) -> None:
    """Upload the runs recorded in OUTPUT_DIR/offline-tracking (--offline, or made while the
    tracking server was down) to the tracking server: params, tags, datasets, every metric
    with its steps and timestamps, artifacts (checkpoints too), status. Running it again adds
    only what is missing."""
    from . import tracking

    for line in tracking.sync_offline_runs(output_dir, tracking_uri):
        click.echo(line)


@cli.command("register")
@click.argument("run_id")
@click.option("--name", required=True, help="Registered model name.")
def register_command(run_id: str, name: str) -> None:
    """Register the best checkpoint of MLflow run RUN_ID (else its final one) as a new version
    of NAME; the `champion` alias moves to it only when its validation metric beats the
    current champion's."""
    from . import tracking

    if not tracking.is_run_id(run_id):
        raise click.BadParameter(f"{run_id!r} is not an MLflow run ID (32 hex digits)", param_hint="RUN_ID")
    with tempfile.TemporaryDirectory(prefix="charseg-source-") as download_dir:
        registration = tracking.register_run(run_id, name, Path(download_dir))
    click.echo(registration.message)
    click.echo(f"load it with: mlflow.pyfunc.load_model('models:/{name}/{registration.version}')")


@cli.command("import-coco")
@click.argument("coco_json", type=click.Path(exists=True, dir_okay=False))
@click.argument("images_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--char-from", default="category", show_default=True, help=f"The char column: {CHAR_FROM_HELP}.")
def import_coco_command(coco_json: str, images_dir: str, out_dir: str, char_from: str) -> None:
    """Convert COCO instances JSON (CVAT, Label Studio, Roboflow exports) and its IMAGES_DIR
    into a charseg dataset in OUT_DIR.

    \b
    A polygon of one ring is copied point for point; several rings and RLE masks (iscrowd
    or not) are rasterised and traced as `predict` traces masks (a part that is not the
    largest is reported). Every annotation not imported is listed with its ID and why.
    Exits 1 when the file has no annotations or none could be imported.
    """
    report = import_coco(coco_json, images_dir, out_dir, char_from=char_from)
    for line in report.lines():
        click.echo(line)
    if not report.characters:
        raise click.ClickException(f"no character imported from {coco_json} (the problems are listed above); "
                                   f"{out_dir} holds no training data")
    click.echo(f"check it with: charseg validate-data {out_dir}")


@cli.command("export-coco")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_json", type=click.Path(dir_okay=False))
def export_coco_command(data_dir: str, out_json: str) -> None:
    """Write DATA_DIR's usable images and polygons as COCO instances JSON (one category per
    character; file_name relative to DATA_DIR/images). What is not usable is listed. Exits 1,
    writing nothing, when no image is usable."""
    counts, problems = export_coco(data_dir, out_json)
    for line in problems:
        click.echo(f"not exported: {line}")
    click.echo(f"wrote {counts['images']} images, {counts['annotations']} annotations and {counts['categories']} "
               f"categories to {out_json}")


@cli.command("validate-data")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
def validate_data_command(data_dir: str) -> None:
    """Report images, instances and every skipped polygon or image with file, line and reason.

    Exits 1 when no image is usable. Never modifies the dataset.
    """
    report = scan_dataset(data_dir)
    click.echo(report.format())
    if not report.samples:
        raise click.ClickException(f"{data_dir}: no usable image; fix the problems listed above")


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return int(lo), int(hi or lo)


@cli.command("generate")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--num-images", default=20, show_default=True, type=click.IntRange(min=1, max=MAX_IMAGES),
              help="Images to render.")
@click.option("--size", default="128x128", show_default=True,
              help=f"Image size WIDTHxHEIGHT (or one number), 8 to {MAX_SIDE} px a side.")
@click.option("--chars-per-image", default="3-8", show_default=True,
              help=f"Characters per image, MIN-MAX or N, at most {MAX_CHARS} (scatter stops at a full page).")
@click.option("--font-size", default="18-40", show_default=True,
              help=f"Glyph size in pixels, MIN-MAX or N, 4 to {MAX_FONT_SIZE}.")
@click.option("--font", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A .ttf/.otf font [default: scatter: Pillow's bundled scalable font; lines: that and "
                   "DejaVu Sans/Serif and Computer Modern from matplotlib].")
@click.option("--layout", type=click.Choice(LAYOUTS), default="scatter", show_default=True,
              help="scatter: single glyphs of one font anywhere on a flat page, never touching; lines: lines "
                   "of words in several fonts, anti-aliased, ink from black to faint gray on unevenly lit, noisy paper "
                   "(at most --chars-per-image).")
@click.option("--held-out", "held_out", is_flag=True,
              help="Pages for measuring a model, made by another process: lines of text in other fonts, "
                   "rotated up to 12 degrees, textured, blurred and noisy, sides 128-256 px, tight annotator "
                   "polygons. --size, --chars-per-image, --font-size, --font and --layout do not apply.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Random seed; same seed, same dataset.")
def generate_command(out_dir: str, num_images: int, size: str, chars_per_image: str, font_size: str,
                     font: str | None, layout: str, held_out: bool, seed: int) -> None:
    """Render a synthetic dataset of characters with polygon annotations into OUT_DIR."""
    if held_out:
        summary = generate_heldout(out_dir, num_images=num_images, seed=seed, progress=True)
        click.echo(f"wrote {summary.images} held-out pages with {summary.characters} characters to {summary.out_dir}")
        return
    try:
        w, _, h = size.lower().partition("x")
        width, height = int(w), int(h or w)
        chars, sizes = _range(chars_per_image), _range(font_size)
    except ValueError as exc:
        raise click.BadParameter(f"cannot parse {exc}; use e.g. --size 128x96 --chars-per-image 3-8") from exc
    summary = generate_dataset(out_dir, num_images=num_images, width=width, height=height, chars_per_image=chars,
                               font_size=sizes, font_path=font, seed=seed, layout=layout, progress=True)
    click.echo(f"wrote {summary.images} images with {summary.characters} characters to {summary.out_dir}")


def main() -> None:
    """Console-script entry point."""
    # Every module is imported: the ~200k objects of torch and torchvision leave the garbage
    # collector's generations, so no collection scans them again, nor the one at exit
    # (0.4 s of a predict process on a 2-core CPU).
    gc.freeze()
    cli(prog_name="charseg")


if __name__ == "__main__":
    main()
