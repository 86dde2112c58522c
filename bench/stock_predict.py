"""A stock torchvision inference process, for bench/speed.py to time whole: what a
torchvision user runs to get a page's character outlines, with the same outputs as `charseg
predict` (CSV, overlay, page copy) written by the same functions.

    python bench/stock_predict.py CHECKPOINT IMAGE|FOLDER OUT_DIR [DETECTIONS_PER_IMG]

A folder's pages run one after the other in this process, the model loaded once. A checkpoint
trained with `--mask-pixels` has no stock counterpart: stock then runs its own mask predictor
(untrained) over the checkpoint's backbone, RPN and box head, so it finds the same characters
and does the same work per detection, with other masks. A checkpoint with a page scale
(`--scale-test`) has stock's transform sized to that scale for each page, capped where charseg
caps such a model's input (PasteFreeTransform.inference_cap). DETECTIONS_PER_IMG: the limit
instead of the checkpoint's, the RPN keeping proposals for it as `charseg predict
--detections-per-img` does (the same work at the same limit).

Stock Mask R-CNN: torchvision's own RoI heads and transform (full-image masks pasted for
every detection, traced to polygons), in float32, with the checkpoint's weights, limits and
anchors; detections under the score threshold are dropped before the mask head, as charseg does.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torchvision  # noqa: F401  (before charseg: stock's own import, torch._dynamo included; charseg.startup skips it)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charseg.checkpoint import load_checkpoint  # noqa: E402
from charseg.data.images import load_image_rgb
from charseg.inference.predict import predict_arrays, write_prediction  # noqa: E402
from charseg.model.architecture import PROPOSALS_PER_DETECTION  # noqa: E402
from charseg.model.build import ModelSpec, build_model  # noqa: E402
from charseg.model.heads import PAGE_MAX_SIDE  # noqa: E402

SCORE_THRESHOLD = 0.5  # charseg predict's default


def main(checkpoint: str, image: str, out_dir: str, detections: str | None = None) -> None:
    state = load_checkpoint(checkpoint)
    spec = ModelSpec.from_dict(state["model_spec"])
    if detections:
        spec = dataclasses.replace(spec, detections_per_img=int(detections), rpn_proposals_test=max(
            spec.rpn_proposals_test, PROPOSALS_PER_DETECTION * int(detections)))
    model = build_model(dataclasses.replace(spec, mask_pixels=False, scale_train=0.0, scale_test=0.0),
                        polygon_native=False)
    if spec.mask_pixels:  # the pixel branch's predictor weights have no place in stock's
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in state["model"].items() if k in own and own[k].shape == v.shape},
                              strict=False)
    else:
        model.load_state_dict(state["model"])
    model.eval()
    pages = sorted(Path(image).glob("*.png")) if Path(image).is_dir() else [Path(image)]
    found = 0
    for page in pages:
        rgb = load_image_rgb(page)
        if spec.scale_test:  # stock resizes the shorter side to min_size, the longer at most to max_size
            model.transform.min_size = (round(spec.scale_test * min(rgb.shape[:2])),)
            model.transform.max_size = min(max(spec.max_size, PAGE_MAX_SIDE), round(spec.scale_test * max(rgb.shape[:2])))
        instances = predict_arrays(model, [rgb], torch.device("cpu"), SCORE_THRESHOLD)[0]
        write_prediction(Path(out_dir), page.stem, rgb, instances, "fit")
        found += len(instances)
    print(f"{found} characters")


if __name__ == "__main__":
    main(*sys.argv[1:5])
