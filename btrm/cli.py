"""`btrm <command>`: the same entry points as `jobs/*.py`, for users who installed the package."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": "btrm.cli:train_main",
    "evaluate": "btrm.evaluate:main",
    "serve": "btrm.serving:main",
}


def train_main(argv: list[str] | None = None) -> None:
    from btrm.config import TrainConfig, parse_config
    from btrm.data import bad_data_ends_the_job
    from btrm.train import run_training

    config = parse_config(TrainConfig, "Train a Bradley-Terry reward model on Ray Train + DeepSpeed.", argv)
    with bad_data_ends_the_job():
        run_training(config)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: btrm {{{','.join(COMMANDS)}}} [options]   (btrm COMMAND --help for its options)")
        sys.exit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"btrm {command}"  # argparse's prog: `usage: btrm serve ...`, not `usage: btrm ...`
    module, function = COMMANDS[command].split(":")
    getattr(__import__(module, fromlist=[function]), function)()
