"""--early-stop-patience and --time-budget: the run ends after the epoch a rule stops it, with
its final model, held-out metrics and the reason; a resume keeps counting."""

from __future__ import annotations

import logging
import os

import pytest
from click.testing import CliRunner
from conftest import LIGHT_ARGS, light_config, run_cli
from mlflow.tracking import MlflowClient

from charseg import checkpoint as ckpt
from charseg.cli import cli
from charseg.errors import CharsegError
from charseg.training import runner
from charseg.training.stopping import EARLY_STOP, TIME_BUDGET

# An LR so small that the weights do not move, and GroupNorm (no running statistics): every
# epoch validates to the same metrics, so the best stays at epoch 1 and patience runs out on a
# schedule the test knows.
FROZEN = dict(lr=1e-12, norm="group")


def epochs_written(folder) -> list[str]:
    return sorted(p.name for p in folder.glob("model_epoch_*.pth"))


def test_patience_stops_the_run_with_its_final_model_and_resume_says_so(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    config = light_config(tiny_dataset, out, epochs=4, **FROZEN, val_fraction=0.25, early_stop_patience=1,
                          heldout_dir=str(tiny_dataset))
    result = runner.train(config)
    assert [int(m["epoch"]) for m in result.history] == [1, 2]
    assert result.best["epoch"] == 1 and result.heldout  # the final model was evaluated on held-out pages
    assert epochs_written(out) == ["model_epoch_001.pth", "model_epoch_002.pth"]
    final = ckpt.load_checkpoint(out / ckpt.FINAL_NAME, 2)
    assert final["epoch"] == 2 and final["stopped"]["reason"] == EARLY_STOP
    assert "no better segm_AP for 1 epoch (--early-stop-patience 1" in final["stopped"]["message"]

    with pytest.raises(runner.TrainingAlreadyComplete, match="stopped after epoch 2: no better segm_AP"):
        runner.resume(out / ckpt.FINAL_NAME)
    # Turning the rule off trains on from the stopped epoch to the run's last.
    more = runner.resume(out / ckpt.FINAL_NAME, {"early_stop_patience": 0})
    assert [int(m["epoch"]) for m in more.history][-2:] == [3, 4]
    assert "stopped" not in ckpt.load_checkpoint(out / ckpt.FINAL_NAME, 2)


def test_a_resume_keeps_the_patience_count(tiny_dataset, tmp_path):
    """Killed after epoch 1 of a run whose best is epoch 1: with patience 1 its resume trains
    epoch 2 only, as the run would have."""
    out = tmp_path / "out"
    runner.train(light_config(tiny_dataset, out, epochs=1, **FROZEN, val_fraction=0.25))
    (out / ckpt.FINAL_NAME).unlink()
    resumed = runner.resume(out / "model_epoch_001.pth", {"epochs": 4, "early_stop_patience": 1})
    assert resumed.history[-1]["epoch"] == 2 and not (out / "model_epoch_003.pth").exists()


def test_val_every_validates_every_nth_epoch_and_patience_waits_for_a_validation(tiny_dataset, tmp_path, caplog):
    """Validations at epochs 2 and 4 of 6: the best stays epoch 2, and patience 1 ends the run at
    the next validation (epoch 4), not at epoch 3, which no validation judged."""
    out = tmp_path / "out"
    config = light_config(tiny_dataset, out, epochs=6, **FROZEN, val_fraction=0.25, val_every=2,
                          early_stop_patience=1, heldout_dir=str(tiny_dataset), val_images_logged=1)

    class HeldoutEpochs(runner.NullTracker):
        epochs: list[int] = []

        def log_heldout(self, epoch, metrics, overlays):
            self.epochs.append(epoch)

    result = runner.train(config, tracker=HeldoutEpochs())
    assert HeldoutEpochs.epochs == [2, 4]  # held-out overlays come with the validations
    assert [int(m["epoch"]) for m in result.history] == [1, 2, 3, 4]
    assert [int(m["epoch"]) for m in result.history if "val_segm_AP" in m] == [2, 4]
    final = ckpt.load_checkpoint(out / ckpt.FINAL_NAME, 2)
    assert final["stopped"]["reason"] == EARLY_STOP and final["stopped"]["epoch"] == 4
    assert ckpt.load_checkpoint(out / ckpt.BEST_NAME, 2)["epoch"] == 2
    # A resume from an epoch that was not due leaves it unvalidated: the best is still epoch 2's.
    (out / ckpt.FINAL_NAME).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="charseg"):
        resumed = runner.resume(out / "model_epoch_003.pth", {"early_stop_patience": 0, "epochs": 4})
    assert [r.getMessage().split(":")[0] for r in caplog.records if "validation:" in r.getMessage()] == [
        "epoch 4 validation"]
    assert resumed.best["epoch"] == 2 and resumed.best["through_epoch"] == 4


def test_time_budget_counts_every_resume_of_the_run(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    budget = 1e-4  # minutes: spent within the first epoch
    # val_every=5: the epoch the budget ends the run after validates all the same.
    result = runner.train(light_config(tiny_dataset, out, epochs=2, time_budget=budget, val_fraction=0.25, val_every=5))
    assert len(result.history) == 1 and epochs_written(out) == ["model_epoch_001.pth"]
    assert result.best["epoch"] == 1 and "val_segm_AP" in result.history[0]
    final = ckpt.load_checkpoint(out / ckpt.FINAL_NAME, 2)
    assert final["stopped"]["reason"] == TIME_BUDGET and final["train_seconds"] > budget * 60
    # The epoch's own file, as a run killed before its final model: the budget is still spent,
    # so the resume writes the final model without training another epoch.
    (out / ckpt.FINAL_NAME).unlink()
    resumed = runner.resume(out / "model_epoch_001.pth")
    assert len(resumed.history) == 1 and epochs_written(out) == ["model_epoch_001.pth"]
    assert ckpt.load_checkpoint(out / ckpt.FINAL_NAME, 2)["stopped"]["reason"] == TIME_BUDGET
    # A larger budget on resume trains on.
    more = runner.resume(out / ckpt.FINAL_NAME, {"time_budget": 60.0})
    assert [int(m["epoch"]) for m in more.history] == [1, 2]


def test_patience_without_validation_is_one_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(CharsegError, match="--early-stop-patience compares validation metrics"):
        runner.train(light_config(tiny_dataset, tmp_path / "out", epochs=3, early_stop_patience=1))
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--early-stop-patience", "1",
                                      "--output-dir", str(tmp_path / "cli")])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1].startswith("Error: --early-stop-patience compares validation metrics")


def test_a_stopped_run_ends_finished_with_its_reason_as_tags(tiny_dataset, tmp_path):
    output = run_cli("train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "3", "--time-budget", "0.0001",
                     "--output-dir", str(tmp_path / "out"), "--no-system-metrics")
    assert "stopping after epoch 1 of 3: the time budget is spent" in output
    run_id = output.split("MLflow run ")[1].split()[0]
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["charseg.stop_reason"] == TIME_BUDGET and run.data.metrics["stopped_epoch"] == 1
    assert run.data.params["time_budget"] == "0.0001"
