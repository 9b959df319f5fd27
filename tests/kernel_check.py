"""Run a Triton kernel's check script in a fresh interpreter.

Why a subprocess: Triton chooses between its interpreter (CPU machines) and the compiler when a
kernel is defined, so each mode needs its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys


def kernel_check(script: str, device: str, *args: str) -> str:
    """The script's stdout, run with ``device`` ("cpu": under the interpreter) and ``args``; fails on an error."""
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else None
    res = subprocess.run([sys.executable, "-c", script, device, *args], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout
