"""Experiment trackers (wandb, swanlab), written from rank 0. Both work offline."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

PACKAGES = {"wandb": "wandb", "swanlab": "swanlab"}


def check_tracker(report_to: str) -> None:
    """Fails at launch, not after an hour of training, when the tracker's package is missing."""
    package = PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise SystemExit(f"--report_to {report_to}: the {package} package is not installed; "
                         f"pip install 'btrm[{report_to}]' (or --report_to none)")


def _mode(report_to: str) -> str:
    """The tracker's own mode variable wins; without it and without an API key, log offline (`wandb sync`
    or `swanlab sync` uploads later) instead of failing for want of a login."""
    prefix = report_to.upper()
    return os.environ.get(f"{prefix}_MODE") or ("online" if os.environ.get(f"{prefix}_API_KEY") else "offline")


class Tracker:
    def __init__(self, report_to: str, project: str, run_name: str | None, config: dict[str, Any], directory: str):
        self.run = None
        if report_to == "wandb":
            import wandb

            os.makedirs(directory, exist_ok=True)
            self.run = wandb.init(project=project, name=run_name, config=config, dir=directory, mode=_mode(report_to))
        elif report_to == "swanlab":
            import swanlab

            self.run = swanlab.init(project=project, name=run_name, config=config, log_dir=directory,
                                    mode=_mode(report_to))

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
