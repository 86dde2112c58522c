"""Training pages (scatter, lines) and held-out pages: valid datasets, made differently."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw

from charseg.cli import cli
from charseg.data.dataset import scan_dataset
from charseg.data.generate import TRAINING_FONTS, Glyph, generate_dataset, glyph_polygon, load_font, rotate_page
from charseg.data.heldout import HELDOUT_FONTS, generate_heldout
from charseg.polygons import polygons_to_masks, warp_points
from charseg.errors import CharsegError


def test_lines_layout_sets_text_in_lines_and_is_fully_valid(tmp_path):
    summary = generate_dataset(tmp_path, num_images=3, width=160, height=160, chars_per_image=(20, 60),
                               font_size=(12, 24), layout="lines", seed=0)
    report = scan_dataset(tmp_path)
    assert report.summary()["polygons_skipped"] == 0 and report.summary()["images_skipped"] == 0
    assert summary.characters == report.num_instances >= 3 * 15
    for sample in report.samples:
        tops = sorted(float(p[:, 1].min()) for p in sample.polygons)
        assert len({round(t / 8) for t in tops}) < len(tops)  # characters share lines


def test_lines_tracking_sets_glyphs_touching_each_keeping_its_own_outline(tmp_path):
    """`--tracking MIN MAX`: glyphs closer than their advance overlap their neighbours' boxes, each
    still outlined on its own ink; without it the pages are as before; bad ranges are refused."""
    from charseg.polygons import polygon_boxes

    def overlapping_neighbours(folder):  # the share of glyphs whose box the next one on its line enters
        count = total = 0
        for sample in scan_dataset(folder).samples:
            boxes = polygon_boxes(sample.polygons)
            total += len(boxes)
            for a, b in zip(boxes[:-1], boxes[1:]):  # drawn in reading order: the next glyph on a line
                count += abs(a[3] - b[3]) < 4 and b[0] < a[2]
        return count / total

    generate_dataset(tmp_path / "tight", num_images=3, width=160, height=160, chars_per_image=(30, 60),
                     font_size=(14, 24), layout="lines", seed=0, tracking=(-0.2, -0.1))
    generate_dataset(tmp_path / "plain", num_images=3, width=160, height=160, chars_per_image=(30, 60),
                     font_size=(14, 24), layout="lines", seed=0)
    assert scan_dataset(tmp_path / "tight").summary()["polygons_skipped"] == 0
    assert overlapping_neighbours(tmp_path / "tight") > 0.25 and overlapping_neighbours(tmp_path / "plain") < 0.05
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "cli"), "--layout", "lines", "--num-images", "3",
                                      "--size", "160", "--chars-per-image", "30-60", "--font-size", "14-24"])
    assert result.exit_code == 0, result.output  # no --tracking: the default pages
    same = "annotations/00002.csv"
    assert (tmp_path / "cli" / same).read_bytes() == (tmp_path / "plain" / same).read_bytes()
    for bad in ((0.2, 0.1), (-0.5, 0.0)):
        with pytest.raises(CharsegError, match="tracking must be"):
            generate_dataset(tmp_path / "bad", layout="lines", tracking=bad)
    with pytest.raises(CharsegError, match="only with --layout lines"):
        generate_dataset(tmp_path / "bad", layout="scatter", tracking=(0.0, 0.1))


def test_a_rotated_glyph_is_outlined_on_the_rotated_page_not_by_rotating_its_upright_outline():
    canvas = Image.new("L", (40, 40), 0)
    ImageDraw.Draw(canvas).text((12, 10), "W", fill=255, font=load_font(None, 14))  # strokes 1-2 px wide
    page = np.asarray(canvas, dtype=np.float32) / 255.0
    upright = Glyph("W", page, 0, 0)
    rotated, matrix = rotate_page(page, 10.0)
    ink = rotated >= 0.5  # the rotated page's pixels the W covers at least half

    def overlap(polygon):
        drawn = polygons_to_masks([polygon], 40, 40)[0].numpy().astype(bool)
        return (drawn & ink).sum() / (drawn | ink).sum()

    outlined = overlap(glyph_polygon(upright.moved(matrix)))
    assert outlined >= 0.85
    assert outlined > overlap(warp_points(glyph_polygon(upright), matrix)) + 0.05  # the upright staircase, turned


def test_lines_pages_rotated_keep_their_glyphs_outlined_and_on_the_page(tmp_path):
    generate_dataset(tmp_path, num_images=2, width=160, height=160, chars_per_image=(20, 60), font_size=(12, 24),
                     layout="lines", seed=0, rotation=12)
    report = scan_dataset(tmp_path)
    assert report.summary()["polygons_skipped"] == 0 and report.summary()["polygons_clipped"] == 0
    assert report.num_instances >= 2 * 15
    with pytest.raises(CharsegError, match="rotation"):
        generate_dataset(tmp_path / "x", layout="scatter", rotation=5)


def test_heldout_pages_are_valid_rotated_text_in_fonts_training_never_uses(tmp_path):
    assert not set(HELDOUT_FONTS) & set(TRAINING_FONTS)
    generate_heldout(tmp_path, num_images=4, seed=1)
    report = scan_dataset(tmp_path)
    assert report.summary()["images_used"] == 4 and report.num_instances >= 40
    counts = []
    for sample in report.samples:
        assert 128 <= sample.width <= 256 and 128 <= sample.height <= 256
        for points in sample.polygons:
            counts.append(len(points))
            assert points[:, 0].min() >= 0 and points[:, 0].max() <= sample.width
    # An annotator's few points (serifed glyphs at 30 px take more), not a pixel contour.
    assert min(counts) >= 3 and sorted(counts)[len(counts) // 2] <= 20 and max(counts) <= 80
    assert generate_heldout(tmp_path / "again", num_images=1, seed=1).characters == len(report.samples[0].polygons)


def test_heldout_document_pages_take_the_size_and_font_sizes_given(tmp_path):
    """`generate --held-out --size --font-size`: a document page of small type (held-out
    pages' defaults otherwise: the same pages as before)."""
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "doc"), "--held-out", "--size", "400x300",
                                      "--font-size", "8-10", "--num-images", "1"])
    assert result.exit_code == 0, result.output
    sample = scan_dataset(tmp_path / "doc").samples[0]
    heights = [float(np.ptp(p[:, 1])) for p in sample.polygons]
    assert (sample.width, sample.height) == (400, 300) and len(heights) >= 40
    assert max(heights) <= 12 and np.median(heights) <= 8  # rotated up to 12 degrees, so a little over the type
    CliRunner().invoke(cli, ["generate", str(tmp_path / "plain"), "--held-out", "--num-images", "1", "--seed", "5"])
    generate_heldout(tmp_path / "same", num_images=1, seed=5)
    assert (tmp_path / "plain/annotations/00001.csv").read_bytes() == (tmp_path / "same/annotations/00001.csv").read_bytes()
    with pytest.raises(CharsegError, match="font size must be 4 <= min <= max"):
        generate_heldout(tmp_path / "bad", num_images=1, font_sizes=(3, 10))


def test_heldout_document_pages_are_paragraphs_of_full_lines_outlined_on_their_glyphs(tmp_path):
    """`generate --held-out --document`: a scanned page of small type: nearly level lines, most
    of them filling the text block, dark ink on light paper, every annotation around its glyph's
    ink; --document alone is refused."""
    from PIL import Image

    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "doc"), "--held-out", "--document", "--size",
                                      "600x400", "--font-size", "10-14", "--num-images", "1", "--seed", "3"])
    assert result.exit_code == 0 and "wrote 1 held-out document pages" in result.output, result.output
    sample = scan_dataset(tmp_path / "doc").samples[0]
    boxes = np.array([[p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()] for p in sample.polygons])
    assert (sample.width, sample.height) == (600, 400) and len(boxes) >= 600  # a full page, not a few lines
    assert np.median(boxes[:, 3] - boxes[:, 1]) <= 12
    page = np.asarray(Image.open(sample.image_path).convert("L"), dtype=np.float32)
    ink = polygons_to_masks([np.asarray(p, np.float32) for p in sample.polygons], 400, 600).numpy().any(0)
    assert np.median(page[~ink]) >= 200 and np.median(page[ink]) <= np.median(page[~ink]) - 60
    # Lines: the characters' centres fall on few rows (a skew of 1.5 degrees moves them 8 px across 300).
    centre_rows = np.round((boxes[:, 1] + boxes[:, 3]) / 2)
    assert len(np.unique(np.round(centre_rows / 8))) <= 0.06 * len(boxes)
    assert boxes[:, 2].max() - boxes[:, 0].min() >= 0.75 * 600  # lines run across the text block
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "bad"), "--document"])
    assert result.exit_code == 2 and "--document makes held-out pages" in result.output


def test_heldout_pages_are_reproducible(tmp_path):
    generate_heldout(tmp_path / "a", num_images=2, seed=5)
    generate_heldout(tmp_path / "b", num_images=2, seed=5)
    for name in ("images/00001.png", "annotations/00002.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_lines_pages_have_uneven_paper_and_legible_ink(tmp_path):
    """Paper as scanned pages have it (light falling off, blotches), ink from black to faint
    gray, but every glyph at least half of MIN_INK_CONTRAST darker than the paper around it."""
    import numpy as np
    from PIL import Image

    from charseg.data.generate import MIN_INK_CONTRAST
    from charseg.polygons import polygon_boxes

    generate_dataset(tmp_path, num_images=6, width=160, height=160, chars_per_image=(20, 40), font_size=(14, 24),
                     layout="lines", seed=3)
    spreads, inks = [], []
    for sample in scan_dataset(tmp_path).samples:
        gray = np.asarray(Image.open(sample.image_path).convert("L"), dtype=np.float32)
        paper = np.ones(gray.shape, dtype=bool)
        for x1, y1, x2, y2 in polygon_boxes(sample.polygons).astype(int):
            paper[max(y1 - 1, 0):y2 + 2, max(x1 - 1, 0):x2 + 2] = False
        blocks = [gray[y:y + 40, x:x + 40][paper[y:y + 40, x:x + 40]] for y in range(0, 160, 40) for x in range(0, 160, 40)]
        levels = [float(np.median(b)) for b in blocks if b.size > 200]
        spreads.append(max(levels) - min(levels))
        for x1, y1, x2, y2 in polygon_boxes(sample.polygons).astype(int):
            around = gray[max(y1 - 3, 0):y2 + 4, max(x1 - 3, 0):x2 + 4][paper[max(y1 - 3, 0):y2 + 4, max(x1 - 3, 0):x2 + 4]]
            if around.size > 10:
                inks.append(float(np.median(around)) - float(np.percentile(gray[y1:y2 + 1, x1:x2 + 1], 5)))
    assert max(spreads) > 8  # not a flat page plus noise
    assert min(inks) > MIN_INK_CONTRAST / 2 and np.percentile(inks, 10) < 100  # faint lines exist


def test_unseen_font_pages_use_font_families_no_other_generator_uses(tmp_path, monkeypatch):
    from charseg.data import unseen

    families = unseen.font_families()
    assert sorted(families) == sorted(unseen.FONT_PACKAGES)  # the `fonts` extra, installed with `test`
    names = {Path(f).name for files in families.values() for f in files}
    assert len(names) >= 40 and not names & set(TRAINING_FONTS + HELDOUT_FONTS)
    result = CliRunner().invoke(cli, ["generate", str(tmp_path / "a"), "--held-out", "--unseen", "--num-images", "6",
                                      "--seed", "4"])
    assert result.exit_code == 0, result.output
    report = scan_dataset(tmp_path / "a")
    assert report.summary()["images_used"] == 6 and report.num_instances >= 60
    for sample in report.samples:
        assert 128 <= sample.width <= 256 and 128 <= sample.height <= 256
        for points in sample.polygons:
            assert points[:, 0].min() >= 0 and points[:, 0].max() <= sample.width
    unseen.generate_unseen(tmp_path / "b", num_images=6, seed=4)
    for name in ("images/00006.png", "annotations/00003.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    monkeypatch.setattr(unseen, "font_families", lambda: {})
    with pytest.raises(CharsegError, match=r"need the font packages font-roboto, .*: pip install 'charseg\[fonts\]'"):
        unseen.generate_unseen(tmp_path / "c", num_images=1)


def test_unseen_pages_of_some_families_with_every_line_in_one_style(tmp_path):
    from charseg.data import unseen

    def mean_aspect(out):  # width over height of the annotated characters
        sample_polygons = [p for s in scan_dataset(out).samples for p in s.polygons]
        return np.mean([np.ptp(p[:, 0]) / np.ptp(p[:, 1]) for p in sample_polygons])

    for style in ("plain", "condensed"):
        unseen.generate_unseen(tmp_path / style, num_images=3, seed=5, families=("font_roboto",), line_style=style)
    assert mean_aspect(tmp_path / "condensed") < 0.9 * mean_aspect(tmp_path / "plain")  # every line 60-85 % wide
    with pytest.raises(CharsegError, match="families must be some of font_roboto"):
        unseen.generate_unseen(tmp_path / "x", num_images=1, families=("font_comic",))
    with pytest.raises(CharsegError, match="got .* and 'bold'"):
        unseen.generate_unseen(tmp_path / "x", num_images=1, line_style="bold")
