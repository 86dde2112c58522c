"""The loader hook of models registered by charseg before the tracking package (their
`loader_module` is "charseg.serving"). Such a model brings its own copy of charseg, but a
process that imported charseg first loads this one. New models name charseg.tracking."""

from .inference.serving import _load_pyfunc  # noqa: F401
