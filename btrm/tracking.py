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


class Tracker:
    def __init__(self, report_to: str, project: str, run_name: str | None, config: dict[str, Any]):
        self.report_to = report_to
        self.run = None
        if report_to == "wandb":
            import wandb

            # Without an API key wandb refuses to start; log offline (`wandb sync` uploads later).
            if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
                os.environ["WANDB_MODE"] = "offline"
            self.run = wandb.init(project=project, name=run_name, config=config)
        elif report_to == "swanlab":
            import swanlab

            if not os.environ.get("SWANLAB_API_KEY") and not os.environ.get("SWANLAB_MODE"):
                os.environ["SWANLAB_MODE"] = "offline"
            self.run = swanlab.init(project=project, experiment_name=run_name, config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
