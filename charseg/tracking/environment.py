"""Environment variables set for a block and restored after it (MLflow reads several of its
settings from the environment at each call)."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


def _put(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def environment(*kept: str, **changes: str | None) -> Iterator[None]:
    """Set each of CHANGES (None removes the variable) for the block; afterwards, those and the
    KEPT variables (which the block, or a library in it, may change) are as they were before."""
    saved = {name: os.environ.get(name) for name in (*kept, *changes)}
    for name, value in changes.items():
        _put(name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            _put(name, value)
