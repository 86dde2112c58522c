"""Everything MLflow: the only package of charseg that imports mlflow.

| module | its one job |
| --- | --- |
| `tags.py` | every tag name, artifact folder and default store: the one home of the names |
| `environment.py` | environment variables set for a block and restored after it |
| `store.py` | which store a command talks to, the offline store, whether a server answers |
| `run.py` | a run's lifecycle: start (or fail over at the start), end, close abandoned runs |
| `tracker.py` | `MlflowTracker`: what a training run records, failover mid-run and catching up |
| `sync.py` | `charseg sync`: offline runs into the server, only what it lacks |
| `registry.py` | register a checkpoint, the `champion` rule |
| `pyfunc.py` | the registered model's loader hook and signature |
| `export.py` | an exported model (ONNX, TorchScript) as a run, the ONNX one registered |
| `artifacts.py` | checkpoints held by MLflow (run IDs, runs:/ and models:/ URIs) downloaded |

The CLI uses the names below; registered models name this package as their `loader_module`,
so `charseg.tracking._load_pyfunc` stays importable here.
"""

from .artifacts import download_checkpoint, is_run_id, run_config
from .export import log_export
from .pyfunc import _load_pyfunc
from .registry import Registration, register_checkpoint
from .run import close_abandoned_run, tracked_run
from .store import TrackingError, configure, current_tracking_uri, offline_store
from .sync import sync_offline_runs
from .tracker import MlflowTracker, log_evaluation

__all__ = ["MlflowTracker", "Registration", "TrackingError", "_load_pyfunc", "close_abandoned_run", "configure",
           "current_tracking_uri", "is_run_id", "log_evaluation", "log_export", "offline_store", "register_checkpoint",
           "download_checkpoint", "run_config", "sync_offline_runs", "tracked_run"]
