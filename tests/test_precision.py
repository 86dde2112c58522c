"""--precision: bf16 autocast on the CPU, float32 where it matters, exact resume, every command."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from conftest import LIGHT_ARGS, light_config

from charseg import checkpoint as ckpt
from charseg import precision as precision_module
from charseg.cli import cli
from charseg.data.dataset import scan_dataset
from charseg.data.images import load_image_rgb
from charseg.data.loading import image_to_tensor
from charseg.inference.predict import load_model_for_inference
from charseg.model.architecture import resolve_spec
from charseg.model.build import build_model
from charseg.precision import DTYPES, Compute, autocast, native_bf16, resolve
from charseg.training import runner


@pytest.mark.parametrize("command", ["train", "resume", "finetune", "evaluate", "predict"])
def test_every_command_takes_precision(command):
    text = CliRunner().invoke(cli, [command, "--help"]).output
    inference = command in ("evaluate", "predict")  # int8: inference on the CPU (tests/test_int8.py)
    assert ("--precision [auto|fp32|bf16|fp16|int8]" if inference else "--precision [auto|fp32|bf16|fp16]") in text


def test_fp16_on_a_cpu_is_one_clear_line(tiny_dataset, tmp_path):
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "1", "--precision", "fp16",
                                      "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "Error: --precision fp16 needs a CUDA device" in result.output
    assert "Traceback" not in result.output


def test_auto_is_float32_in_training_and_follows_the_cpu_at_inference(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's answer on a GPU machine too
    cpu = torch.device("cpu")
    assert resolve("auto", cpu, training=True)[0] == "fp32"
    native, how = native_bf16(cpu)
    assert resolve("auto", cpu, training=False)[0] == ("bf16" if native else "fp32")
    assert ("CPU flags" in how) == native
    for command in ("evaluate", "predict"):  # --help says what auto picks on the machine showing it
        text = " ".join(CliRunner().invoke(cli, [command, "--help"]).output.split())
        assert f"On this machine auto is {'bf16' if native else 'fp32'} ({how})." in text


@pytest.mark.parametrize(("capability", "chosen"), [((7, 0), "fp32"), ((7, 5), "fp32"), ((8, 0), "bf16"),
                                                    ((9, 0), "bf16")])
def test_auto_on_cuda_picks_bf16_only_where_the_gpu_computes_it(monkeypatch, capability, chosen):
    """V100 / T4 (7.x) only emulate bfloat16, though torch.cuda.is_bf16_supported() says yes there."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    precision, why = resolve("auto", torch.device("cuda", 1), training=False)
    assert precision == chosen
    assert f"compute capability {capability[0]}.{capability[1]}" in why
    assert resolve("auto", torch.device("cuda"), training=True)[0] == "fp32"
    assert resolve("bf16", torch.device("cuda"), training=False)[0] == "bf16"  # asked for: emulated or not


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_bf16_where_the_cpu_only_emulates_it_runs_as_asked_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "_warned_emulated", set())
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: [])
    cpu = torch.device("cpu")
    assert resolve("bf16", cpu, training=True) == ("bf16", "asked for; emulated: no amx_bf16 / avx512_bf16 CPU flag")
    assert resolve("bf16", cpu, training=False)[0] == "bf16"
    assert _warnings(caplog) == ["--precision bf16: no amx_bf16 / avx512_bf16 CPU flag: bfloat16 runs emulated, "
                                 "several times slower than float32; --precision fp32 is the fast choice on this "
                                 "device"]
    caplog.clear()
    monkeypatch.setattr(precision_module, "cpu_bf16_flags", lambda: ["avx512_bf16"])
    assert resolve("bf16", cpu, training=True) == ("bf16", "asked for")
    assert _warnings(caplog) == []


def test_bf16_on_a_gpu_that_only_emulates_it_points_to_fp16(monkeypatch, caplog):
    monkeypatch.setattr(precision_module, "_warned_emulated", set())
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert resolve("bf16", torch.device("cuda"), training=True)[0] == "bf16"
    assert _warnings(caplog) == ["--precision bf16: Tesla T4 (compute capability 7.5) only emulates bfloat16: "
                                 "bfloat16 runs emulated, no faster than float32; --precision fp16 is the fast "
                                 "choice on this device"]


def _tiny_model(tiny_dataset):
    samples = scan_dataset(tiny_dataset).samples
    spec = resolve_spec(light_config(tiny_dataset, "unused"), samples, samples)
    torch.manual_seed(0)
    return build_model(spec).eval(), samples


@pytest.mark.parametrize("precision", ["bf16", "fp16"])  # fp16 is CUDA-only; the CPU's autocast has its numerics
def test_autocast_keeps_anchors_decoding_and_outputs_in_float32_and_close_to_fp32(tiny_dataset, precision):
    dtype = DTYPES[precision]
    model, samples = _tiny_model(tiny_dataset)
    images = [image_to_tensor(load_image_rgb(s.image_path)) for s in samples[:2]]
    boxes = [torch.as_tensor(s.polygons[0]).float() for s in samples[:2]]
    boxes = [torch.stack([p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()])[None] for p in boxes]
    with torch.inference_mode():
        batch, _ = model.transform(images)
        features = model.backbone(batch.tensors)
        probs32 = model.roi_heads.mask_logits(features, boxes, batch.image_sizes).sigmoid()
        with torch.autocast("cpu", dtype=dtype):
            features16 = model.backbone(batch.tensors)
            assert features16["0"].dtype == dtype  # the convolutions do run in the lower precision
            anchors = model.rpn.anchor_generator(batch, list(features16.values()))
            probs16 = model.roi_heads.mask_logits(features16, boxes, batch.image_sizes).sigmoid()
        assert anchors[0].dtype == torch.float32
        assert probs16.dtype == torch.float32
        # Random weights (large, unnormalised logits) are bf16's worst case: measured mean 0.007,
        # 99th percentile 0.09; a trained model's scores: docs/BENCHMARKS.md.
        difference = (probs16 - probs32).abs().flatten()
        assert difference.mean() < 0.02 and difference.quantile(0.99) < 0.15
        with autocast(precision, "cpu"):
            outputs = model(images)
    for output in outputs:
        assert output["boxes"].dtype == output["scores"].dtype == output["box_masks"].dtype == torch.float32


@pytest.mark.slow
def test_bf16_training_resumes_exactly_and_keeps_its_precision(tiny_dataset, tmp_path):
    straight = runner.train(light_config(tiny_dataset, tmp_path / "straight", epochs=2, precision="bf16"))
    half = runner.train(light_config(tiny_dataset, tmp_path / "half", epochs=1, precision="bf16"))
    resumed = runner.resume(half.checkpoints[-1], {"epochs": 2})
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in straight.history]
    a = ckpt.load_checkpoint(straight.final_checkpoint)
    b = ckpt.load_checkpoint(resumed.final_checkpoint)
    assert b["config"]["precision"] == "bf16"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(v.dtype != torch.bfloat16 for v in b["model"].values())  # checkpoints stay float32
    fp32 = runner.train(light_config(tiny_dataset, tmp_path / "fp32", epochs=1))
    assert ckpt.load_checkpoint(fp32.final_checkpoint)["config"]["precision"] == "fp32"  # auto in training

    # The registered model's pyfunc takes the precision per call.
    import pandas as pd

    from charseg.inference.serving import CharsegPredictor

    predictor = CharsegPredictor(str(fp32.final_checkpoint), device="cpu", precision="fp32")
    page = {"image": [(tiny_dataset / "images" / "00001.png").read_bytes()]}
    for precision in ("fp32", "bf16", "auto"):
        frame = predictor.predict(pd.DataFrame(page), params={"precision": precision, "score_threshold": 0.0})
        assert list(frame.columns) == ["image_id", "score", "box", "polygon"]
    assert predictor.compute.precision == "fp32"  # auto: the precision the predictor was loaded with
    # A scoring server may call from several threads: each call keeps its own threshold and precision.
    from concurrent.futures import ThreadPoolExecutor

    calls = [{"precision": "fp32", "score_threshold": 0.0}, {"precision": "bf16", "score_threshold": 0.3}] * 4
    alone = [predictor.predict(pd.DataFrame(page), params=c) for c in calls]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda c: predictor.predict(pd.DataFrame(page), params=c), calls))
    assert all(a.equals(t) for a, t in zip(alone, together))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        predictor.predict(pd.DataFrame(page), params={"precision": "fp16"})



@pytest.mark.slow
def test_fp16_loss_scaler_is_in_each_checkpoint_and_resume_stays_exact(tiny_dataset, tmp_path, recwarn):
    """fp16 runs on CUDA only; its loss-scaler path (scale, unscale before clipping, skip and back
    off on inf gradients, state in the checkpoint) runs here with the CPU's GradScaler and float16
    autocast. One page per step on two pages, a narrow FPN: float16 convolutions' backward on a CPU
    is about 60x float32's, so the test makes few and small ones. The scaler backs off from 65536
    in epochs 1 and 2, then steps."""
    import shutil

    pages = tmp_path / "pages"
    for folder, suffix in (("images", "png"), ("annotations", "csv")):
        (pages / folder).mkdir(parents=True)
        for name in ("00001", "00002"):
            shutil.copy(tiny_dataset / folder / f"{name}.{suffix}", pages / folder)
    settings = dict(precision="fp16", batch_size=1, fpn_channels=32)
    # The resolver refuses fp16 on a CPU: the test passes the compute a GPU command would get.
    cpu_fp16 = Compute(torch.device("cpu"), "fp16")
    straight = runner.train(light_config(pages, tmp_path / "straight", epochs=3, **settings), compute=cpu_fp16)
    # As if killed after epoch 1: resume its checkpoint (elsewhere, beside the finished run).
    resumed = runner.resume(straight.checkpoints[0], {"output_dir": str(tmp_path / "resumed")}, compute=cpu_fp16)
    first = ckpt.load_checkpoint(straight.checkpoints[0])
    a = ckpt.load_checkpoint(straight.final_checkpoint)
    b = ckpt.load_checkpoint(resumed.final_checkpoint)
    assert first["scaler"]["scale"] < 65536.0  # backed off: steps were skipped ...
    assert not all(torch.equal(first["model"][k], a["model"][k]) for k in a["model"])  # ... and then taken
    assert b["config"]["precision"] == "fp16"
    assert b["scaler"] == a["scaler"]
    assert [m["loss"] for m in resumed.history] == [m["loss"] for m in straight.history]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(v.dtype == torch.float32 for v in b["model"].values() if v.is_floating_point())
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]  # skipped steps are by design

def test_roi_align_reads_float32_features_cast_once_while_the_mask_head_runs_bf16(tiny_dataset, monkeypatch):
    """torchvision's roi_align has no bfloat16 CPU kernel: under autocast it would cast every
    feature level to float32 on every call (each mask chunk). The RoI heads cast them once."""
    from charseg.model import heads as polygon_heads

    monkeypatch.setattr(polygon_heads, "MASK_CHUNK", 2)  # several chunks on a tiny page
    model, samples = _tiny_model(tiny_dataset)
    pooled, head_dtypes = [], []
    model.roi_heads.mask_roi_pool.register_forward_pre_hook(
        lambda m, args: pooled.append({k: (v.dtype, v.data_ptr()) for k, v in args[0].items()}))
    model.roi_heads.mask_head.register_forward_hook(lambda m, i, out: head_dtypes.append(out.dtype))
    with torch.inference_mode(), autocast("bf16", "cpu"):
        [output] = model([image_to_tensor(load_image_rgb(samples[0].image_path))])
    assert len(output["boxes"]) > 2 and len(pooled) == -(-len(output["boxes"]) // 2)
    assert all(dtype == torch.float32 for call in pooled for dtype, _ in call.values())
    assert all(call == pooled[0] for call in pooled)  # the same float32 tensors for every chunk
    assert set(head_dtypes) == {torch.bfloat16}  # the mask head's convolutions do run in bf16


@pytest.mark.parametrize("capability, layout", [("avx2", "contiguous_format"), ("default", "channels_last")])
def test_training_runs_nchw_where_the_cpu_kernels_stop_at_avx2(capability, layout):
    """oneDNN's channels-last weight gradient is slow with AVX2 kernels only: training there runs
    NCHW; inference, and training elsewhere, channels-last (torch's own CPU capability, which
    ATEN_CPU_CAPABILITY lowers, decides)."""
    code = ("import torch; from charseg.precision import resolve_compute; "
            "print(resolve_compute('cpu', 'fp32', training=True).memory_format, "
            "resolve_compute('cpu', 'fp32', training=False).memory_format)")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [f"torch.{layout}", "torch.channels_last"]


@pytest.mark.slow
def test_a_run_trains_in_the_layout_its_compute_names_and_learns_alike(tiny_dataset, tmp_path):
    """fit moves the model into Compute.memory_format (its checkpoints keep the layout, and
    load channels-last for inference); the two layouts compute the same losses up to float
    rounding."""
    runs = {fmt: runner.train(light_config(tiny_dataset, tmp_path / str(fmt), epochs=1),
                              compute=Compute(torch.device("cpu"), "fp32", memory_format=fmt))
            for fmt in (torch.contiguous_format, torch.channels_last)}
    for fmt, run in runs.items():
        weight = ckpt.load_checkpoint(run.final_checkpoint)["model"]["backbone.body.layer1.0.conv1.weight"]
        assert weight.is_contiguous(memory_format=fmt), fmt
    nchw, channels_last = (runs[f].history[0]["loss"] for f in (torch.contiguous_format, torch.channels_last))
    assert nchw == pytest.approx(channels_last, rel=1e-3)
    model, _, _ = load_model_for_inference(runs[torch.contiguous_format].final_checkpoint, torch.device("cpu"))
    assert model.backbone.body.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)
