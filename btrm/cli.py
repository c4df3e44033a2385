"""`btrm <command>`: the same entry points as `jobs/*.py`, for users who installed the package."""

from __future__ import annotations

import difflib
import sys

# Each command's entry point and what it does: `btrm --help` lists these, and each command's own --help
# opens with its line (kept here, where listing them imports none of the commands' heavy modules).
COMMANDS = {
    "train": ("btrm.cli:train_main", "Train a Bradley-Terry reward model on Ray Train + DeepSpeed."),
    "evaluate": ("btrm.evaluate:main", "Score preference pairs with an exported reward model: per-pair rewards, "
                                       "accuracy and length-bias diagnostics, on Ray Data."),
    "serve": ("btrm.serving:main", "Serve an exported reward model over HTTP (Ray Serve)."),
}


def summary(command: str) -> str:
    return COMMANDS[command][1]


def train_main(argv: list[str] | None = None) -> None:
    from btrm.config import TrainConfig, parse_config
    from btrm.data import bad_data_ends_the_job
    from btrm.train import run_training

    config = parse_config(TrainConfig, summary("train"), argv)
    with bad_data_ends_the_job():
        run_training(config)


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "\n".join(["usage: btrm COMMAND [options]   (btrm COMMAND --help: its options)", "", "commands:",
                      *(f"  {name:{width}}  {text}" for name, (_, text) in COMMANDS.items())])


def main() -> None:
    given = sys.argv[1] if len(sys.argv) > 1 else None
    if given in ("-h", "--help"):
        print(usage())
        sys.exit(0)
    if given not in COMMANDS:
        if given is not None:
            close = difflib.get_close_matches(given, COMMANDS, n=1)
            print(f"btrm: unknown command {given!r}" + (f" (did you mean {close[0]!r}?)" if close else ""),
                  file=sys.stderr)
        print(usage(), file=sys.stderr)
        sys.exit(2)
    command = sys.argv.pop(1)
    sys.argv[0] = f"btrm {command}"  # argparse's prog: `usage: btrm serve ...`, not `usage: btrm ...`
    module, function = COMMANDS[command][0].split(":")
    getattr(__import__(module, fromlist=[function]), function)()
