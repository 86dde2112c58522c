"""`python -m charseg.cli.torchrun ARGS`: PyTorch's own launcher (torch.distributed.run, the
`torchrun` command) unchanged, but a launcher stopped by a signal (SIGTERM from `timeout`,
SLURM or Kubernetes; Ctrl-C) says so in one line and exits 128 + the signal's number, instead
of printing the traceback of its SignalException. The training processes it started are
stopped by torchrun as always; each ends its epoch's writes and its run KILLED (jobs.py)."""

from __future__ import annotations

import signal
import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.run import main as torchrun


def main() -> None:
    try:
        torchrun()
    except SignalException as exc:
        name = signal.Signals(exc.sigval).name
        print(f"torchrun: stopped by {name}; its processes were sent SIGTERM and end their runs KILLED",
              file=sys.stderr)
        sys.exit(128 + exc.sigval)


if __name__ == "__main__":
    main()
