"""COCO instances JSON in and out: what CVAT, Label Studio, Roboflow, FiftyOne and
pycocotools speak.

- `import_coco`: a COCO instances file and its images into charseg's layout (images/,
  annotations/*.csv). A one-ring polygon is copied point for point; several rings, RLE
  (iscrowd or not) are rasterised with pycocotools and traced as predict traces masks.
  Whatever cannot be converted is reported with its annotation ID, never dropped silently.
- `export_coco`: a charseg dataset as COCO instances JSON (one category per character).
- `predictions_to_coco`: predict's instances as COCO JSON with scores.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .data import IMAGE_SUFFIXES, ImageUnusable, open_image, scan_dataset, upright_size, write_annotation
from .errors import DatasetError
from .polygons import edge_outlines, flat_polygon, polygon_area

CHAR_FROM_HELP = "category (its name), attribute:KEY (the annotation's attributes[KEY], as CVAT exports) or none ('?')"
SEGMENTATIONS = ("polygon", "rle")


@dataclass
class ImportReport:
    """What `import_coco` wrote and what it could not convert."""

    out_dir: Path
    images: int = 0
    characters: int = 0
    traced: int = 0  # several rings or RLE, rasterised and traced
    problems: list[str] = field(default_factory=list)  # "annotation 17 (image 3): reason"

    def lines(self) -> list[str]:
        return [f"imported {self.images} images and {self.characters} characters into {self.out_dir} "
                f"({self.traced} traced from RLE or several rings); {len(self.problems)} problems"] + self.problems


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: not a JSON file ({exc}); pass a COCO instances export") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or \
            not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{path}: not COCO instances JSON (needs 'images' and 'annotations' lists); "
                           "export 'COCO 1.0' / 'COCO instances' from the labelling tool")
    return data


def char_reader(char_from: str, categories: dict[int, str]):
    """A function annotation -> (char, problem or "") for --char-from."""
    if char_from == "category":
        return lambda ann: ((categories[ann["category_id"]], "") if ann.get("category_id") in categories
                            else ("?", f"category_id {ann.get('category_id')} is not in 'categories'; char '?'"))
    if char_from == "none":
        return lambda ann: ("?", "")
    if char_from.startswith("attribute:") and len(char_from) > len("attribute:"):
        key = char_from.split(":", 1)[1]

        def from_attribute(ann):
            value = (ann.get("attributes") or {}).get(key)
            return (str(value), "") if value not in (None, "") else ("?", f"no attribute {key!r}; char '?'")
        return from_attribute
    raise DatasetError(f"--char-from {char_from!r}: use {CHAR_FROM_HELP}")


def segmentation_to_polygon(segmentation: Any, height: int, width: int) -> tuple[list[float] | None, str, bool]:
    """One COCO segmentation as one charseg polygon: (flat points or None, problem, traced).

    One ring of 3+ points is kept as it is; several rings and RLE (compressed or not) are
    rasterised and the largest connected part traced; a problem says what was dropped."""
    if not segmentation:
        return None, "no segmentation (a box only): charseg trains on outlines", False
    if isinstance(segmentation, list):
        rings = [r for r in segmentation if isinstance(r, list) and len(r) >= 6 and len(r) % 2 == 0]
        if len(rings) < len(segmentation):
            bad = len(segmentation) - len(rings)
            if not rings:
                return None, "no ring with 3 or more x,y points", False
            note = f"{bad} ring(s) without 3 x,y points ignored"
        else:
            note = ""
        if len(rings) == 1:
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) for v in rings[0]):
                return None, "polygon holds a non-number", False
            return [float(v) for v in rings[0]], note, False
        rle = mask_utils.merge(mask_utils.frPyObjects(rings, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        if list(segmentation["size"]) != [height, width]:
            return None, f"RLE size {segmentation['size']} is not the image's [{height}, {width}]", False
        rle = (mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation["counts"], list)
               else segmentation)
        note = ""
    else:
        return None, f"segmentation is neither polygons nor RLE ({json.dumps(segmentation)[:60]})", False
    mask = mask_utils.decode(rle).astype(bool)
    outlines = edge_outlines(mask)
    if not outlines:
        return None, "empty mask", True
    if len(outlines) > 1:
        kept = polygon_area(outlines[0]) / max(sum(polygon_area(o) for o in outlines), 1e-9)
        note = "; ".join(filter(None, [note, f"{len(outlines)} separate parts; kept the largest "
                                             f"({kept:.0%} of the area)"]))
    return flat_polygon(outlines[0]), note, True


def import_coco(coco_json: str | Path, images_dir: str | Path, out_dir: str | Path, *,
                char_from: str = "category") -> ImportReport:
    """Write the COCO file's images and annotations as a charseg dataset in OUT_DIR (which
    must not hold one yet). Images are copied byte for byte (other formats become PNG)."""
    data = _load_json(Path(coco_json))
    images_dir, out = Path(images_dir), Path(out_dir)
    if (out / "images").exists() or (out / "annotations").exists():
        raise DatasetError(f"{out}: already holds a dataset; import into a new folder")
    categories = {c["id"]: str(c.get("name", c["id"])) for c in data.get("categories", []) if "id" in c}
    read_char = char_reader(char_from, categories)
    by_image: dict[Any, list[dict]] = {}
    report = ImportReport(out_dir=out)
    for ann in data["annotations"]:
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    known = {im.get("id") for im in data["images"]}
    for image_id in sorted(set(by_image) - known, key=str):
        report.problems.append(f"image_id {image_id}: {len(by_image[image_id])} annotation(s) of an image that is "
                               "not in 'images'")
    used_names: set[str] = set()
    for image in data["images"]:
        image_id, file_name = image.get("id"), str(image.get("file_name", ""))
        source = images_dir / file_name
        try:
            with open_image(source) as img:
                width, height = upright_size(img)
        except ImageUnusable as exc:
            count = len(by_image.get(image_id, []))
            report.problems.append(f"image {image_id} ({source}): {exc.reason}; its {count} annotation(s) not "
                                   "imported")
            continue
        if (image.get("width"), image.get("height")) not in ((width, height), (None, None)):
            report.problems.append(f"image {image_id} ({file_name}): JSON says {image.get('width')}x"
                                   f"{image.get('height')}, the file is {width}x{height}; the file's size is used")
        name = Path(file_name).stem
        if name in used_names:
            name = f"{name}_{image_id}"
        used_names.add(name)
        rows = []
        for ann in by_image.get(image_id, []):
            polygon, problem, traced = segmentation_to_polygon(ann.get("segmentation"), height, width)
            char, char_problem = read_char(ann)
            where = f"annotation {ann.get('id')} (image {image_id})"
            for text in filter(None, (problem, char_problem)):
                report.problems.append(f"{where}: {text}" + ("" if polygon else "; not imported"))
            if polygon:
                rows.append((char, json.dumps(polygon)))
                report.traced += traced
        _copy_image(source, out / "images", name)
        write_annotation(out / "annotations" / f"{name}.csv", rows)
        report.images += 1
        report.characters += len(rows)
    return report


def _copy_image(source: Path, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if source.suffix.lower() in IMAGE_SUFFIXES:
        shutil.copyfile(source, folder / f"{name}{source.suffix.lower()}")
    else:
        with Image.open(source) as img:
            img.save(folder / f"{name}.png")


def _annotation(ann_id: int, image_id: int, category_id: int, points: list[float], height: int, width: int,
                segmentation: str) -> dict:
    xy = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    ann = {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
           "area": float(polygon_area(xy)), "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)]}
    if segmentation == "rle":
        rle = mask_utils.merge(mask_utils.frPyObjects([list(map(float, points))], height, width))
        ann["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        ann["area"] = float(mask_utils.area(rle))
    else:
        ann["segmentation"] = [[round(float(v), 3) for v in points]]
    return ann


def export_coco(data_dir: str | Path, out_json: str | Path) -> tuple[dict[str, int], list[str]]:
    """Write DATA_DIR's usable images and polygons as COCO instances JSON (one category per
    distinct character, file_name relative to DATA_DIR/images). Returns (counts, the scan's
    problem lines: what was not exported and why)."""
    report = scan_dataset(data_dir)
    chars = sorted({c for s in report.samples for c in s.chars})
    category_ids = {c: i + 1 for i, c in enumerate(chars)}
    images, annotations = [], []
    for image_id, sample in enumerate(report.samples, start=1):
        images.append({"id": image_id, "file_name": sample.image_path.name, "width": sample.width,
                       "height": sample.height})
        for points, char in zip(sample.polygons, sample.chars):
            annotations.append(_annotation(len(annotations) + 1, image_id, category_ids[char],
                                           points.reshape(-1).tolist(), sample.height, sample.width, "polygon"))
    coco = {"info": {"description": f"charseg dataset {data_dir}"}, "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": c, "supercategory": "character"} for c, i in category_ids.items()]}
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(coco), encoding="utf-8")
    return {"images": len(images), "annotations": len(annotations), "categories": len(chars)}, report.problem_lines()


def predictions_to_coco(pages: Iterable[tuple[str, int, int, list]], segmentation: str = "polygon") -> dict:
    """COCO instances JSON of predictions: PAGES is (file name, width, height, instances with
    score, box, polygon); each annotation carries its `score` (pycocotools' loadRes reads the
    annotations list as results). One category, 'character'."""
    if segmentation not in SEGMENTATIONS:
        raise DatasetError(f"COCO segmentation {segmentation!r}: use one of {', '.join(SEGMENTATIONS)}")
    images, annotations = [], []
    for image_id, (file_name, width, height, instances) in enumerate(pages, start=1):
        images.append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for inst in instances:
            ann = _annotation(len(annotations) + 1, image_id, 1, inst.polygon, height, width, segmentation)
            ann["score"] = round(float(inst.score), 4)
            annotations.append(ann)
    return {"images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "character", "supercategory": "character"}]}

