"""Learn the weights of the `learned` outline rule (inference/outlines.py choose_level).

    python bench/outline_chooser.py MODEL [--pages 240] [--seed 5] [--out charseg/inference/ink_chooser_weights.py]

Makes PAGES pages of the training generator (lines in its own fonts, rotated up to 8 degrees,
glyphs of 10-26 px, outlined where they land), each then changed by training's photometric
augmentation (contrast, gamma, blur on half of them, noise: the polygons stay exact), so no
held-out set's generator or annotator is seen. Runs MODEL over them (fp32) and, for each
detection whose mask overlaps a character at IoU 0.3 or more, outlines the ink at each of
CHOSEN_LEVELS (outlines.ink_window) and notes each outline's IoU with the character. Fits a
linear scorer over the products of each level's features and the window's
(outlines.level_features x outlines.window_features) that maximises the expected COCO-style
reward of its softmax choice (the share of IoU thresholds 0.50:0.05:0.95 the chosen outline
reaches), and writes its weights, standardisation folded in, to OUT. Prints the share of
detections at IoU >= 0.75 with the level it picks, at level 0.5, and at the best level.
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
from charseg.inference.outlines import (CHOSEN_LEVELS, ink_window, iou, level_features,  # noqa: E402
                                        window_features)
from charseg.inference.predict import load_model_for_inference, output_to_instances  # noqa: E402
from charseg.polygons import polygons_to_masks  # noqa: E402

THRESHOLDS = np.arange(0.5, 0.96, 0.05)  # COCO's IoU thresholds
TEMPERATURE = 0.1  # of the softmax choice while fitting
L2 = 1e-3


def make_pages(out: Path, pages: int, seed: int) -> None:
    """PAGES training-generator pages in OUT, changed by training's photometric augmentation."""
    generate_dataset(out, num_images=pages, width=192, height=192, chars_per_image=(10, 80), font_size=(10, 26),
                     seed=seed, layout="lines", rotation=8.0)
    rng = np.random.default_rng(seed)
    for path in sorted((out / "images").glob("*.png")):
        Image.fromarray(Augmentation().photometric(np.asarray(Image.open(path).convert("RGB")), rng)).save(path)


@torch.inference_mode()
def examples(model: torch.nn.Module, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per detection on a character: its (levels x level features x window features) products,
    and each level's IoU with the character."""
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
            features.append(np.einsum("ci,j->cij", level_features(window), window_features(window)))
            ious.append([iou(ink, truth) for _, ink in window.candidates])
    return np.stack(features), np.array(ious, np.float32)


def fit(features: np.ndarray, ious: np.ndarray, steps: int = 1000) -> np.ndarray:
    """The weights (level features x window features), standardisation folded in."""
    shape = features.shape[2:]
    features = features.reshape(*features.shape[:2], -1)
    flat = features.reshape(-1, features.shape[-1])
    mean, spread = flat.mean(0), flat.std(0) + 1e-6
    x = torch.tensor((features - mean) / spread, dtype=torch.float32)
    reward = torch.tensor((ious[..., None] >= THRESHOLDS).mean(-1), dtype=torch.float32)
    weights = torch.zeros(x.shape[-1], requires_grad=True)
    optimizer = torch.optim.Adam([weights], lr=0.05)
    for _ in range(steps):
        chosen = torch.softmax(x @ weights / TEMPERATURE, dim=1)
        loss = -(chosen * reward).sum(1).mean() + L2 * (weights * weights).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (weights.detach().numpy() / spread).reshape(shape)


def write_weights(out: Path, weights: np.ndarray, provenance: str) -> None:
    rows = ",\n    ".join("(" + ", ".join(f"{v:.6g}" for v in row) + ")" for row in weights)
    provenance = "\n".join(textwrap.wrap(provenance, 96))
    out.write_text(f'''"""Weights of the learned outline rule (outlines.choose_level), written by
bench/outline_chooser.py: {provenance}
Do not edit by hand: run the script again."""

LEVELS = {tuple(float(v) for v in CHOSEN_LEVELS)}
# WEIGHTS[i][j]: level feature i (outlines.level_features) times window feature j (outlines.window_features)
WEIGHTS = (
    {rows},
)
''')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="A trained checkpoint (the demo's).")
    parser.add_argument("--pages", type=int, default=240, help="Training-generator pages to learn from.")
    parser.add_argument("--seed", type=int, default=5, help="The pages' seed (the demo trains on seed 1's).")
    parser.add_argument("--out", type=Path, default=ROOT / "charseg" / "inference" / "ink_chooser_weights.py")
    args = parser.parse_args()
    model, _, _ = load_model_for_inference(args.model, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        make_pages(Path(tmp), args.pages, args.seed)
        features, ious = examples(model, Path(tmp))
    weights = fit(features, ious)
    picked = np.einsum("ncij,ij->nc", features, weights).argmax(1)
    got = ious[np.arange(len(ious)), picked]
    at_half = ious[:, CHOSEN_LEVELS.index(0.5)]
    print(f"{len(ious)} detections; IoU >= 0.75: picked {(got >= 0.75).mean():.3f}, "
          f"level 0.5 {(at_half >= 0.75).mean():.3f}, best {(ious.max(1) >= 0.75).mean():.3f}")
    write_weights(args.out, weights, f"{date.today().isoformat()}, `python bench/outline_chooser.py MODEL --pages "
                                     f"{args.pages} --seed {args.seed}` with MODEL {args.model}, "
                                     f"{len(ious)} detections.")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
