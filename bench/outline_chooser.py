"""Learn the weights of the `learned` outline rule (inference/outlines.py choose_level).

    python bench/outline_chooser.py MODEL [--pages 240] [--seed 5] [--hidden 8]
                                          [--out charseg/inference/ink_chooser_weights.py]

Makes PAGES pages of the training generator (lines in its own fonts, rotated up to 8 degrees,
fonts of FONT_SIZE px: down to the small type of scanned pages, outlined where they land), each
then changed by training's photometric augmentation (contrast, gamma, blur on half of them,
noise: the polygons stay exact), so no held-out set's generator or annotator is seen. Runs MODEL
over them (fp32) and, for each detection whose mask overlaps a character at IoU 0.3 or more,
outlines the ink at each of CHOSEN_LEVELS (outlines.ink_window) and notes each outline's IoU
with the character. Fits a scorer of each level (one layer of HIDDEN tanh units over the level's
and the window's features, outlines.chooser_inputs) that maximises the expected COCO-style
reward of its softmax choice (the share of IoU thresholds 0.50:0.05:0.95 the chosen outline
reaches), and writes its weights, standardisation folded in, to OUT. Prints the share of
detections at IoU >= 0.75 with the level it picks, at level 0.5, and at the best level.
--validation-seed scores the fit on other pages of the same generator (how HIDDEN was chosen).
docs/FROM_SCRATCH.md measures the rule on held-out pages. A script, not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import textwrap
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charseg.data.augment import Augmentation  # noqa: E402
from charseg.data.dataset import load_dataset_report  # noqa: E402
from charseg.data.generate import generate_dataset  # noqa: E402
from charseg.data.images import load_image_rgb  # noqa: E402
from charseg.data.loading import image_to_tensor  # noqa: E402
from charseg.inference.outlines import (CHOSEN_LEVELS, chooser_inputs, chooser_scores, ink_window,  # noqa: E402
                                        iou, level_features, window_features)
from charseg.inference.predict import load_model_for_inference, output_to_instances  # noqa: E402
from charseg.polygons import polygons_to_masks  # noqa: E402

THRESHOLDS = np.arange(0.5, 0.96, 0.05)  # COCO's IoU thresholds
TEMPERATURE = 0.1  # of the softmax choice while fitting
WEIGHT_DECAY = 1e-4
FONT_SIZE = (7, 26)  # px; 10-26 (the demo's) chose worse levels on scanned pages' 8-15 px glyphs


def make_pages(out: Path, pages: int, seed: int) -> None:
    """PAGES training-generator pages in OUT, changed by training's photometric augmentation."""
    generate_dataset(out, num_images=pages, width=192, height=192, chars_per_image=(10, 80), font_size=FONT_SIZE,
                     seed=seed, layout="lines", rotation=8.0)
    rng = np.random.default_rng(seed)
    for path in sorted((out / "images").glob("*.png")):
        Image.fromarray(Augmentation().photometric(np.asarray(Image.open(path).convert("RGB")), rng)).save(path)


@torch.inference_mode()
def examples(model: torch.nn.Module, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per detection on a character: the chooser's inputs (levels x features), and each level's
    IoU with the character."""
    features, ious = [], []
    for sample in load_dataset_report(data).samples:
        rgb = load_image_rgb(sample.image_path)
        output = model([image_to_tensor(rgb)])[0]
        truths = [m.numpy().astype(bool) for m in polygons_to_masks(list(sample.polygons), sample.height,
                                                                    sample.width)]
        for instance in output_to_instances(output, 0.0, rgb, "mask"):
            window = ink_window(rgb, instance.box, instance.polygon, CHOSEN_LEVELS, parts=True)
            if window is None:
                continue
            (left, top), (h, w) = window.origin, window.mask.shape
            truth = max((t[top:top + h, left:left + w] for t in truths), key=lambda t: iou(t, window.mask))
            if iou(truth, window.mask) < 0.3:
                continue
            features.append(chooser_inputs(level_features(window), window_features(window)))
            ious.append([iou(ink, truth) for _, ink in window.candidates])
    return np.stack(features), np.array(ious, np.float32)


def fit(features: np.ndarray, ious: np.ndarray, hidden: int, steps: int = 1500) -> dict[str, np.ndarray]:
    """The chooser's weights (HIDDEN, HIDDEN_BIAS, OUTPUT), the inputs' standardisation folded in."""
    torch.manual_seed(0)
    flat = features.reshape(-1, features.shape[-1])
    mean, spread = flat.mean(0), flat.std(0) + 1e-6
    x = torch.tensor((features - mean) / spread, dtype=torch.float32)
    reward = torch.tensor((ious[..., None] >= THRESHOLDS).mean(-1), dtype=torch.float32)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[-1], hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.01, weight_decay=WEIGHT_DECAY)
    for _ in range(steps):
        chosen = torch.softmax(net(x).squeeze(-1) / TEMPERATURE, dim=1)
        loss = -(chosen * reward).sum(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = net[0].weight.detach().numpy().T.astype(np.float64)  # inputs x hidden
    bias = net[0].bias.detach().numpy().astype(np.float64)
    return {"HIDDEN": weights / spread[:, None], "HIDDEN_BIAS": bias - (mean / spread) @ weights,
            "OUTPUT": net[2].weight.detach().numpy()[0].astype(np.float64)}


def report(name: str, features: np.ndarray, ious: np.ndarray, weights: dict[str, np.ndarray]) -> None:
    scores = chooser_scores(features, weights["HIDDEN"], weights["HIDDEN_BIAS"], weights["OUTPUT"])
    got = ious[np.arange(len(ious)), scores.argmax(1)]
    at_half = ious[:, CHOSEN_LEVELS.index(0.5)]
    print(f"{name}: {len(ious)} detections; IoU >= 0.75: picked {(got >= 0.75).mean():.3f}, "
          f"level 0.5 {(at_half >= 0.75).mean():.3f}, best {(ious.max(1) >= 0.75).mean():.3f}; "
          f"mean COCO reward picked {(got[:, None] >= THRESHOLDS).mean():.3f}")


def write_weights(out: Path, weights: dict[str, np.ndarray], provenance: str) -> None:
    def rows(array: np.ndarray) -> str:
        if array.ndim == 1:
            return "(" + ", ".join(f"{v:.6g}" for v in array) + ")"
        return "(\n    " + ",\n    ".join(rows(row) for row in array) + ",\n)"
    provenance = textwrap.fill(f"bench/outline_chooser.py: {provenance}", 100)
    out.write_text(f'''"""Weights of the learned outline rule (outlines.choose_level), written by
{provenance}
Do not edit by hand: run the script again."""

LEVELS = {tuple(float(v) for v in CHOSEN_LEVELS)}
# HIDDEN[i][k]: input i (outlines.chooser_inputs: level_features, then window_features) to hidden unit k
HIDDEN = {rows(weights["HIDDEN"])}
HIDDEN_BIAS = {rows(weights["HIDDEN_BIAS"])}
# OUTPUT[k]: hidden unit k (tanh) to the level's score
OUTPUT = {rows(weights["OUTPUT"])}
''')


def page_examples(model: torch.nn.Module, pages: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        make_pages(Path(tmp), pages, seed)
        return examples(model, Path(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="A trained checkpoint (the demo's).")
    parser.add_argument("--pages", type=int, default=240, help="Training-generator pages to learn from.")
    parser.add_argument("--seed", type=int, default=5, help="The pages' seed (the demo trains on seed 1's).")
    parser.add_argument("--hidden", type=int, default=8, help="Tanh units of the chooser.")
    parser.add_argument("--validation-seed", type=int, default=None,
                        help="Also score the fit on 80 pages of this seed (the weights are written all the same).")
    parser.add_argument("--out", type=Path, default=ROOT / "charseg" / "inference" / "ink_chooser_weights.py")
    args = parser.parse_args()
    model, _, _ = load_model_for_inference(args.model, torch.device("cpu"))
    features, ious = page_examples(model, args.pages, args.seed)
    weights = fit(features, ious, args.hidden)
    report("fit pages", features, ious, weights)
    if args.validation_seed is not None:
        report("validation pages", *page_examples(model, 80, args.validation_seed), weights)
    write_weights(args.out, weights, f"{date.today().isoformat()}, `python bench/outline_chooser.py MODEL --pages "
                                     f"{args.pages} --seed {args.seed} --hidden {args.hidden}` with MODEL "
                                     f"{args.model}, {len(ious)} detections.")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
