"""Every name charseg writes into MLflow: run and model-version tags, artifact folders, stores.

One home, so that what reads them (the UI, `search_runs`, a resume, `sync`) and what writes
them agree.
"""

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "charseg"
CHECKPOINT_DIR = "checkpoints"  # artifact folder of every checkpoint
EXPORT_DIR = "export"  # artifact folder of an exported TorchScript file (ONNX is logged as an onnx model)
CONFIG_ARTIFACT = "config/config.json"  # {"config": TrainConfig, "model_spec": ModelSpec} of a training run
OFFLINE_DIR = "offline-tracking"  # inside the output folder: mlflow.db and artifacts/ of runs made offline

# On a training run.
TAG_MODE = "charseg.mode"  # train | resume | finetune | evaluate | export
TAG_PRECISION = "charseg.precision"  # fp32 | bf16 | fp16: what --precision resolved to
TAG_WRITER = "charseg.writer"  # "PID n on HOST into FOLDER": the process that trains the run
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # as `mlflow run` sets it
TAG_FAILURE = "charseg.failure_reason"
TAG_BEST_METRIC = "charseg.best_metric"
TAG_BEST_EPOCH = "charseg.best_epoch"
TAG_BEST_VALUE = "charseg.best_value"
TAG_STOP_REASON = "charseg.stop_reason"  # early_stop | time_budget: a run that ended before its last epoch
TAG_STOP_MESSAGE = "charseg.stop_message"  # that reason in words

# Lineage: where a resume, fine-tune or evaluation started, and who resumed a run.
TAG_SOURCE_RUN = "charseg.source_run_id"  # also on a registered model version
TAG_SOURCE_CHECKPOINT = "charseg.source_checkpoint"
TAG_RESUMED_BY = "charseg.resumed_by"
TAG_CONFIG_SOURCE = "charseg.config_source"  # train --config: the file or run whose settings this run replays

# A sweep's parent run (sweep.py).
TAG_SWEEP = "charseg.sweep"  # the sweep's folder: its optuna study and its trials
TAG_BEST_TRIAL = "best.trial"  # the best trial so far: its number,
TAG_BEST_TRIAL_RUN = "charseg.best_trial_run_id"  # its child run
BEST_PARAM_PREFIX = "best."  # and its sampled settings, as best.<setting>

# Failover and sync.
TAG_CONTINUES = "charseg.continues_run_id"  # on a local run: the server run whose rest it records (failover)
TAG_CAUGHT_UP = "charseg.caught_up"  # on such a run: copied into the server run already
TAG_OFFLINE_RUN = "charseg.offline_run_id"  # on a server's run: the offline run `charseg sync` copied

# The registry.
CHAMPION = "champion"  # the alias of the version that serves
TAG_VERSION_METRIC = "charseg.metric"  # on a model version: its validation metric and value
TAG_VERSION_VALUE = "charseg.metric_value"
TAG_VERSION_CHECKPOINT = "charseg.checkpoint"  # the checkpoint file's name
TAG_VERSION_FORMAT = "charseg.format"  # on an exported version: onnx
