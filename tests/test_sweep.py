"""charseg sweep: optuna trials as MLflow child runs of one parent, pruned per epoch, resumable."""

from __future__ import annotations

import os

import optuna
import pytest
from click.testing import CliRunner
from conftest import LIGHT_ARGS, run_cli
from mlflow.tracking import MlflowClient

from charseg.cli import cli
from charseg.sweep import STUDY_DB, STUDY_NAME

SPACE = "lr: {low: 0.001, high: 0.02, log: true}\nlr_schedule: [step, cosine]\n"


def sweep_args(data, space, out, trials: int) -> list[str]:
    return ["sweep", str(data), "--space", str(space), "--trials", str(trials), *LIGHT_ARGS, "--epochs", "2",
            "--val-fraction", "0.25", "--detections-per-img", "20", "--output-dir", str(out), "--experiment-name",
            "sweep", "--no-system-metrics"]


def test_trials_are_child_runs_of_a_parent_with_the_best_and_a_killed_sweep_goes_on(tiny_dataset, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    out = tmp_path / "sweep"
    first = run_cli(*sweep_args(tiny_dataset, space, out, 2))
    # A sweep killed while its third trial ran: optuna holds it RUNNING.
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STUDY_DB}")
    study.ask()
    again = run_cli(*sweep_args(tiny_dataset, space, out, 3), "--register-as", "swept")

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    [parent] = [r for r in runs if "charseg.sweep" in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3 and all(r.info.status == "FINISHED" for r in children)  # one parent, resumed
    assert parent.info.status == "FINISHED" and parent.data.params["space.lr_schedule"] == "['step', 'cosine']"
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{out / STUDY_DB}")
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") + states.count("PRUNED") == 3
    best = study.best_trial
    assert parent.data.tags["charseg.best_trial_run_id"] == best.user_attrs["mlflow_run_id"]
    assert float(parent.data.tags["best.lr"]) == best.params["lr"]
    assert parent.data.metrics["best/segm_AP"] == pytest.approx(best.value)
    for child in children:  # each trial ran the base settings with its own sampled ones
        assert child.data.params["backbone"] == "resnet18" and child.data.params["epochs"] == "2"
        trial = next(t for t in study.trials if t.user_attrs.get("mlflow_run_id") == child.info.run_id)
        assert float(child.data.params["lr"]) == pytest.approx(trial.params["lr"])
        assert (child.data.tags.get("charseg.stop_reason") == "pruned") == (trial.state.name == "PRUNED")
    assert "trial 2 was running when the sweep stopped: marked failed" in again
    assert f"best trial {best.number}: segm_AP" in again and "registered swept version 1" in again
    assert client.get_model_version("swept", "1").run_id == best.user_attrs["mlflow_run_id"]
    assert "sweep" in first


def test_a_space_that_cannot_be_swept_is_one_line(tiny_dataset, tmp_path):
    cases = {"lr: 0.01\n": "lr: give a list of choices or {low: L, high: H}",
             "learning_rate: [0.1, 0.2]\n": "'learning_rate' is not a setting a sweep can vary",
             "data_dir: [a, b]\n": "'data_dir' is not a setting a sweep can vary",
             "- lr\n": "a search space is a mapping of settings"}
    for text, message in cases.items():
        (tmp_path / "space.yaml").write_text(text)
        result = CliRunner().invoke(cli, sweep_args(tiny_dataset, tmp_path / "space.yaml", tmp_path / "out", 2))
        assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output
    (tmp_path / "space.yaml").write_text(SPACE)
    result = CliRunner().invoke(cli, [*sweep_args(tiny_dataset, tmp_path / "space.yaml", tmp_path / "out", 2),
                                      "--val-fraction", "0"])
    assert result.exit_code == 1 and "a sweep compares validation metrics" in result.output


def test_the_pruner_stops_a_lagging_trial_through_the_epoch_loop(tiny_dataset, tmp_path):
    from conftest import light_config

    from charseg import checkpoint as ckpt
    from charseg.sweep import PruningReporter
    from charseg.training import runner

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    leader = study.ask()
    leader.report(0.9, 1)
    study.tell(leader, 0.9)
    reporter = PruningReporter(study.ask(), "segm_AP")
    reporter.report(1, {"segm_AP": 0.1})
    assert reporter.stop is not None and reporter.stop.reason == "pruned"

    class PrunedTracker(runner.NullTracker):
        def stop_requested(self, epoch):
            return reporter.stop

    result = runner.train(light_config(tiny_dataset, tmp_path / "out", epochs=3), PrunedTracker())
    assert len(result.history) == 1
    assert ckpt.load_checkpoint(tmp_path / "out" / ckpt.FINAL_NAME, 2)["stopped"]["reason"] == "pruned"


@pytest.mark.server  # mlflow run
def test_mlflow_run_sweep_makes_the_project_run_the_parent(tiny_dataset, tmp_path):
    """Under `mlflow run` the project's run is the parent: the trials are child runs beside it,
    not attached to it again ($MLFLOW_RUN_ID)."""
    from conftest import mlflow_run

    (tmp_path / "space.yaml").write_text("lr: {low: 0.001, high: 0.02, log: true}\n")
    params = {"data_dir": tiny_dataset, "space": tmp_path / "space.yaml", "trials": 1, "epochs": 1, "weights": "none",
              "backbone": "resnet18", "fpn_channels": 32, "min_size": 64, "max_size": 64, "roi_samples": 32,
              "rpn_proposals_train": 100, "detections_per_img": 20, "warmup_iters": 2, "val_fraction": 0.25,
              "num_workers": 0, "output_dir": tmp_path / "sweep"}
    client = mlflow_run("sweep", params, "project-sweep", tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("project-sweep").experiment_id])
    [parent] = [r for r in runs if "charseg.sweep" in r.data.tags]
    assert parent.data.tags.get("mlflow.project.entryPoint") == "sweep" and parent.info.status == "FINISHED"
    assert sorted(r.data.tags.get("mlflow.parentRunId") for r in runs if r is not parent) == [parent.info.run_id]


def test_a_sweep_whose_trials_all_fail_stops_with_one_line(tiny_dataset, tmp_path):
    """Failed trials do not count towards --trials: a space where every trial diverges must end."""
    from charseg.sweep import MAX_FAILED_IN_A_ROW

    (tmp_path / "space.yaml").write_text("lr: [1000000.0]\n")  # the loss is not finite at once (test_training)
    result = CliRunner().invoke(cli, sweep_args(tiny_dataset, tmp_path / "space.yaml", tmp_path / "out", 2))
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1] == (
        f"Error: {tmp_path / 'out'}: {MAX_FAILED_IN_A_ROW} trials failed one after another (the warnings above say "
        "why); change the space or the settings the trials start from, then run the sweep again")
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'out' / STUDY_DB}")
    assert [t.state.name for t in study.trials] == ["FAIL"] * MAX_FAILED_IN_A_ROW
