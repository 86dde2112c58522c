"""The commands on trained models and their runs: evaluate, predict, export, register, sync."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import jobs
from ..data.coco import SEGMENTATIONS
from ..inference.evaluate import evaluate_checkpoint
from ..inference.export import FORMATS as EXPORT_FORMATS
from ..inference.predict import COCO_PREDICTIONS, LABELS
from ..model.heads import PAGE_MAX_SIDE
from ..precision import resolve_compute
from .options import (CALIBRATION_CACHE, CALIBRATION_DIR, DEVICE_OPT, INFERENCE_PRECISION, MODEL_SOURCE,
                      OUTLINE_OVERRIDE, SCALE_TEST_OVERRIDE, SCORE, bounded, check_int8_options)

DETECTIONS_OVERRIDE = click.option(
    "--detections-per-img", type=bounded("detections_per_img", low=1), default=None,
    help="Most detections per image; a page that reaches it is named with a warning [default: the checkpoint's, "
         "raised for a page that reaches it: the page is read again with twice the limit until it does not].")
MAX_SIZE_OVERRIDE = click.option(
    "--max-size", type=bounded("max_size"), default=None,
    help="Longest side of a page at the model's input; a larger page is shrunk to it and named with a warning "
         f"[default: the checkpoint's --max-size, raised to {PAGE_MAX_SIDE} px for a model with a page scale "
         "(--scale-test): its training cap would shrink a large page's glyphs below any size it learned].")


@click.command("evaluate")
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@MODEL_SOURCE
@SCORE
@DETECTIONS_OVERRIDE
@SCALE_TEST_OVERRIDE
@MAX_SIZE_OVERRIDE
@OUTLINE_OVERRIDE
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default="metrics.json", show_default=True,
              help="Where to write the metrics as JSON.")
@DEVICE_OPT
@INFERENCE_PRECISION
@CALIBRATION_DIR
@CALIBRATION_CACHE
@click.option("--experiment-name", default=None, help="MLflow experiment for the evaluation run.")
def evaluate_command(data_dir: str, model_source: str, score_threshold: float, detections_per_img: int | None,
                     scale_test: float | None, max_size: int | None, outline: str | None, out_path: str, device: str,
                     precision: str, calibration_dir: str | None, calibration_cache: str | None,
                     experiment_name: str | None) -> None:
    """Evaluate a model on DATA_DIR: COCO bbox/segm AP, AP50, AP75 and character precision,
    recall, F1 at mask IoU 0.5 and count error; printed, written as JSON, logged to MLflow."""
    from .. import tracking

    check_int8_options(precision, calibration_dir, calibration_cache)
    with jobs.resolve_source(model_source, prefer_best=True) as (path, lineage):
        with tracking.tracked_run(experiment_name) as run_id:
            result = evaluate_checkpoint(path, data_dir, device=device, score_threshold=score_threshold,
                                         detections_per_img=detections_per_img, scale_test=scale_test,
                                         max_size=max_size, outline=outline, precision=precision,
                                         calibration_dir=calibration_dir, calibration_cache=calibration_cache)
            Path(out_path).write_text(json.dumps(result.metrics, indent=2) + "\n")
            tracking.log_evaluation(result.metrics, lineage, data_dir, result.samples, Path(out_path))
    for key, value in result.metrics.items():
        click.echo(f"{key:16s} {value:.4f}")
    click.echo(f"metrics written to {out_path}")
    jobs.echo_run(run_id)


@click.command("predict")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True))
@MODEL_SOURCE
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Output folder: images/, annotations/*.csv (char,polygon_json,score) and overlays/*.png.")
@SCORE
@SCALE_TEST_OVERRIDE
@DETECTIONS_OVERRIDE
@MAX_SIZE_OVERRIDE
@OUTLINE_OVERRIDE
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
@CALIBRATION_DIR
@CALIBRATION_CACHE
def predict_command(inputs: tuple[str, ...], model_source: str, out_dir: str, score_threshold: float,
                    scale_test: float | None, detections_per_img: int | None, max_size: int | None,
                    outline: str | None, device: str, output_format: str, coco_segmentation: str, labels: str,
                    batch_size: int, precision: str, calibration_dir: str | None,
                    calibration_cache: str | None) -> None:
    """Find and outline every character in INPUT images: files, or folders of PNG, JPEG, TIFF,
    BMP, GIF or WebP pages (not their subfolders; each page is written out as PNG).

    The output folder is a dataset: `charseg validate-data OUT` accepts it and it can be
    fine-tuned on after review. The char column is '?' (the model does not read characters).
    """
    from ..inference.int8 import quantize_on_pages
    from ..inference.predict import load_model_for_inference, predict_files

    check_int8_options(precision, calibration_dir, calibration_cache)
    paths = _input_pages(inputs)
    _check_distinct_names(paths)
    with jobs.resolve_source(model_source, prefer_best=True) as (path, _):
        compute = resolve_compute(device, precision, training=False)
        model, spec, _ = load_model_for_inference(path, compute.device, detections_per_img, scale_test, max_size,
                                                  outline=outline)
        if compute.precision == "int8":
            quantize_on_pages(model, calibration_dir, paths, calibration_cache)
        summary = predict_files(model, paths, Path(out_dir), compute.device, score_threshold, labels=labels,
                                coco_segmentation=coco_segmentation if output_format == "coco" else None,
                                batch_size=batch_size, autocast=compute.autocast,
                                follow_page=detections_per_img is None)
    for line in summary["skipped"]:
        click.echo(f"skipped {line}", err=True)
    seconds = summary["seconds"]
    click.echo(f"{summary['instances']} characters in {summary['images']} images in {seconds:.1f} s "
               f"({60 * summary['images'] / max(seconds, 1e-9):.1f} pages per minute); written to {out_dir}"
               + (f"; {len(summary['skipped'])} images skipped (above)" if summary["skipped"] else ""))
    if output_format == "coco":
        click.echo(f"COCO JSON: {Path(out_dir) / COCO_PREDICTIONS}")
    if summary["raised"]:
        raised = summary["raised"]
        click.echo(f"{len(raised)} page(s) held more characters than the model's limit of {spec.detections_per_img} "
                   f"detections and were read again with a higher one: "
                   + ", ".join(f"{name} ({limit})" for name, limit in raised[:10]) + (" ..." if len(raised) > 10 else ""),
                   err=True)
    if summary["at_limit"]:
        full = summary["at_limit"]
        click.echo(f"warning: {len(full)} page(s) reached the model's limit of {spec.detections_per_img} detections, "
                   f"so characters past it are missing: {', '.join(full[:10])}{' ...' if len(full) > 10 else ''}; "
                   f"pass --detections-per-img {2 * spec.detections_per_img} (or more)", err=True)
    if summary["shrunk"]:
        click.echo(summary["shrunk"], err=True)


def _input_pages(inputs: tuple[str, ...]) -> list[Path]:
    """The files INPUTS names and the pages in the folders it names (data.images.pages_in); one
    line for what a folder holds that is not read."""
    from ..data.images import PAGE_SUFFIXES, pages_in

    paths: list[Path] = []
    for item in map(Path, inputs):
        if not item.is_dir():
            paths.append(item)
            continue
        pages, left_out = pages_in(item)
        paths += pages
        if left_out:
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in left_out[:3])
            click.echo(f"not read in {item}: {len(left_out)} entries that are not {'/'.join(PAGE_SUFFIXES)} images "
                       f"({names}{', ...' if len(left_out) > 3 else ''}); subfolders are not searched, and a PDF "
                       "needs its pages exported as PNG", err=True)
    if not paths:
        raise click.ClickException(f"no {'/'.join(PAGE_SUFFIXES)} image in {', '.join(inputs)}")
    return paths


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


@click.command("export")
@MODEL_SOURCE
@click.option("--format", "fmt", type=click.Choice(EXPORT_FORMATS), required=True,
              help="onnx: for onnxruntime (and any ONNX runtime), OUT ends in .onnx; torchscript: for torch.jit.load "
                   "and C++ libtorch, OUT ends in .pt.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), required=True,
              help="The file to write (replaced whole once the export is checked).")
@click.option("--detections-per-img", type=bounded("detections_per_img", low=1), default=None,
              help="Most detections per page, fixed in the exported graph [default: the checkpoint's].")
@SCALE_TEST_OVERRIDE
@click.option("--register-as", default=None,
              help="With --format onnx: also register the logged onnx model as a new version of this registered "
                   "model (the `champion` alias moves by `charseg register`'s rule).")
@click.option("--experiment-name", default=None, help="MLflow experiment for the export run.")
def export_command(model_source: str, fmt: str, out_path: str, detections_per_img: int | None,
                   scale_test: float | None, register_as: str | None, experiment_name: str | None) -> None:
    """Export a model for deployment without charseg: one RGB page (uint8 H x W x 3) and a score
    threshold in; boxes, scores, 28x28 box masks and the page rectangle of each out
    (docs/EXPORT.md). The file is run on an example page and a blank one before it is kept: it
    must find the checkpoint's detections. Logged as an MLflow run (ONNX as an onnx model)."""
    from .. import tracking
    from ..inference.export import export_model

    if Path(out_path).suffix != EXPORT_FORMATS[fmt]:
        raise click.BadParameter(f"a {fmt} file ends in {EXPORT_FORMATS[fmt]}, got {out_path}", param_hint="--out")
    if register_as and fmt != "onnx":
        raise click.BadParameter("the registry holds exported models as MLflow onnx models: pass --format onnx "
                                 "(a TorchScript file is logged as an artifact of the export run)",
                                 param_hint="--register-as")
    with jobs.resolve_source(model_source, prefer_best=True) as (path, lineage):
        result = export_model(path, out_path, fmt, detections_per_img, scale_test)
        with tracking.tracked_run(experiment_name) as run_id:
            registration = tracking.log_export(result.path, result.metadata, lineage, path, register_as or None)
    example = result.checks[0]
    click.echo(f"exported to {out_path} ({fmt}, {result.path.stat().st_size / 2 ** 20:.1f} MiB) in "
               f"{result.seconds:.1f} s; on an example page it finds {example.matched} of the checkpoint's {example.expected} "
               f"detections "
               f"(boxes within {example.box_error:.2g} px, mask IoU at least {example.mask_iou:.3f})")
    if registration is not None:
        click.echo(registration.message)
    jobs.echo_run(run_id)


@click.command("sync")
@click.argument("output_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--tracking-uri", default=None,
              help="The server to upload to [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db].")
def sync_command(output_dir: str, tracking_uri: str | None) -> None:
    """Upload the runs recorded in OUTPUT_DIR/offline-tracking (--offline, or made while the
    tracking server was down) to the tracking server: params, tags, datasets, every metric
    with its steps and timestamps, artifacts (checkpoints too), status. Running it again adds
    only what is missing."""
    from .. import tracking

    for line in tracking.sync_offline_runs(output_dir, tracking_uri or None):  # "": MLproject's default
        click.echo(line)


@click.command("register")
@click.argument("run_id")
@click.option("--name", required=True, help="Registered model name.")
def register_command(run_id: str, name: str) -> None:
    """Register the best checkpoint of MLflow run RUN_ID (else its final one) as a new version
    of NAME; the `champion` alias moves to it only when its validation metric beats the
    current champion's."""
    from .. import tracking

    if not tracking.is_run_id(run_id):
        raise click.BadParameter(f"{run_id!r} is not an MLflow run ID (32 hex digits)", param_hint="RUN_ID")
    with jobs.resolve_source(run_id, prefer_best=True) as (path, _):
        registration = tracking.register_checkpoint(path, name, run_id)
    click.echo(registration.message)
    click.echo(f"load it with: mlflow.pyfunc.load_model('models:/{name}/{registration.version}')")
