"""The CUDA paths: float16 with its loss scaler, auto precision on a GPU, NCCL between GPUs.

Skipped where no CUDA device is visible, as on this project's CI machine: run
`pytest tests/test_cuda.py` on a GPU machine. The CPU tests of test_precision.py check the
same code with the CPU's autocast and GradScaler; these check what only CUDA has.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import DDP_ARGS, TORCHRUN, light_config, run_charseg

from charseg import checkpoint as ckpt
from charseg.data.generate import generate_dataset
from charseg.data.images import load_image_rgb
from charseg.data.loading import image_to_tensor
from charseg.inference.predict import load_model_for_inference
from charseg.precision import resolve_compute
from charseg.training import runner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fp16_on_cuda_trains_with_its_loss_scaler_and_resumes_with_it(tiny_dataset, tmp_path):
    straight = runner.train(light_config(tiny_dataset, tmp_path / "straight", epochs=2, precision="fp16",
                                         device="cuda"))
    resumed = runner.resume(straight.checkpoints[0], {"output_dir": str(tmp_path / "resumed")})
    first = ckpt.load_checkpoint(straight.checkpoints[0])
    a = ckpt.load_checkpoint(straight.final_checkpoint)
    b = ckpt.load_checkpoint(resumed.final_checkpoint)
    assert a["config"]["precision"] == b["config"]["precision"] == "fp16"
    assert first["scaler"]["scale"] > 0 and b["scaler"]["scale"] == a["scaler"]["scale"]
    assert all(v.dtype == torch.float32 for v in b["model"].values() if v.is_floating_point())
    # CUDA kernels add in any order (atomics), so unlike on the CPU the resumed run agrees
    # with the straight one to rounding, not bit for bit.
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in resumed.history)
    assert resumed.history[-1]["loss"] == pytest.approx(straight.history[-1]["loss"], rel=0.05)

    # The float32 checkpoint of a CUDA fp16 run predicts on the CPU, and auto on the GPU
    # chooses bf16 exactly where it computes it natively (compute capability 8.0 on).
    image = image_to_tensor(load_image_rgb(tiny_dataset / "images" / "00001.png"))
    cpu_model, _, _ = load_model_for_inference(straight.final_checkpoint, torch.device("cpu"))
    gpu_model, _, _ = load_model_for_inference(straight.final_checkpoint, torch.device("cuda"))
    gpu = resolve_compute("cuda", "auto", training=False)
    native = torch.cuda.get_device_capability()[0] >= 8 or bool(torch.version.hip)
    assert gpu.precision == ("bf16" if native else "fp32")
    with torch.inference_mode():
        on_cpu = cpu_model([image])[0]
        with gpu.autocast():
            on_gpu = gpu_model([image.cuda()])[0]
    for output in (on_cpu, on_gpu):
        assert output["boxes"].dtype == output["scores"].dtype == torch.float32


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs (one process per GPU)")
def test_two_nccl_processes_train_with_identical_weights(tmp_path):
    data = tmp_path / "data"
    generate_dataset(data, num_images=10, width=64, height=64, chars_per_image=(2, 4), font_size=(14, 24), seed=3)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    job = run_charseg("train", str(data), *DDP_ARGS, "--batch-size", "2", "--device", "cuda", "--output-dir",
                   str(tmp_path / "two"), env=env, launcher=[*TORCHRUN, "-m", "charseg"])
    assert job.returncode == 0, job.stderr[-3000:]
    assert "x 2 processes (global batch 4)" in job.stderr
    assert "weights identical in all 2 processes" in job.stderr
    assert (tmp_path / "two" / "model_final.pth").is_file()
