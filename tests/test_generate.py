"""Training pages (scatter, lines) and held-out pages: valid datasets, made differently."""

from __future__ import annotations

from charseg.data import scan_dataset
from charseg.generate import TRAINING_FONTS, generate_dataset
from charseg.heldout import HELDOUT_FONTS, generate_heldout


def test_lines_layout_sets_text_in_lines_and_is_fully_valid(tmp_path):
    summary = generate_dataset(tmp_path, num_images=3, width=160, height=160, chars_per_image=(20, 60),
                               font_size=(12, 24), layout="lines", seed=0)
    report = scan_dataset(tmp_path)
    assert report.summary()["polygons_skipped"] == 0 and report.summary()["images_skipped"] == 0
    assert summary.characters == report.num_instances >= 3 * 15
    for sample in report.samples:
        tops = sorted(float(p[:, 1].min()) for p in sample.polygons)
        assert len({round(t / 8) for t in tops}) < len(tops)  # characters share lines


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


def test_heldout_pages_are_reproducible(tmp_path):
    generate_heldout(tmp_path / "a", num_images=2, seed=5)
    generate_heldout(tmp_path / "b", num_images=2, seed=5)
    for name in ("images/00001.png", "annotations/00002.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
