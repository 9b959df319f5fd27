"""W&B that works with no account: offline unless the user configured W&B."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any


def wandb_configured() -> bool:
    """True when an API key is available (env var or ``wandb login``'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc"))).authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(save_dir: str, **kwargs: Any):
    """A Lightning ``WandbLogger``; wandb is imported only when this logger is asked for.

    ``WANDB_MODE`` wins when set; otherwise the run is online only if W&B is configured, and offline
    (sync later with ``wandb sync <run dir>/wandb/offline-run-*``) if not.
    """
    from lightning.pytorch.loggers import WandbLogger

    if "WANDB_MODE" not in os.environ and not wandb_configured():
        kwargs.setdefault("offline", True)
    kwargs.setdefault("log_model", False)
    return WandbLogger(save_dir=save_dir, **kwargs)
