"""Training modes on CPU with a light config: resume exactness, fine-tune, checkpoints, failures."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from conftest import light_config

from charseg import checkpoint as ckpt
from charseg.cli import cli
from charseg.data.generate import generate_dataset
from charseg.config import TrainConfig
from charseg.errors import CharsegError
from charseg.model.architecture import fit_limits
from charseg.training import runner


def epoch_losses(result: runner.RunResult) -> list[float]:
    return [m["loss"] for m in result.history]


@pytest.mark.slow
def test_resume_continues_exactly(tiny_dataset, tmp_path):
    # The straight run loads with worker processes, the split one without: batches and
    # random streams must not depend on that either.
    straight = runner.train(light_config(tiny_dataset, tmp_path / "straight", epochs=4, num_workers=2))
    first_half = runner.train(light_config(tiny_dataset, tmp_path / "split", epochs=2))
    resumed = runner.resume(first_half.checkpoints[-1], {"epochs": 4})

    assert resumed.start_epoch == 3
    assert [m["epoch"] for m in resumed.history] == [1.0, 2.0, 3.0, 4.0]
    assert epoch_losses(resumed) == epoch_losses(straight)  # bit-exact, not approximately
    a = ckpt.load_checkpoint(straight.final_checkpoint)["model"]
    b = ckpt.load_checkpoint(resumed.final_checkpoint)["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "split").glob("*.pth")) == [
        "model_epoch_001.pth", "model_epoch_002.pth", "model_epoch_003.pth", "model_epoch_004.pth",
        "model_final.pth"]


def test_same_seed_same_losses(tiny_dataset, tmp_path):
    a = runner.train(light_config(tiny_dataset, tmp_path / "a", epochs=1))
    b = runner.train(light_config(tiny_dataset, tmp_path / "b", epochs=1))
    c = runner.train(light_config(tiny_dataset, tmp_path / "c", epochs=1, seed=7))
    assert epoch_losses(a) == epoch_losses(b)
    assert epoch_losses(a) != epoch_losses(c)


def test_finetune_starts_at_epoch_one_with_a_fifth_of_the_lr(tiny_dataset, tmp_path):
    source = runner.train(light_config(tiny_dataset, tmp_path / "src", epochs=2, lr=0.004))
    tuned = runner.finetune(source.final_checkpoint, {"data_dir": str(tiny_dataset), "epochs": 1,
                                                      "output_dir": str(tmp_path / "ft"), "num_workers": 0})
    assert tuned.start_epoch == 1
    state = ckpt.load_checkpoint(tmp_path / "ft" / "model_epoch_001.pth")
    assert state["epoch"] == 1
    assert state["config"]["mode"] == "finetune"
    # A fresh optimizer: its base LR is 0.2x the source's, and it holds one epoch of steps only.
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == pytest.approx(0.2 * 0.004)
    assert state["scheduler"]["last_epoch"] == 1
    source_weights = ckpt.load_checkpoint(source.final_checkpoint)["model"]
    assert state["config"]["backbone"] == "resnet18" and state["model_spec"]["min_size"] == 64
    assert any(not torch.equal(source_weights[k], v) for k, v in state["model"].items())


class SplitsSeen(runner.NullTracker):
    def start(self, config, report, spec, splits):
        self.splits = splits


def test_finetune_replays_pages_of_the_source_domain_beside_the_new_ones(light_checkpoint, tiny_dataset, tmp_path,
                                                                          caplog):
    """--replay-dir: --replay-pages pages of another dataset, chosen by the seed, train beside
    DATA_DIR's (validation stays DATA_DIR's); a folder of fewer pages gives all, said so."""
    new = tmp_path / "new"
    generate_dataset(new, num_images=3, width=64, height=64, chars_per_image=(2, 3), seed=9)
    base = {"data_dir": str(new), "epochs": 1, "num_workers": 0, "val_fraction": 0.0, "replay_dir": str(tiny_dataset)}
    seen = [SplitsSeen() for _ in range(3)]
    for tracker, (seed, pages) in zip(seen, [(1, 2), (1, 2), (5, 10)]):
        runner.finetune(light_checkpoint, {**base, "seed": seed, "replay_pages": pages,
                                           "output_dir": str(tmp_path / f"ft{seed}{pages}")}, tracker=tracker)
    first, again, every = (t.splits for t in seen)
    assert len(first.train) == 3 and all(s.image_path.parent.parent == new for s in first.train)
    assert len(first.replay) == 2 and all(s.image_path.parent.parent == tiny_dataset for s in first.replay)
    assert [s.name for s in first.replay] == [s.name for s in again.replay]  # the seed chooses
    assert len(every.replay) == 4 and "it holds 4, fewer than --replay-pages 10" in caplog.text
    assert len(first.training) == 5 and not first.val


def test_a_replay_folder_without_usable_pages_is_refused(light_checkpoint, tiny_dataset, tmp_path):
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "annotations").mkdir()
    with pytest.raises(CharsegError, match="empty: no usable image .*run `charseg validate-data"):
        runner.finetune(light_checkpoint, {"data_dir": str(tiny_dataset), "epochs": 1, "num_workers": 0,
                                           "replay_dir": str(tmp_path / "empty"), "output_dir": str(tmp_path / "o")})
    result = CliRunner().invoke(cli, ["finetune", str(light_checkpoint), str(tiny_dataset), "--replay-pages", "5"])
    assert result.exit_code == 2 and "--replay-pages counts pages of --replay-dir" in result.output


def test_unversioned_saves_overwrite_last(tiny_dataset, tmp_path):
    runner.train(light_config(tiny_dataset, tmp_path, epochs=2, save_versioned=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LOCK_NAME, "last.pth", "model_final.pth"]
    assert ckpt.load_checkpoint(tmp_path / "last.pth")["epoch"] == 2


def test_no_save_every_epoch_still_writes_final(tiny_dataset, tmp_path):
    runner.train(light_config(tiny_dataset, tmp_path, epochs=1, save_every_epoch=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.LOCK_NAME, "model_final.pth"]


def test_resume_of_finished_run_says_so(tiny_dataset, tmp_path):
    done = runner.train(light_config(tiny_dataset, tmp_path, epochs=1))
    with pytest.raises(runner.TrainingAlreadyComplete, match="already finished all 1 epochs.*--epochs"):
        runner.resume(done.final_checkpoint)


def test_resume_refuses_to_change_the_maths(tiny_dataset, tmp_path):
    done = runner.train(light_config(tiny_dataset, tmp_path, epochs=1))
    with pytest.raises(CharsegError, match=r"cannot change \['lr'\]"):
        runner.resume(done.final_checkpoint, {"lr": 1.0, "epochs": 3})


def test_non_finite_loss_stops_with_components_and_images(tiny_dataset, tmp_path):
    runner.train(light_config(tiny_dataset, tmp_path, epochs=1))
    good = (tmp_path / "model_epoch_001.pth").read_bytes()
    with pytest.raises(CharsegError) as info:
        runner.train(light_config(tiny_dataset, tmp_path, epochs=3, lr=1e6, clip_grad_norm=0, warmup_iters=0))
    message = str(info.value)
    assert "non-finite loss at epoch 1" in message and "loss_mask=" in message
    batch = message.split("batch images: ")[1].split(".")[0].split(", ")
    assert len(batch) == 2 and set(batch) <= {"00001", "00002", "00003", "00004"}
    assert (tmp_path / "model_epoch_001.pth").read_bytes() == good


def test_limits_left_at_zero_fit_the_densest_image():
    dense = fit_limits(TrainConfig(), 1700)
    assert (dense["detections_per_img"], dense["rpn_proposals_train"], dense["rpn_proposals_test"]) == (2100, 4200, 4200)
    sparse = fit_limits(TrainConfig(), 20)  # torchvision's proposal counts, charseg's 500 detections
    assert (sparse["detections_per_img"], sparse["rpn_proposals_train"], sparse["rpn_proposals_test"]) == (500, 2000, 1000)
    given = fit_limits(TrainConfig(detections_per_img=300, rpn_proposals_test=50), 1700)
    assert (given["detections_per_img"], given["rpn_proposals_train"], given["rpn_proposals_test"]) == (300, 2000, 50)


def test_runs_save_the_fitted_limits_and_finetune_refits_them(tiny_dataset, tmp_path):
    source = runner.train(light_config(tiny_dataset, tmp_path / "src", epochs=1, detections_per_img=1500,
                                       rpn_proposals_train=0))
    state = ckpt.load_checkpoint(source.final_checkpoint)
    assert state["model_spec"]["detections_per_img"] == state["config"]["detections_per_img"] == 1500
    assert state["model_spec"]["rpn_proposals_train"] == 3000  # 2 x detections
    assert state["config"]["rpn_proposals_train"] is None  # the config keeps the request: fit
    tuned = runner.finetune(source.final_checkpoint, {"data_dir": str(tiny_dataset), "epochs": 1,
                                                      "output_dir": str(tmp_path / "ft"), "num_workers": 0})
    state = ckpt.load_checkpoint(tuned.final_checkpoint)
    assert state["model_spec"]["detections_per_img"] == 500  # fitted to the (sparse) new data
    assert state["model_spec"]["rpn_proposals_test"] == 1000


def test_last_epoch_is_written_once_and_final_is_its_hard_link(tiny_dataset, tmp_path):
    result = runner.train(light_config(tiny_dataset, tmp_path, epochs=1))
    assert result.final_checkpoint.stat().st_ino == (tmp_path / "model_epoch_001.pth").stat().st_ino


@pytest.mark.slow
def test_checkpoints_of_older_releases_still_resume_and_finetune(tiny_dataset, tmp_path):
    # Before ModelSpec was the only home of the architecture, a checkpoint's config held the
    # resolved anchor sizes as text and the fitted limits as numbers.
    source = runner.train(light_config(tiny_dataset, tmp_path / "src", epochs=1))
    state = ckpt.load_checkpoint(source.final_checkpoint)
    spec = state["model_spec"]
    state["config"].update(anchor_sizes=",".join(map(str, spec["anchor_sizes"])),
                           detections_per_img=spec["detections_per_img"], rpn_proposals_test=0)
    old = ckpt.save_checkpoint(state, tmp_path / "old" / "model_epoch_001.pth")
    resumed = runner.resume(old, {"epochs": 2})
    assert ckpt.load_checkpoint(resumed.final_checkpoint)["model_spec"] == spec
    tuned = runner.finetune(old, {"data_dir": str(tiny_dataset), "epochs": 1, "output_dir": str(tmp_path / "ft"),
                                  "num_workers": 0})
    assert ckpt.load_checkpoint(tuned.final_checkpoint)["model_spec"]["anchor_sizes"] == spec["anchor_sizes"]


@pytest.mark.slow
def test_group_norm_cosine_and_augmentation_resume_exactly(tiny_dataset, tmp_path):
    recipe = dict(norm="group", fpn_channels=64, lr_schedule="cosine", augment=True, epochs=3)
    straight = runner.train(light_config(tiny_dataset, tmp_path / "straight", num_workers=2, **recipe))
    state = ckpt.load_checkpoint(tmp_path / "straight" / "model_epoch_001.pth")
    assert state["model_spec"]["norm"] == "group" and state["model_spec"]["fpn_channels"] == 64
    # Resumed without loader workers, the straight run had two: augmentation must not care.
    resumed = runner.resume(tmp_path / "straight" / "model_epoch_001.pth",
                            {"epochs": 3, "num_workers": 0, "output_dir": str(tmp_path / "resumed")})
    assert epoch_losses(resumed) == epoch_losses(straight)
    a = ckpt.load_checkpoint(straight.final_checkpoint)["model"]
    b = ckpt.load_checkpoint(resumed.final_checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [m["lr"] for m in straight.history]
    assert lrs[0] > lrs[1] > lrs[2] == pytest.approx(0.0, abs=1e-12)  # the cosine reaches 0 at the run's end


class RecordingTracker(runner.NullTracker):
    def __init__(self):
        self.heldout = []

    def log_heldout(self, epoch, metrics, overlays):
        self.heldout.append((epoch, metrics, [name for name, _ in overlays]))


@pytest.mark.slow
def test_heldout_pages_are_drawn_every_epoch_and_evaluated_after_the_last(tiny_dataset, tmp_path):
    tracker = RecordingTracker()
    result = runner.train(light_config(tiny_dataset, tmp_path, epochs=2, heldout_dir=str(tiny_dataset),
                                       val_images_logged=2), tracker)
    assert [(epoch, metrics is None, names) for epoch, metrics, names in tracker.heldout] == [
        (1, True, ["00001", "00002"]), (2, False, ["00001", "00002"])]
    assert tracker.heldout[-1][1] == result.heldout and "segm_AP50" in result.heldout


class CrashingTracker(runner.NullTracker):
    """Raises (as a SIGKILL would stop the process) once epoch `crash_epoch`'s checkpoint is saved."""

    def __init__(self, crash_epoch):
        self.crash_epoch, self.validated = crash_epoch, []

    def log_epoch(self, epoch, metrics):
        if epoch == self.crash_epoch:
            raise RuntimeError("killed")

    def log_validation(self, epoch, metrics, overlays):
        self.validated.append(epoch)


@pytest.mark.slow
def test_resume_finishes_a_last_epoch_killed_before_its_final_model(tiny_dataset, tmp_path):
    """Killed after the last epoch's checkpoint, before its validation, best.pth and
    model_final.pth: resume does what the epoch left undone instead of saying "finished"."""
    recipe = dict(epochs=2, val_fraction=0.5, heldout_dir=str(tiny_dataset))
    straight = runner.train(light_config(tiny_dataset, tmp_path / "straight", **recipe))
    crash = CrashingTracker(crash_epoch=2)
    with pytest.raises(RuntimeError, match="killed"):
        runner.train(light_config(tiny_dataset, tmp_path / "crashed", **recipe), crash)
    assert crash.validated == [1] and not (tmp_path / "crashed" / ckpt.FINAL_NAME).exists()

    resumer = CrashingTracker(crash_epoch=None)
    finished = runner.resume(tmp_path / "crashed" / "model_epoch_002.pth", tracker=resumer)
    assert resumer.validated == [2] and epoch_losses(finished) == epoch_losses(straight)
    assert finished.best == straight.best and finished.heldout == straight.heldout
    final = ckpt.load_checkpoint(tmp_path / "crashed" / ckpt.FINAL_NAME)
    assert final["epoch"] == 2
    assert final["model"].keys() == straight_model(straight).keys()
    assert all(torch.equal(final["model"][k], v) for k, v in straight_model(straight).items())
    best = ckpt.load_checkpoint(tmp_path / "crashed" / ckpt.BEST_NAME)["best"]
    assert best == ckpt.load_checkpoint(tmp_path / "straight" / ckpt.BEST_NAME)["best"]
    # Now the epoch is complete.
    with pytest.raises(runner.TrainingAlreadyComplete):
        runner.resume(tmp_path / "crashed" / "model_epoch_002.pth")


def straight_model(result):
    return ckpt.load_checkpoint(result.final_checkpoint)["model"]


def test_ctrl_c_while_best_is_written_still_reports_the_validation(tiny_dataset, tmp_path, monkeypatch):
    import os
    import signal

    real_save = ckpt.save_checkpoint

    def save_and_interrupt(state, path):
        if path.name == ckpt.BEST_NAME:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C arrives mid-write
        return real_save(state, path)

    monkeypatch.setattr(ckpt, "save_checkpoint", save_and_interrupt)
    tracker = CrashingTracker(crash_epoch=None)
    with pytest.raises(KeyboardInterrupt):
        runner.train(light_config(tiny_dataset, tmp_path, epochs=2, val_fraction=0.5), tracker)
    assert tracker.validated == [1]  # logged before stopping
    assert ckpt.load_checkpoint(tmp_path / ckpt.BEST_NAME)["best"]["epoch"] == 1


class _FailingModel(torch.nn.Module):
    """Raises ERROR in the forward pass, or in the backward pass with BACKWARD."""

    def __init__(self, error: Exception, backward: bool = False):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.error, self.backward = error, backward

    def forward(self, images, targets):
        if not self.backward:
            raise self.error
        error = self.error

        class Fails(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, grad):
                raise error

        return {"loss_a": Fails.apply(self.weight).sum()}


def _one_epoch(model: torch.nn.Module) -> None:
    from charseg.training.engine import train_one_epoch

    batch = ([torch.zeros(3, 8, 8)] * 2, [{}, {}], ("00003", "00004"))
    train_one_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), [batch, batch], torch.device("cpu"), 2,
                    steps_per_epoch=2)


@pytest.mark.parametrize("error, backward", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 1125899906842624 bytes.\nmore"), False),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
])
def test_running_out_of_memory_names_the_step_its_images_and_the_options_that_use_less(error, backward):
    from charseg.training.engine import TrainingOutOfMemoryError

    with pytest.raises(TrainingOutOfMemoryError) as info:
        _one_epoch(_FailingModel(error, backward))
    message = str(info.value)
    assert message.startswith("out of memory at epoch 2, step 3 (batch images: 00003, 00004): ")
    assert str(error).splitlines()[0] in message and "\n" not in message  # the cause's first line only
    assert "--recompute-stages N" in message and "--batch-size" in message and info.value.__cause__ is error


def test_other_errors_in_a_step_pass_unchanged():
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as info:
        _one_epoch(_FailingModel(error))
    assert info.value is error
