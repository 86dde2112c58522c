"""How far is the ink rule's choice of level from the best one? The outline rule against an oracle.

    python bench/outline_oracle.py MODEL DATA_DIR [--levels 17]

`--outline ink` (inference/outlines.py) outlines each detection on the ink at one of a few
levels between the paper's and the ink's, the one agreeing best with the mask. This script runs
MODEL (fp32, its own limits) over DATA_DIR (e.g. `charseg generate --held-out`) and scores, as
`charseg evaluate` scores them, four ways of choosing that level: the ink rule (the level
agreeing best with the mask), the learned rule (outlines.choose_level), one fixed level (0.5),
and an oracle that takes, of LEVELS levels from 0.1 to 0.9 and the mask's own
contour, the outline that agrees best with the annotated character its mask overlaps most.
The oracle reads the annotations, so it is a ceiling, not a rule: the gap between its row and
the rule's is what a better choice (a rule, or one learned against annotations) could gain.
Prints COCO segm AP50, AP75, AP and char F1 for each, and over the detections whose mask overlaps
a character at IoU 0.5 or more, the share at IoU 0.75 or more. docs/FROM_SCRATCH.md quotes it.
A script, not a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charseg.data.dataset import load_dataset_report  # noqa: E402
from charseg.inference import evaluate as evaluation  # noqa: E402
from charseg.inference import predict  # noqa: E402
from charseg.inference.outlines import ink_window, iou, snap_to_ink, window_outline  # noqa: E402
from charseg.polygons import polygons_to_masks  # noqa: E402


class Chooser:
    """predict.snap_to_ink's stand-in: a level chosen by RULE ("ink", "learned", "fixed" or "oracle"),
    each detection's IoU with its character noted (the annotations of the page being scored)."""

    def __init__(self, rule: str, levels: tuple[float, ...]):
        self.rule, self.levels = rule, levels
        self.truth: list[np.ndarray] = []
        self.ious: list[float] = []

    def __call__(self, rgb: np.ndarray, box: list[float], polygon: list[float], learned: bool = False) -> list[float]:
        """The outline by this chooser's rule (LEARNED, the model's own rule, is not read)."""
        window = ink_window(rgb, box, polygon, self.levels)
        if window is None:
            return polygon
        (left, top), (h, w) = window.origin, window.mask.shape
        truths = [t[top:top + h, left:left + w] for t in self.truth] or [np.zeros_like(window.mask)]
        truth = max(truths, key=lambda t: iou(t, window.mask))
        if self.rule == "oracle":
            ink = max((c for _, c in window.candidates), key=lambda c: iou(c, truth))
            chosen = window_outline(ink, window) if iou(ink, truth) > iou(window.mask, truth) else []
            chosen, binary = (chosen, ink) if chosen else (polygon, window.mask)
        else:
            chosen = (self._fixed(window, polygon) if self.rule == "fixed"
                      else snap_to_ink(rgb, box, polygon, learned=self.rule == "learned"))
            binary = polygons_to_masks([np.asarray(chosen, np.float64).reshape(-1, 2) - window.origin], h, w)[0]
        if iou(window.mask, truth) >= 0.5:
            self.ious.append(iou(np.asarray(binary, bool), truth))
        return chosen

    def _fixed(self, window, polygon: list[float]) -> list[float]:
        ink = dict(window.candidates).get(0.5)
        if ink is None or iou(ink, window.mask) < 0.5:
            return polygon
        return window_outline(ink, window) or polygon

    def page(self, sample) -> None:
        self.truth = [m.numpy().astype(bool) for m in polygons_to_masks(list(sample.polygons), sample.height,
                                                                        sample.width)]


def score(model: torch.nn.Module, samples: list, chooser: Chooser, max_dets: int) -> dict[str, float]:
    """evaluate() with CHOOSER in snap_to_ink's place, told each page's annotations as it comes."""
    pages = iter(samples)
    to_instances = predict.output_to_instances

    def per_page(*args, **kwargs):
        chooser.page(next(pages))
        return to_instances(*args, **kwargs)

    evaluation.output_to_instances, predict.snap_to_ink = per_page, chooser
    try:
        result = evaluation.evaluate(model, samples, torch.device("cpu"), max_dets=max_dets, batch_size=1)
    finally:
        evaluation.output_to_instances, predict.snap_to_ink = to_instances, snap_to_ink
    return result.metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="A trained checkpoint (its outline rule is set to ink here).")
    parser.add_argument("data_dir", help="Annotated pages the model never trained on.")
    parser.add_argument("--levels", type=int, default=17, help="The oracle's levels, evenly from 0.1 to 0.9.")
    args = parser.parse_args()
    model, spec, _ = predict.load_model_for_inference(args.model, torch.device("cpu"), outline="ink")
    samples = load_dataset_report(args.data_dir).samples
    levels = tuple(float(v) for v in np.round(np.linspace(0.1, 0.9, args.levels), 4))
    print(f"{len(samples)} pages of {args.data_dir}; {args.model}")
    print("| choice of level | segm_AP50 | segm_AP75 | segm_AP | char_f1 | detections on a character | IoU >= 0.75 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for rule, label, lv in (("ink", "the ink rule (agreeing best with the mask)", (0.5,)),
                            ("learned", "the learned rule (outlines.choose_level)", (0.5,)),
                            ("fixed", "level 0.5", (0.5,)),
                            ("oracle", f"oracle: best of {args.levels} levels or the mask", levels)):
        chooser = Chooser(rule, lv)
        m = score(model, samples, chooser, spec.detections_per_img)
        ious = np.array(chooser.ious)
        print(f"| {label} | {m['segm_AP50']:.3f} | {m['segm_AP75']:.3f} | {m['segm_AP']:.3f} | {m['char_f1']:.3f} | "
              f"{len(ious)} | {(ious >= 0.75).mean():.3f} |", flush=True)


if __name__ == "__main__":
    main()
