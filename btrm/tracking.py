"""Experiment trackers (wandb, swanlab), written from rank 0. Both work offline."""

from __future__ import annotations

import importlib.util
import os
import secrets
from typing import Any

PACKAGES = {"wandb": "wandb", "swanlab": "swanlab"}


def check_tracker(report_to: str) -> None:
    """Fails at launch, not after an hour of training, when the tracker's package is missing."""
    package = PACKAGES.get(report_to)
    if package and importlib.util.find_spec(package) is None:
        raise SystemExit(f"--report_to {report_to}: the {package} package is not installed; "
                         f"in btrm's checkout, ./setup.sh {report_to} (or pip install -e '.[{report_to}]'), or --report_to none")


def _mode(report_to: str, directory: str) -> str:
    """The tracker's own mode variable wins; without it and without an API key, log offline (`wandb sync`
    or `swanlab sync` uploads later) instead of failing for want of a login, and say so."""
    prefix = report_to.upper()
    mode = os.environ.get(f"{prefix}_MODE") or ("online" if os.environ.get(f"{prefix}_API_KEY") else "offline")
    if mode == "offline" and f"{prefix}_MODE" not in os.environ:
        print(f"[btrm] {report_to}: no ${prefix}_API_KEY where rank 0 runs: logging offline under {directory} "
              f"on {os.uname().nodename} "
              f"(`{report_to} sync` uploads it); set ${prefix}_API_KEY in the job's environment, or "
              f"{prefix}_MODE=online where `{report_to} login` was run on every node", flush=True)
    return mode


def new_run_id() -> str:
    return secrets.token_hex(8)


class Tracker:
    """The run's tracker run. ``run_id``: the driver's (:func:`new_run_id`), or the one a resumed run continues
    (from its checkpoint), so that a --resume or a restart after a failure goes on in the same tracker run
    instead of starting another."""

    def __init__(self, report_to: str, project: str, run_name: str | None, config: dict[str, Any], directory: str,
                 run_id: str):
        self.run = None
        self.run_id = run_id
        if report_to == "wandb":
            import wandb

            os.makedirs(directory, exist_ok=True)
            self.run = wandb.init(project=project, name=run_name, config=config, dir=directory,
                                  mode=_mode(report_to, directory), id=self.run_id, resume="allow")
        elif report_to == "swanlab":
            import swanlab

            self.run = swanlab.init(project=project, name=run_name, config=config, log_dir=directory,
                                    mode=_mode(report_to, directory), id=self.run_id, resume="allow")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
