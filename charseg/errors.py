"""Errors a user can act on. The CLI prints them as one line and exits non-zero."""


class CharsegError(Exception):
    """Base class: the message names the file, what was wrong and what to do."""


class DatasetError(CharsegError):
    """The dataset folder cannot be used as given."""


class CheckpointError(CharsegError):
    """A checkpoint file is missing, foreign or incompatible."""


class WeightsError(CharsegError):
    """Initial weights cannot be obtained or do not fit the model."""
