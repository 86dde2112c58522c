"""Scan a dataset folder: pair images with CSVs, read and validate every polygon, report.

Dataset layout::

    DATA_DIR/images/00001.png          (.png, .jpg or .jpeg; any mode)
    DATA_DIR/annotations/00001.csv     header ``char,polygon_json``

Every problem is recorded as a :class:`Problem` with file, line and reason; nothing
is dropped silently and no input file is ever modified.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import sys
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DatasetError, reason
from ..polygons import clip_polygon_to_image, first_crossing, first_crossings, polygon_area
from .images import IMAGE_SUFFIXES, OTHER_IMAGE_SUFFIXES, ImageUnusable, open_image, upright_size

CSV_HEADER = ["char", "polygon_json"]
UNKNOWN_CHAR = "?"  # a polygon whose character is not known (predict's output, an empty char cell)
# Polygons with less area than this (in pixels^2, after clipping) cannot be rasterised.
MIN_POLYGON_AREA = 1e-6
# Polygon coordinates beyond this many pixels are refused (float overflow while clipping).
MAX_COORDINATE = 1e6
# A CSV line may hold a polygon of about a million points.
MAX_CSV_FIELD = 64 * 1024 * 1024
MAX_PROBLEMS_SHOWN = 20  # problems a training prints; `charseg validate-data` lists them all

log = logging.getLogger("charseg")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where, and why."""

    path: str
    line: int | None  # 1-based CSV line (the header is line 1); None for whole files
    reason: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.reason}"


@dataclass
class Sample:
    """One usable image and its valid (clipped) polygons."""

    name: str
    image_path: Path
    annotation_path: Path
    width: int
    height: int
    polygons: list[np.ndarray]  # each (K, 2) float32, inside the image
    chars: list[str]


# Kinds of problem whose polygon still trains (DatasetReport.problems).
USED_KINDS = ("clipped polygon", "self-crossing polygon", "polygon without a character")


@dataclass
class DatasetReport:
    """What a scan of DATA_DIR found: usable samples and every problem met."""

    data_dir: Path
    samples: list[Sample] = field(default_factory=list)
    skipped_polygons: list[Problem] = field(default_factory=list)
    clipped_polygons: list[Problem] = field(default_factory=list)
    crossing_polygons: list[Problem] = field(default_factory=list)  # used as drawn, reported
    unnamed_chars: list[Problem] = field(default_factory=list)  # empty or control-character char: used as '?'
    skipped_images: list[Problem] = field(default_factory=list)
    orphan_annotations: list[Problem] = field(default_factory=list)
    unused_files: list[Problem] = field(default_factory=list)  # subfolders, broken links, other files
    images_found: int = 0

    @property
    def num_instances(self) -> int:
        return sum(len(s.polygons) for s in self.samples)

    def summary(self) -> dict[str, int]:
        """Counts, as logged with a run."""
        return {
            "images_found": self.images_found,
            "images_used": len(self.samples),
            "images_skipped": len(self.skipped_images),
            "instances": self.num_instances,
            "polygons_skipped": len(self.skipped_polygons),
            "polygons_clipped": len(self.clipped_polygons),
            "polygons_self_crossing": len(self.crossing_polygons),
            "polygons_without_char": len(self.unnamed_chars),
            "annotations_without_image": len(self.orphan_annotations),
            "files_not_used": len(self.unused_files),
        }

    def problems(self) -> list[tuple[str, Problem]]:
        """Every problem with its kind, in a stable order."""
        kinds = (("skipped image", self.skipped_images), ("skipped polygon", self.skipped_polygons),
                 ("clipped polygon", self.clipped_polygons), ("self-crossing polygon", self.crossing_polygons),
                 ("polygon without a character", self.unnamed_chars),
                 ("annotation without image", self.orphan_annotations),
                 ("file not used", self.unused_files))
        return [(kind, p) for kind, items in kinds for p in items]

    def problem_lines(self, limit: int | None = None, brief: bool = False) -> list[str]:
        """One line per problem ("kind: file:line: reason"); past `limit` (None: no limit), a
        last line saying how many more there are and where to see them. brief: polygons that
        are used all the same (clipped, self-crossing) are one count line per kind."""
        problems = self.problems()
        lines = []
        if brief:
            for kind in USED_KINDS:
                count = sum(1 for k, _ in problems if k == kind)
                if count:
                    lines.append(f"{count} {kind}{'s' if count != 1 else ''}, used all the same: run `charseg validate-data {self.data_dir}` "
                                 "to list them")
            problems = [(k, p) for k, p in problems if k not in USED_KINDS]
        shown = problems if limit is None else problems[:limit]
        lines = [f"{kind}: {problem}" for kind, problem in shown] + lines
        if len(shown) < len(problems):
            lines.append(f"... and {len(problems) - len(shown)} more problems: run `charseg validate-data "
                         f"{self.data_dir}` for the full list")
        return lines

    def format(self) -> str:
        """Human-readable report: the counts, then every problem."""
        s = self.summary()
        lines = [
            f"dataset {self.data_dir}",
            f"  images found:             {s['images_found']}",
            f"  images usable:            {s['images_used']}",
            f"  character instances:      {s['instances']}",
            f"  images skipped:           {s['images_skipped']}",
            f"  polygons skipped:         {s['polygons_skipped']}",
            f"  polygons clipped:         {s['polygons_clipped']}",
            f"  polygons crossing itself: {s['polygons_self_crossing']} (used as drawn)",
            f"  polygons without a char:  {s['polygons_without_char']} (used as '{UNKNOWN_CHAR}')",
            f"  annotations without image: {s['annotations_without_image']}",
            f"  files not used:           {s['files_not_used']}",
        ]
        return "\n".join(lines + self.problem_lines())


def parse_polygon(text: str, width: int, height: int) -> tuple[np.ndarray | None, str]:
    """Parse one `polygon_json` cell and fit it to a width x height image.

    Returns (points, note): points is (K, 2) float32 inside the image, or None when the
    polygon must be skipped; note is the skip reason, "clipped ..." when it was clipped, or "".
    """
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        return None, f"polygon_json is not valid JSON ({exc.msg})"
    except ValueError:  # Python refuses to read an int of more than sys.get_int_max_str_digits() digits
        return None, (f"polygon_json holds a number of more than {sys.get_int_max_str_digits()} digits; "
                      "write coordinates in pixels")
    if not isinstance(values, list):
        return None, f"polygon_json must be a flat JSON list [x1,y1,x2,y2,...], got {type(values).__name__}"
    problem = coordinate_problem(values)
    if problem:
        return None, problem
    if len(values) % 2:
        return None, f"polygon has an odd number of values ({len(values)}); expected x,y pairs"
    if len(values) < 6:
        return None, f"polygon has {len(values) // 2} points; at least 3 are needed"
    points = np.asarray(values, dtype=np.float64).reshape(-1, 2)
    if polygon_area(points) <= MIN_POLYGON_AREA:
        crossing = first_crossing(points)
        if crossing is not None:  # a bow-tie: its two loops cancel in the shoelace sum
            return None, (f"polygon crosses itself ({_edges(crossing)}) and so encloses no area by the shoelace "
                          "formula; draw the outline without crossing")
        return None, "polygon has zero area"
    clipped = clip_polygon_to_image(points, width, height)
    if len(clipped) < 3 or polygon_area(clipped) <= MIN_POLYGON_AREA:
        return None, f"polygon lies wholly outside the {width}x{height} image"
    outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
    note = f"clipped to the {width}x{height} image ({int(outside.sum())} points outside)" if outside.any() else ""
    return clipped.astype(np.float32), note


def coordinate_problem(values: list) -> str:
    """Why a polygon's flat list of values cannot be coordinates ("" when every one can): a
    non-number, a non-finite number, or a coordinate past MAX_COORDINATE."""
    if set(map(type, values)) <= {int, float}:  # the common case, checked at C speed (bool is its own type)
        try:
            numbers = np.asarray(values, dtype=np.float64)
        except OverflowError:  # an int past float range: the loop below names it
            pass
        else:
            if np.isfinite(numbers).all() and (np.abs(numbers) <= MAX_COORDINATE).all():
                return ""
    for v in values:
        # bool is an int subclass in Python; JSON true/false are not coordinates.
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"polygon holds a non-number {json.dumps(v)[:40]}"
        if isinstance(v, float) and not math.isfinite(v):  # an int is finite, however long
            return f"polygon holds a non-finite number ({v})"
        if abs(v) > MAX_COORDINATE:
            # {:g} of an int past float range overflows: its digits are counted instead
            shown = f"{v:g} px" if isinstance(v, float) or abs(v) < 1e300 else f"{len(str(abs(v)))} digits"
            return f"polygon holds a coordinate of {shown} (beyond +-{MAX_COORDINATE:g}); check its units"
    return ""


def _edges(crossing: tuple[int, int]) -> str:
    i, j = crossing
    return f"its edges from point {i + 1} and from point {j + 1} intersect"


def _char(cell: str, where: Problem, report: DatasetReport) -> str:
    """A CSV char cell as used: an empty one, or one holding a control character (NUL, a tab,
    a line break), becomes UNKNOWN_CHAR and is reported; COCO export would make a category of it."""
    control = next((c for c in cell if unicodedata.category(c) == "Cc"), None)
    if cell and control is None:
        return cell
    what = "empty char cell" if not cell else f"char cell {cell!r} holds the control character U+{ord(control):04X}"
    report.unnamed_chars.append(dataclasses.replace(where, reason=(
        f"{what}; the polygon is used with char '{UNKNOWN_CHAR}': write the character it outlines")))
    return UNKNOWN_CHAR


def _read_annotation(csv_path: Path, width: int, height: int, report: DatasetReport
                     ) -> tuple[list[np.ndarray], list[str]] | None:
    """Read one CSV; record each problem in `report`. None when the whole file is unusable."""
    polygons: list[np.ndarray] = []
    chars: list[str] = []
    lines: list[int] = []
    try:
        raw = csv_path.read_bytes()
    except OSError as exc:
        report.skipped_images.append(Problem(str(csv_path), None, f"cannot read annotation file ({exc.strerror})"))
        return None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        report.skipped_images.append(Problem(str(csv_path), line, f"not UTF-8 text ({exc.reason} at byte "
                                                                  f"{exc.start}); save the file as UTF-8"))
        return None
    csv.field_size_limit(MAX_CSV_FIELD)
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        # Extra columns after the two (e.g. predict's score) are allowed and ignored.
        if header is None or [h.strip() for h in header[:2]] != CSV_HEADER:
            report.skipped_images.append(Problem(
                str(csv_path), 1, f"header is {','.join(header or []) or 'missing'}; "
                                  f"expected {','.join(CSV_HEADER)}"))
            return None
        for row in reader:
            line = reader.line_num
            if not row or all(not cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                report.skipped_polygons.append(Problem(
                    str(csv_path), line, f"row has {len(row)} fields; expected {len(header)} "
                                         f"({','.join(header)}) - quote a char that contains a comma"))
                continue
            points, note = parse_polygon(row[1], width, height)
            if points is None:
                report.skipped_polygons.append(Problem(str(csv_path), line, note))
                continue
            if note:
                report.clipped_polygons.append(Problem(str(csv_path), line, note))
            polygons.append(points)
            lines.append(line)
            chars.append(_char(row[0], Problem(str(csv_path), line, ""), report))
    except csv.Error as exc:
        report.skipped_images.append(Problem(str(csv_path), reader.line_num, f"malformed CSV ({exc})"))
        return None
    for line, crossing in zip(lines, first_crossings(polygons)):  # one pass for the file's outlines
        if crossing is not None:
            report.crossing_polygons.append(Problem(str(csv_path), line, (
                f"polygon crosses itself ({_edges(crossing)}); used as drawn: the mask is what it encloses")))
    return polygons, chars


def scan_dataset(data_dir: str | Path) -> DatasetReport:
    """Index DATA_DIR: pair images with CSVs, parse and validate every polygon.

    Raises DatasetError when DATA_DIR or its images/ folder does not exist.
    """
    root = Path(data_dir)
    images_dir, ann_dir = root / "images", root / "annotations"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder does not exist; pass a folder holding images/ and annotations/")
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: folder missing; a dataset holds images/*.png and annotations/*.csv")
    report = DatasetReport(data_dir=root)
    images = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    report.images_found = len(images)
    report.unused_files = _unused_entries(images_dir, set(images), "images/NAME.png (.jpg, .jpeg)")
    stems = {p.stem for p in images}
    if ann_dir.is_dir():
        csvs = sorted(p for p in ann_dir.glob("*.csv") if p.is_file())
        report.unused_files += _unused_entries(ann_dir, set(csvs), "annotations/NAME.csv")
        for csv_path in csvs:
            if csv_path.stem not in stems:
                report.orphan_annotations.append(Problem(str(csv_path), None, "no image with this name in images/"))
    shared = _shared_names(images, ann_dir, report)
    from tqdm import tqdm  # a bar on a terminal only: a dataset of thousands of pages takes minutes

    for image_path in tqdm(images, desc="reading the dataset", unit="image", disable=None, leave=False):
        csv_path = ann_dir / f"{image_path.stem}.csv"
        if image_path.stem in shared:
            continue
        if not csv_path.is_file():
            report.skipped_images.append(Problem(str(image_path), None, f"no annotation file {csv_path}"))
            continue
        try:
            with open_image(image_path) as img:
                img.verify()  # a PNG cut short fails its chunk checks here, not mid-epoch
            with Image.open(image_path) as img:  # verify() leaves an image unusable: open it again
                width, height = upright_size(img)
        except ImageUnusable as exc:
            report.skipped_images.append(Problem(str(image_path), None, exc.reason))
            continue
        except Exception as exc:  # verify() raises OSError, SyntaxError, struct.error, ...
            report.skipped_images.append(Problem(str(image_path), None, (
                f"image file is damaged or cut short ({reason(exc)}); re-export it")))
            continue
        parsed = _read_annotation(csv_path, width, height, report)
        if parsed is None:
            continue
        polygons, chars = parsed
        if not polygons:
            report.skipped_images.append(Problem(str(image_path), None, "no valid polygon; skipped from training"))
            continue
        report.samples.append(Sample(image_path.stem, image_path, csv_path, width, height, polygons, chars))
    return report


def _shared_names(images: list[Path], ann_dir: Path, report: DatasetReport) -> set[str]:
    """Names that more than one image has (00001.png and 00001.jpg): one annotation file cannot
    belong to both, so each of them is skipped and named. Returns those names."""
    by_name: dict[str, list[Path]] = {}
    for path in images:
        by_name.setdefault(path.stem, []).append(path)
    shared = {name: paths for name, paths in by_name.items() if len(paths) > 1}
    for name, paths in shared.items():
        names = " and ".join(p.name for p in paths)
        for path in paths:
            report.skipped_images.append(Problem(str(path), None, (
                f"{names} would share {ann_dir / (name + '.csv')}; keep one image per name (rename or remove "
                "the other)")))
    return set(shared)


def files_digest(paths: list[Path]) -> str:
    """A fingerprint of files' names and contents (sha256, 16 hex digits), in the given
    order: the same files give the same digest on any machine; a renamed, added or edited
    file changes it."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def samples_digest(samples: list[Sample]) -> str:
    """files_digest of the samples' images and annotation CSVs, in name order."""
    return files_digest([p for s in sorted(samples, key=lambda s: s.name) for p in (s.image_path, s.annotation_path)])


def write_annotation(path: Path, rows: list[tuple], extra_columns: tuple[str, ...] = ()) -> None:
    """Write one annotation CSV: the header (CSV_HEADER and `extra_columns`), then ROWS
    (char, polygon JSON, extras), quoted as the csv module does (a char may be a comma)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow([*CSV_HEADER, *extra_columns])
        writer.writerows(rows)


def _unused_entries(folder: Path, used: set[Path], layout: str) -> list[Problem]:
    """What FOLDER holds besides the files used: subfolders (not searched), broken links,
    files of other types. Hidden files (.DS_Store) are passed over."""
    problems = []
    for entry in sorted(folder.iterdir()):
        if entry in used or entry.name.startswith("."):
            continue
        if entry.is_symlink() and not entry.exists():
            reason = f"broken symbolic link (to {os.readlink(entry)})"
        elif entry.is_dir():
            count = sum(1 for p in entry.rglob("*") if p.is_file())
            reason = f"subfolder not searched ({count} files inside); charseg reads {layout} directly"
        else:
            reason = f"not used: charseg reads {layout}" + (
                f"; convert {entry.suffix} images to PNG" if entry.suffix.lower() in OTHER_IMAGE_SUFFIXES else "")
        problems.append(Problem(str(entry), None, reason))
    return problems


def load_dataset_report(data_dir: str) -> DatasetReport:
    """Scan the dataset, print its summary and problems; error when nothing is usable."""
    report = scan_dataset(data_dir)
    for line in report.problem_lines(MAX_PROBLEMS_SHOWN, brief=True):
        log.warning("warning: %s", line)
    s = report.summary()
    log.info("dataset %s: %d images, %d characters (%d images and %d polygons skipped)", data_dir,
             s["images_used"], s["instances"], s["images_skipped"], s["polygons_skipped"])
    if not report.samples:
        raise DatasetError(f"{data_dir}: no usable image (found {report.images_found}); "
                           f"run `charseg validate-data {data_dir}` to see why")
    return report
