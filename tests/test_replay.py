"""train --config (replay a logged config from a file, a checkpoint or a run) and --print-config."""

from __future__ import annotations

import json
import os

import yaml
from click.testing import CliRunner
from conftest import LIGHT_ARGS, run_cli
from mlflow.tracking import MlflowClient

from charseg.cli import cli

# Params a replayed run takes from this run, not from the config it replays.
OWN = {"output_dir", "data_dir"}


def run_of(output: str):
    run_id = output.split("MLflow run ")[1].split()[0]
    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(run_id)


def settings(run) -> dict[str, str]:
    return {k: v for k, v in run.data.params.items() if not k.startswith(("model.", "data.")) and k not in OWN}


def all_runs() -> list:
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_print_config_shows_the_fitted_architecture_and_trains_nothing(tiny_dataset, tmp_path):
    before = len(all_runs())
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "7", "--output-dir",
                                      str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    printed = yaml.safe_load(result.stdout)
    assert printed["config"]["epochs"] == 7 and printed["config"]["anchor_sizes"] is None  # asked: fit them
    assert len(printed["model_spec"]["anchor_sizes"]) == 5 and printed["model_spec"]["detections_per_img"] >= 500
    assert not (tmp_path / "out").exists()
    assert len(all_runs()) == before


def test_a_printed_config_replays_with_the_options_given_winning(tiny_dataset, tmp_path):
    printed = CliRunner().invoke(cli, ["train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "1", "--lr", "0.003",
                                       "--lr-schedule", "cosine", "--print-config"]).stdout
    (tmp_path / "run.yaml").write_text(printed)
    output = run_cli("train", str(tiny_dataset), "--config", str(tmp_path / "run.yaml"), "--lr", "0.004",
                     "--output-dir", str(tmp_path / "out"), "--no-system-metrics")
    run = run_of(output)
    assert run.data.params["lr"] == "0.004" and run.data.params["lr_schedule"] == "cosine"
    assert run.data.params["backbone"] == "resnet18" and run.data.params["epochs"] == "1"
    assert run.data.tags["charseg.config_source"] == str((tmp_path / "run.yaml").resolve())


def test_a_run_replays_from_its_id_and_from_its_checkpoint(tiny_dataset, tmp_path):
    first = run_of(run_cli("train", str(tiny_dataset), *LIGHT_ARGS, "--epochs", "1", "--augment", "--seed", "7",
                           "--output-dir", str(tmp_path / "first"), "--no-system-metrics"))
    again = run_of(run_cli("train", str(tiny_dataset), "--config", first.info.run_id, "--output-dir",
                           str(tmp_path / "again"), "--no-system-metrics"))
    assert settings(again) == settings(first)
    assert again.data.tags["charseg.config_source"] == first.info.run_id
    from_file = yaml.safe_load(CliRunner().invoke(cli, ["train", str(tiny_dataset), "--config",
                                                        str(tmp_path / "first" / "model_final.pth"), "--weights",
                                                        "none", "--print-config"]).stdout)
    assert from_file["config"]["seed"] == 7 and from_file["config"]["augment"] is True


def test_a_config_that_cannot_be_replayed_is_one_line(tiny_dataset, tmp_path):
    cases = {"unknown.yaml": ("lr: 0.01\nlearning_rate: 0.1\n", "unknown settings ['learning_rate']"),
             "typed.json": (json.dumps({"config": {"epochs": "many"}}), "epochs must be int, got 'many'"),
             "list.yaml": ("- 1\n- 2\n", "not a charseg config"),
             "broken.yaml": ("lr: [0.01\n", "cannot read it as a YAML or JSON config")}
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        result = CliRunner().invoke(cli, ["train", str(tiny_dataset), "--config", str(tmp_path / name)])
        assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
        assert result.output.startswith(f"Error: {tmp_path / name}") and message in result.output, result.output
    result = CliRunner().invoke(cli, ["train", str(tiny_dataset), "--config", "0" * 32])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"cannot read runs:/{'0' * 32}/config/config.json" in result.output
