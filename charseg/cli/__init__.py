"""The `charseg` command: the group (the one error boundary) and its commands, each a thin
click function that parses options and calls the layers below (training/, inference/, data/,
tracking/ through jobs.py).

| module | its commands |
| --- | --- |
| `options.py` | the option types (bounded by config.BOUNDS) and the option tables commands share |
| `training.py` | train, resume, finetune |
| `models.py` | evaluate, predict, export, register, sync |
| `data.py` | validate-data, generate, import-coco, export-coco |
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import click

from ..errors import CharsegError, Stopped
from .data import export_coco_command, generate_command, import_coco_command, validate_data_command
from .models import evaluate_command, export_command, predict_command, register_command, sync_command
from .options import FiniteFloat  # noqa: F401  (charseg.cli.FiniteFloat: every float option's type)
from .training import finetune_command, resume_command, sweep_command, train_command


class CharsegGroup(click.Group):
    """The one error boundary: a CharsegError from any command is printed as one line
    (`Error: ...`, exit 1), never a traceback; a command stopped by SIGTERM says so in one line
    and exits 143 (128 + 15), as a process that signal ends."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except CharsegError as exc:
            raise click.ClickException(str(exc)) from exc
        except Stopped as exc:
            if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the job
                click.echo(f"Stopped: {exc}; a training run ends KILLED with its last checkpoint complete "
                           "(`charseg resume` continues it)", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=CharsegGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="charseg")
@click.option("-q", "--quiet", is_flag=True, help="Print warnings and errors only.")
def cli(quiet: bool) -> None:
    """Train Mask R-CNN to find and outline every character in an image.

    \b
    A dataset is DATA_DIR/images/00001.png with DATA_DIR/annotations/00001.csv,
    CSV header `char,polygon_json`, polygon a flat JSON list [x1,y1,x2,y2,...].
    Every training command is tracked in MLflow: $MLFLOW_TRACKING_URI, default sqlite:///mlflow.db.
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr, force=True)


for command in (train_command, resume_command, finetune_command, evaluate_command, predict_command, sync_command,
                register_command, import_coco_command, export_coco_command, validate_data_command, generate_command,
                sweep_command, export_command):
    cli.add_command(command)


def main() -> None:
    """Console-script entry point."""
    # Every module is imported: the ~200k objects of torch and torchvision leave the garbage
    # collector's generations, so no collection scans them again, nor the one at exit
    # (0.4 s of a predict process on a 2-core CPU).
    gc.freeze()
    cli(prog_name="charseg")


if __name__ == "__main__":
    main()
