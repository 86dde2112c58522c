"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class CharsegError(Exception):
    """Base class: the message names the file, what was wrong and what to do."""


class DatasetError(CharsegError):
    """The dataset folder cannot be used as given."""


class CheckpointError(CharsegError):
    """A checkpoint file is missing, foreign or incompatible."""


class WeightsError(CharsegError):
    """Initial weights cannot be obtained or do not fit the model."""


def reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of a library's error message, for one-line errors; its type when the
    message is empty (torch.load of a zero-byte file raises IndexError with none)."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def empty_file(path) -> str | None:
    """A sentence for a file of zero bytes (cut short while written or copied), else None."""
    try:
        size = path.stat().st_size
    except OSError:
        return None
    return "the file is empty (0 bytes): it was cut short while being written or copied; copy it again" \
        if size == 0 else None


class Stopped(KeyboardInterrupt):
    """The process was asked to stop by a signal other than Ctrl-C (SIGTERM: what `timeout`,
    SLURM, Kubernetes and torchrun send). Like Ctrl-C it ends a run KILLED after the checkpoint
    being written is complete; the process then exits with 128 + the signal's number."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")
