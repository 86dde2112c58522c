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

from ..errors import DatasetError
from ..polygons import edge_outlines, flat_polygon, polygon_area
from .dataset import coordinate_problem, scan_dataset, write_annotation
from .images import IMAGE_SUFFIXES, ImageUnusable, open_image, upright_size

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
    empty_images: list[str] = field(default_factory=list)  # written with no polygon: training skips them

    def lines(self) -> list[str]:
        lines = [f"imported {self.images} images and {self.characters} characters into {self.out_dir} "
                 f"({self.traced} traced from RLE or several rings); {len(self.problems)} problems"] + self.problems
        if self.empty_images:
            shown = ", ".join(self.empty_images[:5]) + (", ..." if len(self.empty_images) > 5 else "")
            lines.append(f"warning: {len(self.empty_images)} of {self.images} images have no character imported "
                         f"({shown}); training skips them")
        return lines


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


def rle_counts(counts: Any, height: int, width: int) -> list[int]:
    """The run lengths of a COCO RLE, checked: pycocotools decodes counts that do not cover the
    mask from memory it never wrote (garbage masks), and raises on others. `counts` is a list of
    ints or COCO's compressed string (pycocotools' rleFrString, read here so it can be
    checked). Raises ValueError saying what is wrong."""
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
            raise ValueError("RLE counts hold something other than non-negative integers")
        runs = counts
    elif isinstance(counts, (str, bytes)):
        text = counts.decode("ascii", "replace") if isinstance(counts, bytes) else counts
        runs, p = [], 0
        while p < len(text):
            x, k, more = 0, 0, True
            while more:
                if p >= len(text) or not 48 <= ord(text[p]) < 112:
                    raise ValueError(f"compressed RLE counts are not COCO's encoding (at character {p + 1})")
                c = ord(text[p]) - 48
                x |= (c & 0x1F) << (5 * k)
                more, p, k = bool(c & 0x20), p + 1, k + 1
                if not more and c & 0x10:
                    x |= -1 << (5 * k)
            runs.append(x + runs[-2] if len(runs) > 2 else x)
            if runs[-1] < 0:
                raise ValueError("compressed RLE counts decode to a negative run")
    else:
        raise ValueError(f"RLE counts are {type(counts).__name__}, not a list or a string")
    if sum(runs) != height * width:
        raise ValueError(f"RLE counts cover {sum(runs)} pixels, the image {height}x{width} has {height * width}")
    return runs


def _rle_mask(segmentation: dict, height: int, width: int) -> np.ndarray:
    """A checked RLE as a bool mask (COCO runs go down columns, from background)."""
    if list(segmentation["size"]) != [height, width]:
        raise ValueError(f"RLE size {segmentation['size']} is not the image's [{height}, {width}]")
    runs = rle_counts(segmentation["counts"], height, width)
    values = np.arange(len(runs)) % 2 == 1
    return np.repeat(values, runs).reshape(width, height).T


def segmentation_to_polygon(segmentation: Any, height: int, width: int) -> tuple[list[float] | None, str, bool]:
    """One COCO segmentation as one charseg polygon: (flat points or None, problem, traced).

    One ring of 3+ points is kept as it is; several rings and RLE (compressed or not) are
    rasterised and the largest connected part traced; a problem says what was dropped or why
    nothing could be read."""
    if not segmentation:
        return None, "no segmentation (a box only): charseg trains on outlines", False
    note = ""
    if isinstance(segmentation, list):
        rings = [r for r in segmentation if isinstance(r, list) and len(r) >= 6 and len(r) % 2 == 0]
        if not rings:
            return None, "no ring with 3 or more x,y points", False
        if len(rings) < len(segmentation):
            note = f"{len(segmentation) - len(rings)} ring(s) without 3 x,y points ignored"
        problem = next(filter(None, map(coordinate_problem, rings)), "")
        if problem:
            return None, problem, False
        if len(rings) == 1:
            return [float(v) for v in rings[0]], note, False
        mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(
            [[float(v) for v in ring] for ring in rings], height, width))).astype(bool)
    elif isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        try:
            mask = _rle_mask(segmentation, height, width)
        except (ValueError, TypeError) as exc:
            return None, f"unreadable RLE ({exc})", False
    else:
        return None, f"segmentation is neither polygons nor RLE ({json.dumps(segmentation)[:60]})", False
    outlines = edge_outlines(mask)
    if not outlines:
        return None, "empty mask", True
    if len(outlines) > 1:
        kept = polygon_area(outlines[0]) / max(sum(polygon_area(o) for o in outlines), 1e-9)
        note = "; ".join(filter(None, [note, f"{len(outlines)} separate parts; kept the largest "
                                             f"({kept:.0%} of the area)"]))
    return flat_polygon(outlines[0]), note, True


def _entries(data: dict, key: str, report: ImportReport) -> list[dict]:
    """data[key]'s objects; anything else in the list is reported by its position."""
    entries = []
    for position, entry in enumerate(data.get(key) or [], start=1):
        if isinstance(entry, dict):
            entries.append(entry)
        else:
            report.problems.append(f"{key}[{position}]: {json.dumps(entry)[:40]} is not a JSON object; not imported")
    return entries


def import_coco(coco_json: str | Path, images_dir: str | Path, out_dir: str | Path, *,
                char_from: str = "category") -> ImportReport:
    """Write the COCO file's images and annotations as a charseg dataset in OUT_DIR (which
    must not hold one yet). Images are copied byte for byte (other formats become PNG).
    Raises DatasetError when the file has no annotations (nothing would train)."""
    data = _load_json(Path(coco_json))
    images_dir, out = Path(images_dir), Path(out_dir)
    if (out / "images").exists() or (out / "annotations").exists():
        raise DatasetError(f"{out}: already holds a dataset; import into a new folder")
    if not data["annotations"]:
        raise DatasetError(f"{coco_json}: {len(data['images'])} images but no annotations, so nothing to train on; "
                           "export the annotations from the labelling tool too (COCO instances, not image info)")
    report = ImportReport(out_dir=out)
    categories = {c["id"]: str(c.get("name", c["id"])) for c in _entries(data, "categories", report) if "id" in c}
    read_char = char_reader(char_from, categories)
    by_image: dict[Any, list[dict]] = {}
    for ann in _entries(data, "annotations", report):
        by_image.setdefault(ann.get("image_id"), []).append(ann)
    images = _entries(data, "images", report)
    for image_id in sorted(set(by_image) - {im.get("id") for im in images}, key=str):
        report.problems.append(f"image_id {image_id}: {len(by_image[image_id])} annotation(s) of an image that is "
                               "not in 'images'")
    used_names: set[str] = set()
    from tqdm import tqdm  # a bar on a terminal only

    for image in tqdm(images, desc="importing", unit="image", disable=None, leave=False):
        _import_image(image, by_image.get(image.get("id"), []), images_dir, out, used_names, read_char, report)
    return report


def _import_image(image: dict, anns: list[dict], images_dir: Path, out: Path, used_names: set[str], read_char,
                  report: ImportReport) -> None:
    """Copy one COCO image into OUT and write its annotations' polygons as its CSV."""
    image_id, file_name = image.get("id"), str(image.get("file_name", ""))
    source = images_dir / file_name
    try:
        with open_image(source) as img:
            width, height = upright_size(img)
    except ImageUnusable as exc:
        report.problems.append(f"image {image_id} ({source}): {exc.reason}; its {len(anns)} annotation(s) not "
                               "imported")
        return
    if (image.get("width"), image.get("height")) not in ((width, height), (None, None)):
        report.problems.append(f"image {image_id} ({file_name}): JSON says {image.get('width')}x"
                               f"{image.get('height')}, the file is {width}x{height}; the file's size is used")
    name = Path(file_name).stem
    if name in used_names:
        name = f"{name}_{image_id}"
    used_names.add(name)
    rows = []
    for ann in anns:
        polygon, problem, traced = segmentation_to_polygon(ann.get("segmentation"), height, width)
        char, char_problem = read_char(ann)
        for text in filter(None, (problem, char_problem)):
            report.problems.append(f"annotation {ann.get('id')} (image {image_id}): {text}"
                                   + ("" if polygon else "; not imported"))
        if polygon:
            rows.append((char, json.dumps(polygon)))
            report.traced += traced
    if not rows:
        report.empty_images.append(name)
    _copy_image(source, out / "images", name)
    write_annotation(out / "annotations" / f"{name}.csv", rows)
    report.images += 1
    report.characters += len(rows)


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
    if not report.samples:
        raise DatasetError(f"{data_dir}: no usable image ({report.images_found} found), nothing to export; run "
                           f"`charseg validate-data {data_dir}` for the reasons")
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

