"""Logger factories that need more than a plain `_target_` (W&B offline fallback)."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger

from src.utils.pylogger import RankedLogger

log = RankedLogger(__name__)


def wandb_api_key_configured() -> bool:
    """True when W&B can authenticate without asking: WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1]
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def make_wandb_logger(
    project: str = "marlin",
    entity: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    name: str | None = None,
    save_dir: str = ".",
    mode: str | None = None,
    log_model: bool = False,
    job_type: str = "train",
    **kwargs: Any,
) -> WandbLogger:
    """A WandbLogger that never prompts or hangs.

    `mode=None` picks "online" when an API key is configured and "offline" otherwise (the run
    is written under `save_dir/wandb` and can be uploaded later with `wandb sync`). An explicit
    `mode` ("online", "offline", "disabled") or the WANDB_MODE environment variable wins.
    """
    mode = mode or os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if wandb_api_key_configured() else "offline"
        if mode == "offline":
            log.info("No W&B API key configured: logging offline (upload later with `wandb sync`)")
    os.makedirs(save_dir, exist_ok=True)
    return WandbLogger(
        project=project,
        entity=entity,
        group=group,
        tags=list(tags) if tags else None,
        name=name,
        save_dir=save_dir,
        mode=mode,
        log_model=log_model,
        job_type=job_type,
        **kwargs,
    )
