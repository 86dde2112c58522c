"""The exported model's CPU speed against `charseg predict`'s: writes its section of
docs/BENCHMARKS.md. A script, not a test: about 10 minutes on 2 cores; run it alone.

    python bench/export.py CHECKPOINT HELDOUT_DIR [--out docs/BENCHMARKS.md]

CHECKPOINT: a trained model (the demo's outputs/demo/best.pth), so the pages have the
detections a user gets; HELDOUT_DIR: a dataset of pages it never trained on (demo_heldout).
Each runtime runs in a fresh process: load (the model ready to run), then every held-out page
once untimed and once timed, then a dense 1024² page (lines of 8-16 px characters) untimed and
timed, from a second export whose detection limit fits it. charseg is `predict`'s path
(predict_arrays) in float32 and at its default precision (auto: bf16 where the CPU has it
natively); every runtime ends at the same polygons (output_to_instances).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scaling import cpu_description, write_section  # noqa: E402

RUNTIMES = ("charseg fp32", "charseg auto", "onnxruntime", "torchscript")
DENSE_LIMIT = 3000  # detections per page of the dense export (the page holds fewer characters)


def worker(runtime: str, checkpoint: str, exports: dict, pages_dir: str, dense_page: str) -> dict:
    """One runtime in this process: seconds to load, per held-out page, on the dense page."""
    from charseg.data.images import load_image_rgb
    from charseg.inference.export import ExportedModel
    from charseg.inference.predict import load_model_for_inference, predict_arrays
    from charseg.precision import resolve_compute

    pages = [load_image_rgb(p) for p in sorted(Path(pages_dir, "images").glob("*.png"))]
    dense = load_image_rgb(Path(dense_page))

    def loader(limit):
        if runtime.startswith("charseg"):
            compute = resolve_compute("cpu", runtime.split()[1], training=False)
            model, _, state = load_model_for_inference(checkpoint, compute.device, limit)
            threshold = float(state["config"]["score_threshold"])
            return lambda rgb: predict_arrays(model, [rgb], compute.device, threshold, compute.autocast)[0], \
                compute.precision
        exported = ExportedModel(exports[runtime, limit is not None])
        return (lambda rgb: exported.predict(rgb)), "fp32"

    start = time.perf_counter()
    run, precision = loader(None)
    load = time.perf_counter() - start
    times, found = [], 0
    for rgb in pages:
        run(rgb)
        start = time.perf_counter()
        found += len(run(rgb))
        times.append(time.perf_counter() - start)
    run, _ = loader(DENSE_LIMIT)
    run(dense)
    start = time.perf_counter()
    dense_found = len(run(dense))
    dense_time = time.perf_counter() - start
    return {"runtime": runtime, "precision": precision, "load": load, "page": statistics.median(times),
            "pages": len(pages), "found": found, "dense": dense_time, "dense_found": dense_found}


def export_all(checkpoint: str, folder: Path) -> tuple[dict, dict]:
    from charseg.inference.export import export_model

    exports, seconds = {}, {}
    for fmt, runtime, suffix in (("onnx", "onnxruntime", "onnx"), ("torchscript", "torchscript", "pt")):
        for dense in (False, True):
            path = folder / f"{fmt}{'-dense' if dense else ''}.{suffix}"
            result = export_model(checkpoint, path, fmt, DENSE_LIMIT if dense else None)
            exports[runtime, dense] = str(path)
            seconds[runtime, dense] = result.seconds
    return exports, seconds


def report(rows: list[dict], seconds: dict, checkpoint: str, pages_dir: str, dense_chars: int) -> str:
    import torch

    from charseg import __version__

    base = next(r for r in rows if r["runtime"] == "charseg fp32")
    lines = ["## Exported models vs charseg predict (bench/export.py)", "",
             f"Measured {date.today()} by `python bench/export.py CHECKPOINT HELDOUT_DIR` on {cpu_description()}, "
             f"Python {platform.python_version()}, torch {torch.__version__}, "
             f"charseg {__version__}; checkpoint `{checkpoint}`, held-out pages `{pages_dir}`. Each runtime in a "
             "fresh process, ending at the same polygons; per page: the median over the held-out pages, each run "
             f"once before it is timed; dense: a 1024² page of {dense_chars} characters (8-16 px) with a detection limit "
             f"of {DENSE_LIMIT}. Export took {seconds['onnxruntime', False]:.0f} s (ONNX) and "
             f"{seconds['torchscript', False]:.0f} s (TorchScript), checks included.", "",
             "| runtime | precision | load | per held-out page | vs charseg fp32 | dense page | vs charseg fp32 "
             "| characters found (held-out / dense) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['runtime']} | {row['precision']} | {row['load']:.2f} s | {1000 * row['page']:.0f} ms "
                     f"| {row['page'] / base['page']:.2f}x | {row['dense']:.1f} s | {row['dense'] / base['dense']:.2f}x "
                     f"| {row['found']} / {row['dense_found']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("heldout_dir")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--exports", help=argparse.SUPPRESS)
    parser.add_argument("--dense-page", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        exports = {(k.split("|")[0], k.split("|")[1] == "dense"): v for k, v in json.loads(args.exports).items()}
        print(json.dumps(worker(args.worker, args.checkpoint, exports, args.heldout_dir, args.dense_page)))
        return
    from charseg.data.generate import generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        dense = generate_dataset(Path(tmp, "dense"), num_images=1, width=1024, height=1024, chars_per_image=(1700, 1700),
                         font_size=(8, 16), layout="lines", seed=7)
        exports, seconds = export_all(args.checkpoint, Path(tmp))
        encoded = json.dumps({f"{k[0]}|{'dense' if k[1] else 'sparse'}": v for k, v in exports.items()})
        rows = []
        for runtime in RUNTIMES:
            done = subprocess.run([sys.executable, __file__, args.checkpoint, args.heldout_dir, "--worker", runtime,
                                   "--exports", encoded, "--dense-page", str(Path(tmp, "dense/images/00001.png"))],
                                  capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    write_section(args.out, report(rows, seconds, args.checkpoint, args.heldout_dir, dense.characters))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
