"""The dataset commands: validate-data, generate, import-coco, export-coco."""

from __future__ import annotations

import click
from click.core import ParameterSource

from ..data.coco import CHAR_FROM_HELP, export_coco, import_coco
from ..data.dataset import scan_dataset
from ..data.generate import (LAYOUTS, MAX_CHARS, MAX_FONT_SIZE, MAX_IMAGES, MAX_ROTATION, MAX_SIDE,
                             TRACKING_LIMITS, generate_dataset)
from ..data.heldout import DOCUMENT_FONT_SIZES, DOCUMENT_SIZE, FONT_SIZES, generate_heldout
from ..data.unseen import INSTALL_FONTS, generate_unseen
from .options import SEED, BlankPath, FiniteFloat


@click.command("import-coco")
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


@click.command("export-coco")
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


@click.command("validate-data")
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


@click.command("generate")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--num-images", default=20, show_default=True, type=click.IntRange(min=1, max=MAX_IMAGES),
              help="Images to render.")
@click.option("--size", default="128x128", show_default=True,
              help=f"Image size WIDTHxHEIGHT (or one number), 8 to {MAX_SIDE} px a side.")
@click.option("--chars-per-image", default="3-8", show_default=True,
              help=f"Characters per image, MIN-MAX or N, at most {MAX_CHARS} (scatter stops at a full page).")
@click.option("--font-size", default="18-40", show_default=True,
              help=f"Glyph size in pixels, MIN-MAX or N, 4 to {MAX_FONT_SIZE}.")
@click.option("--font", type=BlankPath(exists=True, dir_okay=False), default=None,
              help="A .ttf/.otf font [default: scatter: Pillow's bundled scalable font; lines: that and "
                   "DejaVu Sans/Serif and Computer Modern from matplotlib].")
@click.option("--layout", type=click.Choice(LAYOUTS), default="scatter", show_default=True,
              help="scatter: single glyphs of one font anywhere on a flat page, never touching; lines: lines "
                   "of words in several fonts, anti-aliased, ink from black to faint gray on unevenly lit, noisy paper "
                   "(at most --chars-per-image).")
@click.option("--rotation", type=FiniteFloat(min=0, max=MAX_ROTATION), default=0.0, show_default=True,
              metavar="DEGREES",
              help="lines: rotate each page by up to this many degrees either way and outline each glyph where it "
                   "lands, on the rotated page's pixels (training's --augment rotates polygons drawn on the upright "
                   "page instead, up to half a pixel off the rotated ink).")
@click.option("--tracking", type=FiniteFloat(min=TRACKING_LIMITS[0], max=TRACKING_LIMITS[1]), nargs=2, default=None,
              metavar="MIN MAX",
              help="lines: space each line's glyphs by a share of its font size drawn from MIN to MAX (below 0 "
                   "neighbours touch or overlap, as in kerned, italic and dense small type), e.g. --tracking -0.08 "
                   "0.08 for pages like documents [default: 0-2 px, glyphs a little apart].")
@click.option("--held-out", "held_out", type=click.BOOL, is_flag=False, flag_value=True, default=False,
              metavar="[BOOL]",
              help="Pages for measuring a model, made by another process: lines of text in other fonts, "
                   "rotated up to 12 degrees, textured, blurred and noisy, tight annotator polygons; sides 128-256 "
                   "px and fonts of 12-30 px unless --size and --font-size are given (--size 2048 --font-size 10-18: "
                   "small type on a large page; --document: scanned document pages). --chars-per-image, --font and "
                   "--layout do not apply.")
@click.option("--unseen", is_flag=True,
              help="With --held-out: pages in font families nothing else here renders (sans, serif, rounded, "
                   "handwriting-like; some lines condensed, stencil-cut or worn, in coloured ink) on paper, printed "
                   f"patterns or faded photographs, sides 128-256 px; needs `{INSTALL_FONTS}`.")
@click.option("--document", is_flag=True,
              help="With --held-out: scanned document pages: paragraphs of full lines in the held-out fonts, dark "
                   "ink on light paper, skewed up to 1.5 degrees, blurred and noisy; "
                   f"{'x'.join(map(str, DOCUMENT_SIZE))} px and fonts of {'-'.join(map(str, DOCUMENT_FONT_SIZES))} "
                   "px unless --size and --font-size are given.")
@click.option("--seed", default=0, show_default=True, type=SEED, help="Random seed; same seed, same dataset.")
def generate_command(out_dir: str, num_images: int, size: str, chars_per_image: str, font_size: str,
                     font: str | None, layout: str, rotation: float, tracking: tuple[float, float] | None,
                     held_out: bool, unseen: bool, document: bool, seed: int) -> None:
    """Render a synthetic dataset of characters with polygon annotations into OUT_DIR."""
    try:
        w, _, h = size.lower().partition("x")
        width, height = int(w), int(h or w)
        chars, sizes = _range(chars_per_image), _range(font_size)
    except ValueError as exc:
        raise click.BadParameter(f"cannot parse {exc}; use e.g. --size 128x96 --chars-per-image 3-8") from exc
    if unseen and not held_out:
        raise click.BadParameter("--unseen makes held-out pages: pass --held-out too", param_hint="--unseen")
    if document and (not held_out or unseen):
        raise click.BadParameter("--document makes held-out pages in the held-out fonts: pass --held-out, "
                                 "without --unseen", param_hint="--document")
    if rotation and (held_out or layout != "lines"):
        raise click.BadParameter("rotates --layout lines pages (held-out pages are rotated by their own process)",
                                 param_hint="--rotation")
    if tracking and held_out:
        raise click.BadParameter("spaces --layout lines pages (held-out pages are typeset by their own process)",
                                 param_hint="--tracking")
    if unseen:
        summary = generate_unseen(out_dir, num_images=num_images, seed=seed, progress=True)
        click.echo(f"wrote {summary.images} unseen-font pages with {summary.characters} characters to "
                   f"{summary.out_dir}")
        return
    if held_out:
        given = click.get_current_context().get_parameter_source
        summary = generate_heldout(
            out_dir, num_images=num_images, seed=seed, progress=True, document=document,
            size=(width, height) if given("size") is not ParameterSource.DEFAULT else (
                DOCUMENT_SIZE if document else None),
            font_sizes=sizes if given("font_size") is not ParameterSource.DEFAULT else (
                DOCUMENT_FONT_SIZES if document else FONT_SIZES))
        click.echo(f"wrote {summary.images} held-out {'document ' if document else ''}pages with "
                   f"{summary.characters} characters to {summary.out_dir}")
        return
    summary = generate_dataset(out_dir, num_images=num_images, width=width, height=height, chars_per_image=chars,
                               font_size=sizes, font_path=font, seed=seed, layout=layout, rotation=rotation,
                               tracking=tracking, progress=True)
    click.echo(f"wrote {summary.images} images with {summary.characters} characters to {summary.out_dir}")
