"""A stock torchvision inference process, for bench/precision.py to time whole: what a
torchvision user runs to get a page's character outlines, with the same outputs as `charseg
predict` (CSV, overlay, page copy) written by the same functions.

    python bench/stock_predict.py CHECKPOINT IMAGE OUT_DIR

Stock Mask R-CNN: torchvision's own RoI heads and transform (full-image masks pasted for
every detection, traced to polygons), in float32, with the checkpoint's weights, limits and
anchors; detections under the score threshold are dropped before the mask head, as charseg does.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchvision  # noqa: F401  (before charseg: stock's own import, torch._dynamo included; charseg.startup skips it)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charseg.checkpoint import load_checkpoint  # noqa: E402
from charseg.data.images import load_image_rgb
from charseg.inference.predict import predict_arrays, write_prediction  # noqa: E402
from charseg.model.build import ModelSpec, build_model  # noqa: E402

SCORE_THRESHOLD = 0.5  # charseg predict's default


def main(checkpoint: str, image: str, out_dir: str) -> None:
    state = load_checkpoint(checkpoint)
    model = build_model(ModelSpec.from_dict(state["model_spec"]), polygon_native=False)
    model.load_state_dict(state["model"])
    model.eval()
    rgb = load_image_rgb(Path(image))
    instances = predict_arrays(model, [rgb], torch.device("cpu"), SCORE_THRESHOLD)[0]
    write_prediction(Path(out_dir), Path(image).stem, rgb, instances, "fit")
    print(f"{len(instances)} characters")


if __name__ == "__main__":
    main(*sys.argv[1:4])
