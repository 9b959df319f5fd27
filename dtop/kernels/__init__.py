"""Triton kernels. Each module imports Triton at import time; :func:`load` is the one way in.

``DTOP_KERNELS=0`` in the environment makes every op run its PyTorch reference instead (to check a
result against the reference, or to time what the kernels gain).
"""

from __future__ import annotations

import importlib
import os
from functools import cache
from types import ModuleType


def load(name: str) -> ModuleType | None:
    """The kernel module ``dtop.kernels.<name>``, or None where Triton is missing or ``DTOP_KERNELS=0``
    (callers fall back to PyTorch)."""
    if os.environ.get("DTOP_KERNELS", "1").lower() in ("0", "false", "off"):
        return None
    return _import(name)


@cache
def _import(name: str) -> ModuleType | None:
    module = f"{__name__}.{name}"
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name == module:  # a misspelt kernel is a bug, not a missing Triton
            raise
        return None
