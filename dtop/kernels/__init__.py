"""Triton kernels. Each module imports Triton at import time; :func:`load` is the one way in."""

from __future__ import annotations

import importlib
from functools import cache
from types import ModuleType


@cache
def load(name: str) -> ModuleType | None:
    """The kernel module ``dtop.kernels.<name>``, or None where Triton is missing (callers fall back to PyTorch)."""
    module = f"{__name__}.{name}"
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name == module:  # a misspelt kernel is a bug, not a missing Triton
            raise
        return None
