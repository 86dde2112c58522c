"""Held-out quality: charseg's from-scratch CPU recipe vs stock torchvision's, at equal CPU time.

    python bench/quality.py [--recipe demo|long] [--out docs/QUALITY.md]

Trains the README's recipe (the `make demo` parameters, read from the Makefile; or the longer
recipe below) on pages from `charseg generate --layout lines`, then gives stock torchvision's
recipe the same wall-clock time on the same pages: its BatchNorm, anchors (32-512 px) and
limits, full-image mask targets, the reference script's SGD, warm-up and LR (plus gradient
clipping at 10, without which its loss goes non-finite from random initialisation), no
augmentation (its only one, a horizontal flip, mirrors characters into non-characters),
until the same time is spent (ending mid-epoch if need be).
Both are evaluated on held-out pages made by another process (`charseg generate --held-out`:
other fonts, rotation, texture, blur, noise, annotator polygons) and on the training
generator's own held-back pages, and on pages in fonts and backgrounds no generator here uses
(`generate --held-out --unseen`: needs `pip install 'charseg[fonts]'`); charseg's model also on a
2048 px page of held-out lines in small type and on a scanned document page (`--document`). The
same trained model is also read with the ink rule's and the masks' own outlines, each page once
at its scale, with masks outlined in the detected box itself, and at --scale-test 0 (VARIANTS, a
row each). Prints
the figures and writes docs/QUALITY.md with the outlines of the pages where charseg does best
and worst, drawn over the annotations. A script, not a test: run it alone.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scaling import cpu_description  # noqa: E402  (bench/ is this script's folder)

from charseg import __version__  # noqa: E402
from charseg.config import TrainConfig  # noqa: E402
from charseg.data.dataset import Sample, load_dataset_report, scan_dataset  # noqa: E402
from charseg.data.images import load_image_rgb  # noqa: E402
from charseg.data.heldout import DOCUMENT_FONT_SIZES, DOCUMENT_SIZE, generate_heldout  # noqa: E402
from charseg.data.unseen import generate_unseen  # noqa: E402
from charseg.data.loading import CharacterDataset, EpochShuffleSampler, collate  # noqa: E402
from charseg.inference.evaluate import evaluate  # noqa: E402
from charseg.inference.predict import detection_limit, load_model_for_inference, predict_arrays  # noqa: E402
from charseg.model.build import STOCK_ANCHOR_SIZES, build_model, spec_for_weights  # noqa: E402
from charseg.training import runner  # noqa: E402
from charseg.training.engine import train_one_epoch  # noqa: E402

HELDOUT_PAGES, HELDOUT_SEED = 40, 2026  # the pages `make demo` evaluates on
UNSEEN_SEED = 2027  # as many pages in unseen fonts, on unseen backgrounds (`generate --held-out --unseen`)
# A document page (issue 29 part 4): `charseg generate --held-out` at this size and type, evaluated
# with a detection limit above its characters (predict raises the limit itself: predict_following_page).
DOCUMENT = {"size": (2048, 2048), "font_sizes": (10, 18), "seed": 7}
DOCUMENT_DETECTIONS = 2500
# Scanned document pages (`generate --held-out --document`, its default size and type): paragraphs
# of full lines, as users scan them; read by the model as users get it and with --outline ink only,
# since each reading of a page's thousands of characters takes a minute.
SCAN = {"pages": 4, "seed": 7, "detections": 25000,
        "variants": ("charseg", "charseg, the ink's level agreeing best with the mask (--outline ink)")}
# The longer recipe (docs/QUALITY_LONG.md): the demo's, on more pages for twice the epochs
# (about 40 minutes on 2 cores).
LONG = {"num_images": 400, "epochs": 10}
# The same trained model read another way (one row each): what each inference rule adds.
# fixed_scale: no second, enlarged reading of a page of small characters; mask_box_margin 0:
# masks outlined in the detected box itself, as checkpoints before the margin; scale_test 0:
# pages resized to --min-size, as stock resizes them; outline mask: each mask's own contour, not
# snapped to the ink (inference/outlines.py), as checkpoints before the rule; outline ink: snapped
# at the level agreeing best with the mask, not at the learned chooser's (new runs' rule).
VARIANTS = {"charseg, the ink's level agreeing best with the mask (--outline ink)": {"outline": "ink"},
            "charseg, outlines of the masks alone (--outline mask)": {"outline": "mask"},
            "charseg, each page once at the checkpoint's scale": {"fixed_scale": True},
            "charseg, masks in the detected box itself": {"mask_box_margin": 0.0},
            "charseg, --scale-test 0": {"scale_test": 0.0}}
# Held-out pages shown, outlines drawn at this zoom (nearest neighbour) to be judged.
OVERLAY_ZOOM = 3
TRAIN_KEYS = ("epochs", "batch_size", "lr", "backbone", "norm", "fpn_channels", "mask_pixels", "mask_head_convs",
              "mask_head_channels", "mask_dice", "min_size", "max_size", "scale_train", "scale_test",
              "detections_per_img", "anchor_sizes", "roi_samples", "rpn_proposals_train", "lr_schedule", "augment",
              "seed", "weights", "val_fraction", "val_every")


def demo_recipe() -> tuple[dict, list[str]]:
    """The `make demo` training parameters and its `charseg generate` arguments, from the Makefile."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    run = re.search(r"\ndemo:.*?mlflow run (.*?)\n", text, re.S).group(1)  # the demo's one `mlflow run` line
    params = dict(re.findall(r"-P (\w+)=(\S+)", run))
    generate = re.search(r"charseg generate \$\(DEMO_DATA\) (.*)", text).group(1)
    unknown = set(params) - set(TRAIN_KEYS) - {"data_dir", "heldout_dir", "output_dir", "register_as"}
    if unknown:  # a recipe setting this script would drop: add it to TRAIN_KEYS
        raise SystemExit(f"the Makefile's demo passes {sorted(unknown)}, which bench/quality.py's TRAIN_KEYS lack")
    values = {k: v for k, v in params.items() if k in TRAIN_KEYS}
    config = TrainConfig(**{k: parse_setting(k, v) for k, v in values.items()})
    return {k: getattr(config, k) for k in TRAIN_KEYS}, shlex.split(generate)


def parse_setting(name: str, text: str):
    """TEXT (as the Makefile or a command line gives it) as TrainConfig's field NAME holds it."""
    kind = TrainConfig.__dataclass_fields__[name].type.replace(" | None", "")  # the annotation, as text
    return {"int": int, "float": float, "bool": lambda v: v.lower() == "true"}.get(kind, str)(text)


def generate_training_pages(args: list[str], out: Path, num_images: int | None) -> None:
    """Run the demo's `charseg generate` arguments (optionally with another --num-images)."""
    from click.testing import CliRunner

    from charseg.cli import cli

    if num_images:
        i = args.index("--num-images")
        args = [*args[:i + 1], str(num_images), *args[i + 2:]]
    result = CliRunner().invoke(cli, ["generate", str(out), *args])
    if result.exit_code:
        raise RuntimeError(result.output)


class Until:
    """The batches of `loader` until `deadline` (time.perf_counter()): a time budget ends mid-epoch."""

    def __init__(self, loader: DataLoader, deadline: float):
        self.loader, self.deadline = loader, deadline

    def __iter__(self):
        for batch in self.loader:
            if time.perf_counter() >= self.deadline:
                return
            yield batch


def train_stock(recipe: dict, train: list, seconds: float, out: Path) -> tuple[torch.nn.Module, dict]:
    """Stock torchvision on `train` for `seconds` (the last step may end a little later).
    Returns (model, facts)."""
    torch.manual_seed(recipe["seed"])
    spec = spec_for_weights(recipe["backbone"], "none", min_size=recipe["min_size"], max_size=recipe["max_size"],
                            anchor_sizes=STOCK_ANCHOR_SIZES, rpn_proposals_train=2000, rpn_proposals_test=1000,
                            roi_samples=512, detections_per_img=100)
    model = build_model(spec, polygon_native=False).train()
    sampler = EpochShuffleSampler(len(train), recipe["seed"])
    loader = DataLoader(CharacterDataset(train, full_masks=True), batch_size=recipe["batch_size"], sampler=sampler,
                        collate_fn=collate, num_workers=2, persistent_workers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, weight_decay=5e-4)
    warmup_iters = min(1000, len(loader))
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.001, total_iters=warmup_iters)
    start, epoch, steps = time.perf_counter(), 0, 0.0
    while time.perf_counter() < start + seconds:
        epoch += 1
        sampler.set_epoch(epoch)
        metrics = train_one_epoch(model, optimizer, Until(loader, start + seconds), torch.device("cpu"), epoch,
                                  steps_per_epoch=len(loader), iteration_scheduler=warmup,
                                  iteration_steps=warmup_iters, clip_grad_norm=10.0)
        steps += metrics["images"] / recipe["batch_size"]
        print(f"  stock epoch {epoch}: loss {metrics.get('loss', float('nan')):.3f} ({metrics['seconds']:.0f} s)",
              flush=True)
    return model, {"epochs": round(steps / len(loader), 2), "seconds": time.perf_counter() - start, "spec": spec}


def per_page(model: torch.nn.Module, pages: list, max_dets: int, threshold: float) -> list[tuple[float, Sample]]:
    """(char_f1, page) of every page, worst first."""
    scored = [(evaluate(model, [page], torch.device("cpu"), max_dets=max_dets, score_threshold=threshold
                        ).metrics["char_f1"], page) for page in pages]
    return sorted(scored, key=lambda item: item[0])


def outlines_drawn(model: torch.nn.Module, page: Sample, threshold: float) -> Image.Image:
    """PAGE at OVERLAY_ZOOM x its size (nearest neighbour), its annotations outlined in green and
    the model's outlines (score >= THRESHOLD) in red, 1 px wide, each on its pixel edges."""
    rgb = load_image_rgb(page.image_path)
    found = predict_arrays(model, [rgb], torch.device("cpu"), threshold)[0]
    image = Image.fromarray(rgb).resize((page.width * OVERLAY_ZOOM, page.height * OVERLAY_ZOOM), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    outlines = [(np.asarray(p).reshape(-1, 2), (0, 170, 0)) for p in page.polygons]
    outlines += [(np.asarray(i.polygon).reshape(-1, 2), (230, 0, 0)) for i in found]
    for points, colour in outlines:
        corners = [(x * OVERLAY_ZOOM, y * OVERLAY_ZOOM) for x, y in points]
        draw.line(corners + corners[:1], fill=colour, width=1)
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", choices=("demo", "long"), default="demo",
                        help="demo: `make demo`'s recipe (about 10 minutes); long: the same on more pages for more "
                             "epochs (about 40 minutes).")
    parser.add_argument("--out", help="Markdown report to write [default: docs/QUALITY.md, long: docs/QUALITY_LONG.md].")
    parser.add_argument("--no-stock", action="store_true", help="Skip stock torchvision (the long recipe skips it).")
    parser.add_argument("--epochs", type=int, help="Override the recipe's epochs (a quick check; the report says so).")
    parser.add_argument("--num-images", type=int, help="Override the recipe's number of training pages.")
    parser.add_argument("--keep-model", help="Copy the charseg model's final checkpoint here (bench/finetune.py "
                                             "starts from it).")
    args = parser.parse_args()
    args.out = args.out or str(ROOT / "docs" / ("QUALITY_LONG.md" if args.recipe == "long" else "QUALITY.md"))
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    recipe, generate_args = demo_recipe()
    if args.recipe == "long":
        recipe["epochs"] = LONG["epochs"]
    recipe["epochs"] = args.epochs or recipe["epochs"]
    num_images = args.num_images or (LONG["num_images"] if args.recipe == "long" else None)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_training_pages(generate_args, tmp / "train", num_images)
        generate_heldout(tmp / "heldout", num_images=HELDOUT_PAGES, seed=HELDOUT_SEED)
        heldout = scan_dataset(tmp / "heldout").samples
        generate_unseen(tmp / "unseen", num_images=HELDOUT_PAGES, seed=UNSEEN_SEED)  # needs charseg[fonts]
        unseen = scan_dataset(tmp / "unseen").samples
        config = TrainConfig(data_dir=str(tmp / "train"), output_dir=str(tmp / "charseg"), **recipe)
        print(f"charseg recipe ({args.recipe}): {recipe}", flush=True)
        start = time.perf_counter()
        result = runner.train(config)
        seconds = time.perf_counter() - start
        if args.keep_model:
            shutil.copyfile(result.final_checkpoint, args.keep_model)
        splits = runner.make_splits(config, load_dataset_report(config.data_dir))
        rows, document, scan = {}, {}, {}
        generate_heldout(tmp / "document", num_images=1, size=DOCUMENT["size"], font_sizes=DOCUMENT["font_sizes"],
                         seed=DOCUMENT["seed"])
        generate_heldout(tmp / "scan", num_images=SCAN["pages"], seed=SCAN["seed"], document=True, size=DOCUMENT_SIZE,
                         font_sizes=DOCUMENT_FONT_SIZES)
        model, spec = read_as(result.final_checkpoint, {})
        # A model without a page scale reads every page once, at --min-size: no variant to compare.
        for name, how in {"charseg": {}, **(VARIANTS if spec.scale_test else {})}.items():
            reader, reader_spec = read_as(result.final_checkpoint, how) if how else (model, spec)
            rows[name] = {"seconds": seconds, "epochs": recipe["epochs"],
                          **measure(reader, reader_spec, heldout, splits.val, config, unseen)}
            if "scale_test" not in how:
                document[name] = measure_document(reader, tmp / "document", DOCUMENT_DETECTIONS)
            if name in SCAN["variants"]:
                scan[name] = measure_document(reader, tmp / "scan", SCAN["detections"])
            print(f"  {name}: {seconds:.0f} s, held-out {rows[name]['heldout']}, document {document.get(name)}, "
                  f"scanned document {scan.get(name)}", flush=True)
        ranked = per_page(model, heldout, spec.detections_per_img, config.score_threshold)
        pages = [(kind, f1, page.name, outlines_drawn(model, page, config.score_threshold))
                 for kind, items in (("best", ranked[-2:][::-1]), ("worst", ranked[:2])) for f1, page in items]
        if not args.no_stock and args.recipe == "demo":
            stock, facts = train_stock(recipe, splits.train, seconds, tmp / "stock")
            rows["stock"] = {"seconds": facts["seconds"], "epochs": facts["epochs"],
                             **measure(stock, facts["spec"], heldout, splits.val, config, unseen)}
            print(f"  stock: {facts['seconds']:.0f} s, held-out {rows['stock']['heldout']}", flush=True)
        write_report(Path(args.out), args.recipe, recipe, generate_args, num_images, rows, pages, document, scan)


def read_as(checkpoint: Path, how: dict) -> tuple[torch.nn.Module, object]:
    """The checkpoint's model and spec for inference, read as HOW (a VARIANTS value) says."""
    model, spec, _ = load_model_for_inference(checkpoint, torch.device("cpu"), scale_test=how.get("scale_test"),
                                              fixed_scale=how.get("fixed_scale", False), outline=how.get("outline"))
    if "mask_box_margin" in how:
        model.roi_heads.mask_box_margin = how["mask_box_margin"]
    return model, spec


def measure_document(model: torch.nn.Module, out: Path, detections: int) -> dict:
    """The model's metrics on the document pages generated at OUT, read with a limit of DETECTIONS,
    with their characters."""
    pages = scan_dataset(out).samples
    with detection_limit(model, detections):
        metrics = evaluate(model, pages, torch.device("cpu"), max_dets=detections).metrics
    return {"characters": sum(len(page.polygons) for page in pages),
            **{k: round(metrics[k], 3) for k in ("bbox_AP50", "segm_AP50", "segm_AP75", "segm_AP", "char_f1")}}


def measure(model: torch.nn.Module, spec, heldout: list, own: list, config: TrainConfig, unseen: list) -> dict:
    """Held-out, own-generator and unseen-font metrics of a model."""
    out = {}
    for name, pages in (("heldout", heldout), ("own", own), ("unseen", unseen)):
        metrics = evaluate(model, pages, torch.device("cpu"), max_dets=spec.detections_per_img,
                           score_threshold=config.score_threshold).metrics
        out[name] = {k: round(metrics[k], 3) for k in ("bbox_AP50", "segm_AP50", "segm_AP75", "segm_AP", "char_f1")}
    return out


def metrics_table(first: str, rows: dict, columns: list[tuple[str, str, str]], trained: bool = True) -> list[str]:
    """A markdown table's lines: a row per NAME -> ROW of ROWS, NAME under the heading FIRST; when
    TRAINED, the row's training minutes and epochs; then a column per (heading, group, metric) of
    COLUMNS: ROW[group][metric]."""
    headings = [first, *(("training", "epochs") if trained else ()), *(heading for heading, _, _ in columns)]
    lines = ["| " + " | ".join(headings) + " |", "| " + " | ".join("---" for _ in headings) + " |"]
    for name, row in rows.items():
        cells = [name, *((f"{row['seconds'] / 60:.1f} min", str(row["epochs"])) if trained else ())]
        lines.append("| " + " | ".join(cells + [f"{row[group][metric]:.3f}" for _, group, metric in columns]) + " |")
    return lines


def write_report(out: Path, recipe_name: str, recipe: dict, generate_args: list[str], num_images: int | None,
                 rows: dict, pages: list, document: dict, scan: dict) -> None:
    images = out.parent / "quality"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob(f"{recipe_name}_*.png"):  # the pages shown last time
        stale.unlink()
    names = []
    for kind, f1, name, overlay in pages:
        path = images / f"{recipe_name}_{kind}_{name}.png"
        overlay.save(path)
        names.append(f"![{kind} held-out page {name}, char F1 {f1:.2f}](quality/{path.name})")
    lines = [
        f"# Quality on held-out pages: recipe `{recipe_name}`",
        "",
        f"Measured {date.today().isoformat()} by `python bench/quality.py --recipe {recipe_name}` on "
        f"{cpu_description()}, torch {torch.__version__}, charseg {__version__}, CPU only.",
        f"Training pages: `charseg generate {' '.join(generate_args)}`"
        + (f" with --num-images {num_images}" if num_images else "") + "; recipe: "
        + ", ".join(f"{k} {v}" for k, v in recipe.items()) + ".",
        f"Held-out pages: `charseg generate --held-out --num-images {HELDOUT_PAGES} --seed {HELDOUT_SEED}` "
        "(other fonts, lines of text, rotation up to 12 degrees, texture, blur, noise, annotator polygons).",
        "",
        *metrics_table("recipe", rows, [
            *((f"held-out {m}", "heldout", m) for m in ("segm_AP50", "segm_AP75", "segm_AP", "char_f1", "bbox_AP50")),
            ("own pages segm_AP50", "own", "segm_AP50"), ("own pages char_f1", "own", "char_f1")]),
    ]
    if "stock" in rows:
        ratio = rows["charseg"]["heldout"]["segm_AP50"] / max(rows["stock"]["heldout"]["segm_AP50"], 1e-3)
        lines += ["", f"charseg / stock, held-out segm_AP50 at equal time: {ratio:.1f}x"
                  + (" (stock's below 0.001 counted as 0.001)" if rows["stock"]["heldout"]["segm_AP50"] < 1e-3 else "")]
    lines += ["", f"Pages in fonts and on backgrounds no generator here uses: `charseg generate --held-out --unseen "
              f"--num-images {HELDOUT_PAGES} --seed {UNSEEN_SEED}` (nine font families from PyPI: sans, serif, rounded, "
              "handwriting-like; lines condensed, stencil-cut or worn, coloured inks; printed patterns and faded "
              "photographs; rotation up to 6 degrees, blur, noise, JPEG):", "",
              *metrics_table("recipe", rows, [(m, "unseen", m) for m in ("segm_AP50", "segm_AP75", "segm_AP",
                                                                         "char_f1", "bbox_AP50")], trained=False),
              "", "By font family and line style: [QUALITY_UNSEEN.md](QUALITY_UNSEEN.md) (`bench/unseen_breakdown.py "
              "MODEL`, MODEL this report's model, `--keep-model`)."]
    size, fonts = "x".join(map(str, DOCUMENT["size"])), "-".join(map(str, DOCUMENT["font_sizes"]))
    lines += ["", f"A document page: `charseg generate --held-out --num-images 1 --size {size} --font-size {fonts} "
              f"--seed {DOCUMENT['seed']}` ({document['charseg']['characters']} characters), the charseg model "
              f"with --detections-per-img {DOCUMENT_DETECTIONS}:", "",
              *metrics_table("recipe", {name: {"document": metrics} for name, metrics in document.items()},
                             [(m, "document", m) for m in ("segm_AP50", "segm_AP75", "segm_AP", "char_f1",
                                                           "bbox_AP50")], trained=False)]
    size, fonts = "x".join(map(str, DOCUMENT_SIZE)), "-".join(map(str, DOCUMENT_FONT_SIZES))
    lines += ["", f"Scanned document pages: `charseg generate --held-out --document --num-images {SCAN['pages']} "
              f"--seed {SCAN['seed']}` ({size} px, fonts of {fonts} px, {scan['charseg']['characters']} characters "
              "in paragraphs of full lines, dark ink on light paper, skewed up to 1.5 degrees, blur, noise), the "
              f"charseg model with --detections-per-img {SCAN['detections']}:", "",
              *metrics_table("recipe", {name: {"scan": metrics} for name, metrics in scan.items()},
                             [(m, "scan", m) for m in ("segm_AP50", "segm_AP75", "segm_AP", "char_f1", "bbox_AP50")],
                             trained=False)]
    lines += ["", f"Best and worst held-out pages of the charseg model (char F1 per page), at {OVERLAY_ZOOM}x: "
              "annotations in green, the model's outlines (score >= 0.5) in red:", "", *names, ""]
    out.write_text("\n".join(lines))
    print("\n".join(lines[:12 + len(rows)]))


if __name__ == "__main__":
    main()
