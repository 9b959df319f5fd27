"""The errors dtop raises for bad input: each says what is wrong and what to do.

The command-line tools print one of these as a single message and exit with code 2 (the traceback
only with ``HYDRA_FULL_ERROR=1`` or ``DTOP_DEBUG=1``). Each keeps its builtin base, so callers that
catch ``ValueError`` or ``RuntimeError`` still do.
"""

from __future__ import annotations


class DtopError(Exception):
    """Base of every known dtop error."""


class ConfigError(DtopError, ValueError):
    """A setting that cannot work: a bad value, a missing required key, settings that contradict each other."""


class DatasetLayoutError(DtopError, ValueError):
    """A dataset root that is missing, laid out wrongly, or holds files that cannot be used."""


class WeightsError(DtopError, RuntimeError):
    """Backbone weights that are missing, unreadable, unreachable or do not fit the backbone."""


class CheckpointError(DtopError, RuntimeError):
    """A checkpoint that cannot be read, does not fit the configured model, or cannot be resumed."""
