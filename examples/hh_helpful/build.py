"""Rebuilds this folder's parquet files from their source (kept for provenance; needs ../shared).

Source: modelscope/RM-Gallery `anthropic_helpful_0521.jsonl` (commit 24ad0344), i.e. Anthropic hh-rlhf
"helpful" pairs as curated by RewardBench; see README.md here. Each record becomes one standard-format
pair; its `extra_metadata.group` decides train (909) or test (228).
"""

import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SOURCE = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/rm-gallery/anthropic_helpful_0521.jsonl")


def to_pair(record: dict) -> dict:
    sample = record["evaluation_sample"]
    prompt = [{"role": m["role"], "content": m["content"]} for m in sample["input"]]
    answers = {o["content_label"]: {"role": "assistant", "content": o["content"]} for o in sample["outputs"]}
    return {
        "id": record["unique_id"],
        "source": "hh-rlhf-helpful",
        "chosen": prompt + [answers["chosen"]],
        "rejected": prompt + [answers["rejected"]],
    }


def main() -> None:
    splits = {"train": [], "test": []}
    for line in SOURCE.read_text().splitlines():
        record = json.loads(line)
        splits[record["extra_metadata"]["group"]].append(to_pair(record))
    out = Path(__file__).parent
    for name, pairs in splits.items():
        pq.write_table(pa.Table.from_pylist(pairs), out / f"{name}.parquet", compression="zstd")
        print(name, len(pairs))


if __name__ == "__main__":
    main()
