"""Validation metrics through pycocotools, the split, best.pth, and predict's round trip."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import LIGHT_ARGS, light_config
from PIL import Image

from charseg import checkpoint as ckpt
from charseg.cli import cli
from charseg.data.dataset import Sample, scan_dataset
from charseg.data.images import load_image_rgb
from charseg.data.loading import image_to_tensor, split_samples
from charseg.inference.evaluate import evaluate, is_better
from charseg.model.architecture import MASK_BOX_MARGIN
from charseg.polygons import PIXEL_CENTRE, polygon_mask_targets, polygons_to_boxes
from charseg.training import runner


class Oracle(torch.nn.Module):
    """Answers with the ground truth of each image (optionally only the first `limit`
    characters) in the model's own output format (boxes, scores, box-sized masks): known
    inputs for checking the metric code, not a model under test."""

    def __init__(self, samples: list[Sample], limit: int | None = None):
        super().__init__()
        self.samples, self.limit, self.calls = samples, limit, 0

    def forward(self, images):
        outputs = []
        for _ in images:
            sample = self.samples[self.calls]
            self.calls += 1
            polygons = sample.polygons[: self.limit]
            boxes = polygons_to_boxes(polygons)
            n = len(polygons)
            outputs.append({"boxes": boxes, "labels": torch.ones(n, dtype=torch.int64),
                            "scores": torch.linspace(0.99, 0.9, n),
                            "box_masks": torch.from_numpy(polygon_mask_targets(polygons, boxes.numpy(), 28)),
                            "mask_frames": boxes + PIXEL_CENTRE})
        return outputs


def grid_page(tmp_path, rows: int, cols: int) -> Sample:
    """One page with rows x cols square characters of 20 px."""
    polygons = [np.array([[x, y], [x + 20, y], [x + 20, y + 20], [x, y + 20]], dtype=np.float32)
                for y in range(2, rows * 24, 24) for x in range(2, cols * 24, 24)]
    return Sample("page", tmp_path / "page.png", tmp_path / "page.csv", cols * 24 + 4, rows * 24 + 4, polygons,
                  ["x"] * len(polygons))


@pytest.fixture
def page(tmp_path):
    from PIL import Image
    sample = grid_page(tmp_path, 10, 15)  # 150 characters: more than COCO's usual 100
    Image.new("RGB", (sample.width, sample.height), "white").save(sample.image_path)
    return sample


def test_perfect_predictions_score_one_beyond_100_detections(page):
    result = evaluate(Oracle([page]), [page], torch.device("cpu"), max_dets=200, overlay_count=1)
    m = result.metrics
    assert m["bbox_AP"] == pytest.approx(1.0)
    assert m["segm_AP50"] == pytest.approx(1.0) and m["segm_AP75"] == pytest.approx(1.0)
    # Box mask -> polygon round trip keeps IoU above 0.9 on 20 px squares (not 0.95).
    assert m["segm_AP"] >= 0.9 - 1e-9
    assert m["char_precision"] == 1.0 and m["char_recall"] == 1.0 and m["char_f1"] == 1.0
    assert m["count_abs_error"] == 0.0
    assert result.overlays[0][0] == "page"


def test_max_dets_caps_the_coco_summary(page):
    capped = evaluate(Oracle([page]), [page], torch.device("cpu"), max_dets=100).metrics
    assert capped["segm_AP50"] < 0.8  # 100 of 150 characters seen: the reason maxDets is raised


def test_missing_characters_lower_recall_and_count(page):
    m = evaluate(Oracle([page], limit=75), [page], torch.device("cpu"), max_dets=200).metrics
    assert m["char_precision"] == 1.0
    assert m["char_recall"] == pytest.approx(0.5)
    assert m["count_abs_error"] == 75.0


class CappedOracle(Oracle):
    """The Oracle behind a detection limit, as a model has one (roi_heads.detections_per_img,
    the RPN's proposals that detection_limit raises with it); records each reading's limit."""

    def __init__(self, sample: Sample, limit: int):
        super().__init__([sample])
        self.roi_heads = SimpleNamespace(detections_per_img=limit, outline="mask")
        self.rpn = SimpleNamespace(_pre_nms_top_n={"testing": 100}, _post_nms_top_n={"testing": 100})
        self.readings: list[int] = []

    def forward(self, images):
        self.calls, self.limit = 0, self.roi_heads.detections_per_img
        self.readings.append(self.limit)
        return super().forward(images)


def test_a_page_past_the_models_limit_is_read_again_with_a_higher_one_or_named(page):
    """evaluate follows the page as predict does: a page whose detections reach the limit is read
    again with twice the limit until they stay under it, COCO's maxDets follows; without
    follow_page the page is named as reaching it, its characters past the limit missing."""
    oracle = CappedOracle(page, limit=40)
    followed = evaluate(oracle, [page], torch.device("cpu"), max_dets=40, follow_page=True)
    assert oracle.readings == [40, 80, 160] and oracle.roi_heads.detections_per_img == 40
    assert followed.raised == [("page", 160)] and followed.at_limit == []
    assert followed.metrics["segm_AP50"] == pytest.approx(1.0) and followed.metrics["char_recall"] == 1.0
    capped = evaluate(CappedOracle(page, limit=40), [page], torch.device("cpu"), max_dets=40)
    assert capped.at_limit == ["page"] and capped.raised == []
    assert capped.metrics["char_recall"] == pytest.approx(40 / 150)


def test_is_better_knows_the_direction():
    assert is_better("segm_AP", 0.5, 0.4) and not is_better("segm_AP", 0.4, 0.4)
    assert is_better("count_abs_error", 1.0, 2.0) and not is_better("count_abs_error", 3.0, 2.0)
    assert is_better("char_f1", 0.0, None)


def test_split_is_deterministic_by_seed(tiny_dataset):
    samples = scan_dataset(tiny_dataset).samples
    train, val = split_samples(samples, 0.5, seed=1)
    assert len(val) == 2 and len(train) == 2
    assert split_samples(samples, 0.5, seed=1)[1] == val
    assert split_samples(samples, 0.0, seed=1) == (samples, [])
    assert len(split_samples(samples, 0.1, seed=1)[1]) == 1  # at least one image when asked for


@pytest.mark.slow
def test_best_checkpoint_survives_resume(tiny_dataset, tmp_path):
    straight = runner.train(light_config(tiny_dataset, tmp_path / "a", epochs=3, val_fraction=0.25,
                                         best_metric="count_abs_error"))
    assert "val_segm_AP" in straight.history[0]
    best = ckpt.load_checkpoint(tmp_path / "a" / "best.pth")
    assert best["best"]["epoch"] == straight.best["epoch"] and best["epoch"] == straight.best["epoch"]
    values = [m["val_count_abs_error"] for m in straight.history]
    assert straight.best["value"] == min(values)
    assert straight.best["epoch"] == values.index(min(values)) + 1

    runner.train(light_config(tiny_dataset, tmp_path / "b", epochs=1, val_fraction=0.25,
                              best_metric="count_abs_error"))
    resumed = runner.resume(tmp_path / "b" / "model_epoch_001.pth", {"epochs": 3})
    assert resumed.best == straight.best


@pytest.mark.slow
def test_predict_round_trip(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "3",
                                      "--output-dir", str(out), "--heldout-dir", str(tiny_dataset)])
    assert result.exit_code == 0, result.output
    # the final model on the held-out pages, AP75 among what the command prints (README's demo output)
    assert re.search(r"held-out pages \(final model\): segm_AP50 [\d.]+, segm_AP75 [\d.]+, segm_AP [\d.]+, "
                     r"char_f1 [\d.]+, bbox_AP50 [\d.]+", result.output), result.output
    pred = tmp_path / "pred"
    result = CliRunner().invoke(cli, ["predict", str(tiny_dataset / "images"), "--model", str(out / "model_final.pth"),
                                      "--out", str(pred), "--score-threshold", "0.05", "--format", "coco",
                                      "--coco-segmentation", "rle"])
    assert result.exit_code == 0, result.output
    seconds, rate = re.search(r"in 4 images in ([\d.]+) s \(([\d.]+) pages per minute\)", result.output).groups()
    seconds, rate = float(seconds), float(rate)  # each printed to one decimal
    assert seconds > 0 and 240 / (seconds + 0.05) - 0.05 <= rate <= 240 / max(seconds - 0.05, 1e-9) + 0.05
    from pycocotools.coco import COCO

    predicted = COCO(str(pred / "predictions_coco.json"))  # images, one category, RLE masks with scores
    assert [im["file_name"] for im in predicted.loadImgs(predicted.getImgIds())] == [
        "00001.png", "00002.png", "00003.png", "00004.png"]
    assert all(0.05 <= a["score"] <= 1 and "counts" in a["segmentation"] for a in predicted.loadAnns(predicted.getAnnIds()))
    assert sorted(p.name for p in (pred / "overlays").iterdir()) == ["00001.png", "00002.png", "00003.png",
                                                                      "00004.png"]
    lines = (pred / "annotations" / "00001.csv").read_text().splitlines()
    assert lines[0] == "char,polygon_json,score"
    validated = CliRunner().invoke(cli, ["validate-data", str(pred)])
    assert validated.exit_code == 0, validated.output
    assert "polygons skipped:         0" in validated.output
    row = lines[1].split(",", 1)[1].rsplit(",", 1)
    assert lines[1].startswith("?,") and 0.05 <= float(row[1]) <= 1.0
    assert len(json.loads(row[0].strip('"'))) >= 6


def test_evaluate_command_writes_json_and_logs(tiny_dataset, tmp_path):
    out = tmp_path / "run"
    assert CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "1", "--scale-train", "0.5",
                                    "--scale-test", "0.75", "--output-dir", str(out)]).exit_code == 0
    spec = torch.load(out / "model_final.pth", weights_only=True)["model_spec"]
    assert (spec["scale_train"], spec["scale_test"]) == (0.5, 0.75)
    heights = [float(np.ptp(p[:, 1])) for s in scan_dataset(tiny_dataset).samples for p in s.polygons]
    assert spec["glyph_height"] == round(float(np.median(heights)), 2) > 0  # every page trains (val_fraction 0)
    assert spec["mask_box_margin"] == MASK_BOX_MARGIN > 0
    result = CliRunner().invoke(cli, ["evaluate", str(tiny_dataset), "--model", str(out / "model_final.pth"),
                                      "--out", str(tmp_path / "m.json"), "--scale-test", "1"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) >= {"bbox_AP", "segm_AP", "segm_AP50", "segm_AP75", "char_f1", "count_abs_error"}
    assert "MLflow run" in result.output
    from mlflow.tracking import MlflowClient

    [evaluation] = MlflowClient().get_run(result.output.split("MLflow run ")[1].split()[0]).inputs.dataset_inputs
    assert [t.value for t in evaluation.tags] == ["evaluation"] and len(evaluation.dataset.digest) == 16
    result = CliRunner().invoke(cli, ["evaluate", str(tiny_dataset), "--model", str(out / "model_final.pth"),
                                      "--scale-test", "-1"])
    assert result.exit_code == 2 and "'--scale-test': -1.0 is not in the range 0<=x<=8.0" in result.output
    from charseg.errors import CharsegError
    from charseg.inference.predict import load_model_for_inference

    with pytest.raises(CharsegError, match=r"--scale-test must be 0 \(resize to min_size\) or a factor"):
        load_model_for_inference(out / "model_final.pth", torch.device("cpu"), scale_test=-1.0)
    # The checkpoint's scale follows a page of small characters; a given one reads every page at it.
    follows = load_model_for_inference(out / "model_final.pth", torch.device("cpu"))[0]
    fixed, fixed_spec, _ = load_model_for_inference(out / "model_final.pth", torch.device("cpu"), scale_test=0.75)
    assert follows.glyph_height == spec["glyph_height"] and fixed.glyph_height == fixed_spec.glyph_height == 0.0


def test_each_page_scores_as_it_would_alone_whatever_the_batch(tmp_path):
    """Pages of different sizes are not batched together in evaluation: padding to the larger
    one changes GroupNorm's statistics, so a page's detections would depend on its neighbour."""
    from charseg.data.heldout import generate_heldout
    from charseg.inference.evaluate import evaluate
    from charseg.inference.predict import same_size_batches
    from charseg.model.build import build_model, spec_for_weights

    generate_heldout(tmp_path, num_images=3, min_side=96, max_side=160, seed=4)
    pages = scan_dataset(tmp_path).samples
    assert len({(p.height, p.width) for p in pages}) == 3
    same = [dataclasses.replace(p, width=120, height=100) for p in pages[:2]]
    assert [[s.name for s in b] for b in same_size_batches([*same, pages[2], same[0]], lambda s: (s.height, s.width),
                                                            4)] == \
        [[same[0].name, same[1].name], [pages[2].name], [same[0].name]]
    torch.manual_seed(0)
    model = build_model(spec_for_weights("resnet18", "none", min_size=96, max_size=160, norm="group",
                                         fpn_channels=64, mask_pixels=True, detections_per_img=50)).eval()
    with torch.inference_mode():
        tensors = [image_to_tensor(load_image_rgb(p.image_path)) for p in pages[:2]]
        alone, batched = model(tensors[:1])[0], model(tensors)[0]
    assert len(alone["scores"]) > 0 and not torch.equal(alone["boxes"], batched["boxes"][:len(alone["boxes"])])
    # The overlays draw every detection: the same pictures, the same predictions.
    one, three = (evaluate(model, pages, torch.device("cpu"), max_dets=50, score_threshold=0.0, batch_size=n,
                           overlay_count=3) for n in (1, 3))
    assert one.metrics == three.metrics
    for (_, a), (_, b) in zip(one.overlays, three.overlays, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_overlays_fill_each_mask_in_its_own_colour_and_place_labels_where_they_fit():
    import numpy as np

    from charseg.inference.predict import Instance, draw_overlay, instance_colour, label_places

    def square(x, score):
        return Instance(score, [x, 30.0, x + 5.0, 40.0], [x, 30.0, x + 5.0, 30.0, x + 5.0, 40.0, x, 40.0])

    row = [square(2.0 + 6 * i, 0.5 + i / 100) for i in range(40)]  # 40 glyphs 6 px apart on a 250 px page
    page = np.full((60, 250, 3), 255, np.uint8)
    drawn = np.asarray(draw_overlay(page, row, labels="none")).astype(int)
    first, second = drawn[35, 4], drawn[35, 10]
    assert (first != 255).any() and (first != second).any()  # tinted, each in its own colour
    expected = 255 + (np.array(instance_colour(0)) - 255) * 90 / 255  # translucent: the page shows through
    assert np.abs(first - expected).max() <= 2

    def text_box(text):
        return 22, 8, 0, 0

    fit = label_places(row, text_box, (250, 60), every=False)
    every = label_places(row, text_box, (250, 60), every=True)
    assert len(every) == 40 and 5 <= len(fit) < 40
    assert fit[0][1] == "0.87"  # the best score whose label stays on the page (0.89 and 0.88 would cross its edge)
    rects = [r for _, _, r, _ in fit]
    assert not any(a[0] < b[2] and b[0] < a[2] for i, a in enumerate(rects) for b in rects[i + 1:])


def test_label_places_on_a_dense_page_are_those_a_check_against_every_placed_label_gives():
    """label_places looks overlaps up in a grid: on 3,000 boxes of every size, some across the
    page's edges, it places the labels that checking each against all placed before places."""
    import random

    from charseg.inference.predict import Instance, label_places

    rng = random.Random(0)
    boxes = []
    for _ in range(3000):
        x, y = rng.uniform(-20, 1000), rng.uniform(-20, 1000)
        boxes.append(Instance(rng.random(), [x, y, x + rng.uniform(1, 90), y + rng.uniform(1, 60)], []))

    def text_box(text):
        return 14 + 3 * int(text[-1]) % 20, 7 + int(text[-2]) % 5, 1, 2  # widths and heights of several cells

    expected = []
    for index in sorted(range(len(boxes)), key=lambda i: -boxes[i].score):
        text = f"{boxes[index].score:.2f}"
        width, height, left, top = text_box(text)
        x, y = boxes[index].box[0], boxes[index].box[1] - height - 2
        rect = (x, y, x + width, y + height)
        if x >= 0 and y >= 0 and rect[2] <= 1000 and not any(
                rect[0] < r[2] and r[0] < rect[2] and rect[1] < r[3] and r[1] < rect[3] for _, _, r, _ in expected):
            expected.append((index, text, rect, (left, top)))
    got = label_places(boxes, text_box, (1000, 1000), every=False)
    assert 300 < len(expected) < 3000 and got == expected


def test_low_scores_are_dropped_before_the_mask_head_with_the_same_instances(tiny_dataset):
    from charseg.inference.predict import output_to_instances, predict_arrays
    from charseg.model.build import build_model, spec_for_weights

    torch.manual_seed(0)
    model = build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=128, fpn_channels=32,
                                         detections_per_img=60)).eval()
    masked = []
    model.roi_heads.mask_head.register_forward_hook(lambda m, i, out: masked.append(len(out)))
    rgb = load_image_rgb(tiny_dataset / "images" / "00001.png")
    with torch.inference_mode():
        everything = model([image_to_tensor(rgb)])[0]
    threshold = float(everything["scores"].median())
    expected = output_to_instances(everything, threshold, rgb)
    masked.clear()
    got = predict_arrays(model, [rgb], torch.device("cpu"), threshold)[0]
    assert 0 < len(got) < len(everything["scores"]) and sum(masked) < len(everything["scores"])
    assert got == expected
    assert model.roi_heads.score_thresh == 0.05  # the model's own threshold is back


def _assert_same_detections(csv_a, csv_b, size: tuple[int, int]) -> None:
    """CSV_A and CSV_B (predict's files for one page) list the same detections in the same
    order: scores within 0.001 and masks of IoU >= 0.95."""
    import csv

    from pycocotools import mask as mask_utils

    rows_a, rows_b = (list(csv.DictReader(path.read_text().splitlines())) for path in (csv_a, csv_b))
    assert len(rows_a) == len(rows_b) > 0, csv_b
    width, height = size
    for a, b in zip(rows_a, rows_b):
        assert float(a["score"]) == pytest.approx(float(b["score"]), abs=1e-3), csv_b
        rle_a, rle_b = (mask_utils.frPyObjects([json.loads(row["polygon_json"])], height, width) for row in (a, b))
        assert mask_utils.iou(rle_a, rle_b, [0])[0][0] >= 0.95, (csv_b, a, b)


def test_predict_batches_same_size_pages_with_the_detections_of_one_at_a_time(tiny_dataset, light_checkpoint, tmp_path):
    import shutil
    import subprocess
    import sys

    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("00001", "00002", "00003"):
        shutil.copy(tiny_dataset / "images" / f"{name}.png", inputs / f"a{name}.png")
    rgb = load_image_rgb(tiny_dataset / "images" / "00004.png")
    Image.fromarray(rgb[: rgb.shape[0] // 2]).save(inputs / "b_half.png")  # another size, then a broken file
    (inputs / "c_broken.png").write_bytes(b"not a png")
    shutil.copy(tiny_dataset / "images" / "00004.png", inputs / "d00004.png")
    outs = {}
    for batch in ("1", "2", "3"):
        result = CliRunner().invoke(cli, ["predict", str(inputs), "--model", str(light_checkpoint),
                                          "--out", str(tmp_path / batch), "--score-threshold", "0.05",
                                          "--batch-size", batch, "--precision", "fp32"])
        assert result.exit_code == 0, result.output
        assert "in 5 images" in result.stdout and "1 images skipped" in result.stdout
        assert f"skipped {inputs / 'c_broken.png'}" in result.stderr
        outs[batch] = {p.relative_to(tmp_path / batch).as_posix(): p for p in sorted((tmp_path / batch).rglob("*.csv"))}
    assert len(outs["1"]) == 5 and outs["2"].keys() == outs["1"].keys() == outs["3"].keys()
    # The same detections, row by row, up to float rounding: batched convolutions may take other
    # kernels (bit for bit equal on an AVX-512 CPU; on an AVX2 one a vertex moves by 0.01 px). In
    # fp32: `auto` is bf16 on a CPU with AMX, whose batched kernels round differently (IoU 0.92 seen).
    for name, alone in outs["1"].items():
        for batch in ("2", "3"):
            _assert_same_detections(alone, outs[batch][name], Image.open(inputs / f"{Path(name).stem}.png").size)
    assert sorted(p.name for p in (tmp_path / "3" / "overlays").iterdir()) == [
        "a00001.png", "a00002.png", "a00003.png", "b_half.png", "d00004.png"]
    # Predicting from a checkpoint file does not start MLflow (a second or two of every run).
    probe = ("import sys\nfrom charseg.cli import main\ntry:\n    main()\nexcept SystemExit as exc:\n"
             "    assert not exc.code, exc.code\nprint('mlflow imported:', 'mlflow' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe, "predict", str(inputs / "a00001.png"), "--model",
                           str(light_checkpoint), "--out", str(tmp_path / "probe")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "mlflow imported: False" in done.stdout


def test_a_page_at_the_detection_limit_is_named_with_the_option_that_raises_it(tiny_dataset, light_checkpoint,
                                                                               tmp_path):
    """A limit is what a model trained on sparse pages brings to a dense one: predict says which
    pages reached it and how to raise it, and the served model takes it per call."""
    import pandas as pd

    from charseg.inference.serving import CharsegPredictor

    result = CliRunner().invoke(cli, ["predict", str(tiny_dataset / "images"), "--model", str(light_checkpoint),
                                      "--out", str(tmp_path / "out"), "--score-threshold", "0", "--detections-per-img",
                                      "1"])
    assert result.exit_code == 0, result.output
    rows = {p.name: len(p.read_text().splitlines()) - 1 for p in (tmp_path / "out" / "annotations").glob("*.csv")}
    assert rows and max(rows.values()) == 1
    full = sorted(name.replace(".csv", ".png") for name, n in rows.items() if n == 1)
    assert (f"warning: {len(full)} page(s) reached the model's limit of 1 detections, so characters past it are "
            f"missing: {', '.join(full)}; pass --detections-per-img 2 (or more)") in result.output

    predictor = CharsegPredictor(str(light_checkpoint), device="cpu", precision="fp32")
    images = pd.DataFrame({"image": [p.read_bytes() for p in sorted((tiny_dataset / "images").glob("*.png"))]})
    capped = predictor.predict(images, {"score_threshold": 0.0, "detections_per_img": 1})
    free = predictor.predict(images, {"score_threshold": 0.0})
    assert capped.groupby("image_id").size().max() == 1 < free.groupby("image_id").size().max()
    assert predictor.model.roi_heads.detections_per_img > 1  # the call's limit ended with the call


def test_the_detection_limit_follows_a_page_that_reaches_it(tiny_dataset, light_checkpoint, tmp_path):
    """Without --detections-per-img a page that reaches the model's limit is read again with it
    doubled until it does not: the same instances as a call with that limit, and predict says so."""
    from charseg.inference.predict import detection_limit, predict_arrays, predict_following_page
    from charseg.model.build import build_model, spec_for_weights

    torch.manual_seed(0)
    model = build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=128, fpn_channels=32,
                                         detections_per_img=2)).eval()
    rgb = load_image_rgb(tiny_dataset / "images" / "00001.png")
    limits: list[int] = []
    got = predict_following_page(model, [rgb], torch.device("cpu"), 0.0, limits=limits)[0]
    assert limits[0] >= 8 and limits[0] & (limits[0] - 1) == 0 and limits[0] // 2 <= len(got) < limits[0]
    with detection_limit(model, limits[0]):
        assert got == predict_arrays(model, [rgb], torch.device("cpu"), 0.0)[0]
    assert model.roi_heads.detections_per_img == 2


def test_a_page_the_input_cap_shrinks_is_named_with_the_max_size_that_reads_it(tiny_dataset, light_checkpoint,
                                                                               tmp_path):
    """A page-scaled model reads a page at its scale; one that --max-size shrinks below it is
    named, with the --max-size that would not."""
    from charseg.inference.predict import shrink_warning
    from charseg.model.build import build_model, spec_for_weights

    model = build_model(spec_for_weights("resnet18", "none", min_size=64, max_size=128, fpn_channels=32,
                                         norm="group", mask_pixels=True, scale_test=1.25)).eval()
    assert shrink_warning(model, [("a.png", 64, 64), ("b.png", 3000, 1000)]) is None
    model.transform.max_input_side = 100
    assert shrink_warning(model, [("a.png", 64, 64), ("b.png", 100, 60), ("c.png", 70, 90)]) == (
        "warning: 2 page(s) are larger than the model's input limit of 100 px and were shrunk, so their characters "
        "are smaller than the model learned and some are missed: b.png, c.png; pass --max-size 125 to read them at "
        "the model's scale (memory grows with the page)")
    model.transform.page_scales = (0.0, 0.0)  # a model that resizes to min_size: max_size is its rule, no warning
    assert shrink_warning(model, [("b.png", 100, 60)]) is None

    page = str(tiny_dataset / "images" / "00001.png")  # 64 px: read at 80 px with --scale-test 1.25
    for max_size, named in (("64", True), ("80", False)):
        result = CliRunner().invoke(cli, ["predict", page, "--model", str(light_checkpoint), "--out",
                                          str(tmp_path / max_size), "--scale-test", "1.25", "--max-size", max_size])
        assert result.exit_code == 0, result.output
        assert ("input limit of 64 px and were shrunk" in result.output and "00001.png; pass --max-size 80 "
                in result.output) is named, result.output
