"""Train a Bradley-Terry reward model: `ray job submit -- python jobs/train.py --help`."""

from btrm.cli import train_main

if __name__ == "__main__":
    train_main()
