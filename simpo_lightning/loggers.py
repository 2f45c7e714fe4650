"""Logging to Weights & Biases: offline unless W&B is set up on this machine, so runs need no account."""

import netrc
import os

from lightning.pytorch.loggers import WandbLogger as _WandbLogger


def wandb_configured() -> bool:
    """True when the user has set W&B up (an API key in the environment or in ~/.netrc)."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun"):
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class WandbLogger(_WandbLogger):
    """Lightning's WandbLogger, offline unless W&B is configured on this machine (``offline: null``)."""

    def __init__(self, project: str = "simpo-lightning", save_dir: str = "runs", offline: bool | None = None, **kwargs):
        offline = not wandb_configured() if offline is None else offline
        if offline:  # explicit: Lightning's WANDB_MODE variable is not read once W&B has started in this process
            kwargs.setdefault("mode", "offline")
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
