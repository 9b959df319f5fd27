"""The installed dtop version (written into every checkpoint and results file)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def dtop_version() -> str:
    try:
        return version("dtop")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"
