"""`charseg sweep`: an optuna study over training settings. Each trial is a training run, an
MLflow child run of one parent run; optuna's TPE sampler picks the settings and its median
pruner stops a trial after an epoch whose validation metric lags the others' at that epoch.
The study lives in OUTPUT_DIR/optuna.db beside the trials' folders, so a sweep killed at any
point continues where it was when run again (the trial that was running is marked failed).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import NOT_REPLAYED, SETTING_TYPES, TrainConfig, replayed_settings
from .errors import CharsegError
from .inference.evaluate import LOWER_IS_BETTER
from .training import runner
from .training.stopping import PRUNED, Stop

log = logging.getLogger("charseg")

STUDY_DB = "optuna.db"
STUDY_NAME = "charseg-sweep"
PARENT_ATTR = "mlflow_parent_run_id"  # the study's user attribute naming the parent run
RUN_ATTR = "mlflow_run_id"  # each trial's: its child run
# Trials that run before the pruner compares (it needs others at the same epoch), and the first
# epoch of a trial it may stop after (optuna's steps are epochs here; it prunes from step n_warmup_steps).
PRUNER_STARTUP_TRIALS = 2
PRUNE_FROM_EPOCH = 2
# Trials that fail one after another before the sweep stops: failed trials do not count towards
# --trials, so a space where every trial diverges would otherwise run forever.
MAX_FAILED_IN_A_ROW = 3


@dataclass(frozen=True)
class Dimension:
    """One setting the sweep samples: a range (low, high; log scale) or a list of choices."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.choices:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int):
            return trial.suggest_int(self.name, self.low, self.high, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


def load_space(path: str | Path) -> list[Dimension]:
    """The search space of a YAML file: `SETTING: [choice, ...]` or `SETTING: {low: L, high: H,
    log: true}` per TrainConfig setting (spelled as an option or a field). One line naming
    the file for anything else."""
    import yaml

    try:
        entries = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CharsegError(f"{path}: cannot read the search space: {exc}") from exc
    if not isinstance(entries, dict) or not entries:
        raise CharsegError(f"{path}: a search space is a mapping of settings, e.g. `lr: {{low: 0.001, high: 0.05, "
                           "log: true}` and `lr_schedule: [step, cosine]`")
    space = []
    for key, spec in entries.items():
        name = str(key).replace("-", "_")
        if name in NOT_REPLAYED or name not in SETTING_TYPES:
            raise CharsegError(f"{path}: {key!r} is not a setting a sweep can vary (`charseg train --help` lists them)")
        if isinstance(spec, list) and spec:
            space.append(Dimension(name, choices=tuple(spec)))
        elif isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "log"} \
                and all(isinstance(spec[k], (int, float)) and math.isfinite(spec[k]) for k in ("low", "high")) \
                and spec["low"] < spec["high"]:
            space.append(Dimension(name, spec["low"], spec["high"], bool(spec.get("log", False))))
        else:
            raise CharsegError(f"{path}: {key}: give a list of choices or {{low: L, high: H}} with L < H "
                               f"(and log: true for a log scale), got {spec!r}")
    return space


@dataclass
class Sweep:
    """What `charseg sweep` was asked: the data, the settings every trial starts from, the
    space, how many finished trials (completed or pruned) and where."""

    base: TrainConfig
    space: list[Dimension]
    trials: int
    output_dir: Path
    seed: int = 0


def open_study(sweep: Sweep):
    """The sweep's optuna study in OUTPUT_DIR/optuna.db, created or loaded; a trial left RUNNING
    by a killed sweep is marked failed (it is run again as a new trial)."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # charseg says what happens, once
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    direction = "minimize" if sweep.base.best_metric in LOWER_IS_BETTER else "maximize"
    study = optuna.create_study(
        storage=f"sqlite:///{sweep.output_dir.resolve() / STUDY_DB}", study_name=STUDY_NAME, load_if_exists=True,
        direction=direction, sampler=optuna.samplers.TPESampler(seed=sweep.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=PRUNE_FROM_EPOCH))
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.warning("warning: trial %d was running when the sweep stopped: marked failed", stale.number)
        study.tell(stale.number, state=TrialState.FAIL)
    return study


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def trial_config(sweep: Sweep, trial) -> TrainConfig:
    """The base settings with the trial's sampled ones, in the trial's own folder."""
    sampled = {d.name: d.suggest(trial) for d in sweep.space}
    settings = replayed_settings(sampled, f"trial {trial.number}")  # typed as TrainConfig holds them
    config = dataclasses.replace(sweep.base, **settings, output_dir=str(sweep.output_dir / f"trial-{trial.number:03d}"))
    try:
        config.validate()
    except ValueError as exc:
        raise CharsegError(f"trial {trial.number}: {exc}") from exc
    return config


@dataclass
class PruningReporter:
    """Reports each epoch's validation metric to the trial; asks the run to stop (a Stop the
    epoch loop reads through its tracker) when the pruner says so."""

    trial: Any
    metric: str
    stop: Stop | None = None

    def report(self, epoch: int, metrics: dict[str, float]) -> None:
        value = metrics[self.metric]
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.stop = Stop(PRUNED, epoch, f"optuna's median pruner: {self.metric} {value:.4f} after epoch {epoch} "
                                            "lags the median of the other trials there")


def run_trial(sweep: Sweep, study, choices) -> tuple[Any, runner.RunResult | None]:
    """Ask the study for a trial, train it in a child run of the active parent and tell the
    study how it ended (completed with its best metric, pruned, or failed)."""
    from optuna.trial import TrialState

    from . import tracking

    trial = study.ask()
    config = trial_config(sweep, trial)
    reporter = PruningReporter(trial, config.best_metric)
    tracker = tracking.MlflowTracker(log_checkpoints=choices.log_checkpoints, reporter=reporter)
    log.info("trial %d: %s", trial.number, ", ".join(f"{k}={v}" for k, v in trial.params.items()))
    try:
        with tracking.tracked_run(choices.experiment_name, system_metrics=choices.system_metrics,
                                  output_dir=config.output_dir, tracker=tracker) as run_id:
            trial.set_user_attr(RUN_ATTR, run_id)
            result = runner.train(config, tracker)
    except CharsegError as exc:  # a diverged loss, a page that cannot be read: the next trial goes on
        log.warning("warning: trial %d failed: %s", trial.number, exc)
        study.tell(trial, state=TrialState.FAIL)
        return trial, None
    if reporter.stop is not None:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, result.best["value"])
    return trial, result


def run_sweep(sweep: Sweep, choices, register_as: str | None = None) -> list[str]:
    """Run trials until SWEEP.trials have finished (completed or pruned), under one parent run
    that carries the best trial; register the best trial's checkpoint when asked. Returns the
    lines to print."""
    from . import tracking
    from .tracking.sweep import log_best_trial, parent_run

    study = open_study(sweep)
    metric = sweep.base.best_metric
    params = {**{f"base.{k}": v for k, v in sweep.base.to_dict().items() if k not in NOT_REPLAYED},
              **{f"space.{d.name}": list(d.choices) if d.choices else f"[{d.low}, {d.high}]{' log' if d.log else ''}"
                 for d in sweep.space}}
    with parent_run(choices.experiment_name, str(sweep.output_dir.resolve()), study.user_attrs.get(PARENT_ATTR),
                    params) as (parent_id, experiment):
        study.set_user_attr(PARENT_ATTR, parent_id)
        choices = dataclasses.replace(choices, experiment_name=experiment)  # the trials beside their parent
        failed_in_a_row = 0
        while finished(study) < sweep.trials:
            trial, result = run_trial(sweep, study, choices)
            failed_in_a_row = failed_in_a_row + 1 if result is None else 0
            if failed_in_a_row == MAX_FAILED_IN_A_ROW:
                raise CharsegError(f"{sweep.output_dir}: {failed_in_a_row} trials failed one after another (the "
                                   "warnings above say why); change the space or the settings the trials start "
                                   "from, then run the sweep again")
            best = _best(study)
            if result is not None and best is not None and best.number == trial.number:
                log_best_trial(parent_id, trial.number, metric, best.value, best.params, best.user_attrs[RUN_ATTR])
    best = _best(study)
    if best is None:
        raise CharsegError(f"no trial of {sweep.output_dir} completed (all pruned or failed); see the warnings above")
    lines = [f"sweep {sweep.output_dir}: {finished(study)} trials; best trial {best.number}: {metric} "
             f"{best.value:.4f} with " + ", ".join(f"{k}={v}" for k, v in best.params.items()),
             f"best trial's run {best.user_attrs[RUN_ATTR]}, parent run {parent_id}"]
    if register_as:
        folder = sweep.output_dir / f"trial-{best.number:03d}"
        checkpoint = folder / "best.pth" if (folder / "best.pth").is_file() else folder / "model_final.pth"
        lines.append(tracking.register_checkpoint(checkpoint, register_as, best.user_attrs[RUN_ATTR]).message)
    return lines


def _best(study):
    from optuna.trial import TrialState

    return study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None


def settings_of(options: dict[str, Any], data_dir: str) -> TrainConfig:
    """The base TrainConfig of the sweep's trials (a sweep compares validation metrics)."""
    config = TrainConfig(data_dir=data_dir, **options)
    if not (config.val_dir or config.val_fraction):
        raise CharsegError("a sweep compares validation metrics, and these settings have no validation pages: pass "
                           "--val-fraction (above 0) or --val-dir")
    return config
