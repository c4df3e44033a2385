"""Evaluate an exported reward model: `ray job submit -- python jobs/evaluate.py --help`."""

from btrm.evaluate import main

if __name__ == "__main__":
    main()
