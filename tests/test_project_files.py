"""MLproject and conda.yaml stay in step with the CLI and pyproject.toml; `mlflow run` works."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import click
import pytest
import yaml
from conftest import mlflow_run

from charseg.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def test_conda_env_pins_match_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert sorted(pip_deps) == sorted(pyproject)


@pytest.mark.parametrize("entry", sorted(cli.commands))
def test_mlproject_entry_point_maps_onto_its_command(entry):
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    command = spec["command"]
    if entry in ("train", "resume", "finetune"):  # under torchrun, nproc_per_node processes
        launcher = "python -m charseg.cli.torchrun --standalone --nproc-per-node {nproc_per_node} "
        assert command.startswith(launcher)
        command = "python " + command[len(launcher):]
    assert command.startswith(f"python -m charseg {entry} ")
    for name in spec["parameters"]:
        assert f"{{{name}}}" in spec["command"], f"parameter {name} is not used"
    click_command = cli.commands[entry]
    options = {opt for p in click_command.params for opt in getattr(p, "opts", [])}
    for flag in re.findall(r"(--[a-z-]+)", command):
        assert flag in options, f"{flag} is not an option of charseg {entry}"


@pytest.mark.parametrize("entry", sorted(cli.commands))
def test_mlproject_entry_point_defaults_parse(entry, tmp_path):
    """Every entry point's command with its defaults (and this folder for each required
    parameter) is accepted by the command's options: a default of "" means "not given"."""
    import shlex

    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    (tmp_path / "file.json").write_text("{}")
    files = {opt.lstrip("-").replace("-", "_") for p in cli.commands[entry].params
             if isinstance(p.type, click.Path) and not p.type.dir_okay for opt in [p.name, *p.opts]}
    required = {name: tmp_path / "file.json" if name in files or name.endswith("json") else tmp_path
                for name in spec["parameters"]}
    values = {name: (p["default"] if isinstance(p, dict) and "default" in p else required[name])
              for name, p in spec["parameters"].items()}
    command = spec["command"].split(f" -m charseg {entry} ", 1)[1].format(
        **{k: shlex.quote(str(v)) for k, v in values.items()})
    context = cli.commands[entry].make_context(entry, shlex.split(command))
    assert context.params  # parsed, every value converted by its option's type


@pytest.mark.server
def test_mlflow_run_train_entry_point(tiny_dataset, tmp_path):
    params = {"data_dir": tiny_dataset, "epochs": 1, "weights": "none", "backbone": "resnet18", "min_size": 64,
              "max_size": 64, "num_workers": 0, "roi_samples": 32, "rpn_proposals_train": 100, "warmup_iters": 2,
              "output_dir": tmp_path / "out", "nproc_per_node": 2}
    client = mlflow_run("train", params, "mlproject", tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("mlproject").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["charseg.mode"] == "train"
    assert run.data.params["data.images_used"] == "4"
    assert run.data.params["world_size"] == "2"  # two torchrun processes, one tracked run
    assert run.data.params["precision"] == "auto" and run.data.tags["charseg.precision"] == "fp32"
    assert run.data.params["data.val_images"] == "1"  # default val_fraction 0.1, at least one image
    assert "val/segm_AP" in run.data.metrics
    assert [Path(f.path).name for f in client.list_artifacts(run.info.run_id, "checkpoints")] == [
        "best.pth", "last.pth", "model_final.pth"]
    assert (tmp_path / "out" / "model_final.pth").is_file()


def test_imports_flow_down_the_layers_of_the_architecture_doc():
    """docs/ARCHITECTURE.md draws the modules (and packages, NAME/) in layers; a module imports
    only from layers below; the files of a package may import each other; only tracking/
    imports mlflow."""
    import ast

    block = (ROOT / "docs" / "ARCHITECTURE.md").read_text().split("```")[1]
    layer = {}
    for line in block.strip().splitlines():
        number, *names = line.split()
        for name in names:
            if name.endswith((".py", "/")):
                layer[name.removesuffix(".py").removesuffix("/")] = int(number)
    package = ROOT / "charseg"
    units = {p.stem: [p] for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    units.update({p.name: sorted(p.glob("*.py")) for p in package.iterdir() if (p / "__init__.py").is_file()})
    assert set(layer) == set(units), "every module and package has a layer in docs/ARCHITECTURE.md"
    for unit, files in units.items():
        top = 1 if len(files) == 1 and files[0].parent == package else 2  # the level of a `from ..x` in a package
        for path in files:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == top:
                    imported = [node.module.split(".")[0]] if node.module else [alias.name for alias in node.names]
                    for name in imported:
                        assert layer[name] > layer[unit], f"{path.relative_to(ROOT)} (layer {layer[unit]}) imports {name}"
                if isinstance(node, (ast.Import, ast.ImportFrom)) and unit != "tracking":
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    assert not any(n.split(".")[0] == "mlflow" for n in names), f"{path.name} imports mlflow"


def test_every_option_of_the_model_commands_is_in_the_training_doc():
    doc = (ROOT / "docs" / "TRAINING.md").read_text()
    for command in ("train", "resume", "finetune", "evaluate", "predict"):
        missing = [p.opts[0] for p in cli.commands[command].params if p.opts[0].startswith("--") and p.opts[0] not in doc]
        assert not missing, f"charseg {command}: {missing} not in docs/TRAINING.md"
