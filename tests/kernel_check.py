"""Run a kernel check module (:mod:`tests.kernel_checks`) in a fresh interpreter.

Why a subprocess: Triton chooses between its interpreter (CPU machines) and the compiler when a
kernel is defined, so each mode needs its own process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def kernel_check(name: str, device: str, *args: str) -> int:
    """Run ``tests.kernel_checks.<name>`` on ``device`` ("cpu": under the interpreter); its case count."""
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else None
    res = subprocess.run(
        [sys.executable, "-m", f"tests.kernel_checks.{name}", device, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    word, cases = res.stdout.split()[-2:]
    assert word == "ok", res.stdout[-3000:]
    return int(cases)
