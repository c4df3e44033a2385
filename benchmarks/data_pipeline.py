"""Throughput of the data pipeline (read → process → validate → tokenize) on real pairs, per CPU core:
the Ray Data pipeline beside a plain single-process loop over the same code and tokenizer.

    python benchmarks/data_pipeline.py [--pairs 60000] [--tokenizer ../shared/data/tokenizers/qwen3]

Data: the embedded hh-rlhf helpful pairs plus, when ../shared is present, hh-rlhf harmless-base test
pairs, repeated (with fresh ids) to --pairs and written as parquet shards. Tokens = both templated
sequences of each pair (prompt counted twice), i.e. all tokens the tokenizer produced.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process: per-core figures mean that
os.environ.setdefault("RAYON_NUM_THREADS", "1")

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def real_pairs() -> list[dict]:
    from btrm.processors import RowDropped, RowError, load_processor

    pairs = pq.read_table(REPO / "examples" / "hh_helpful" / "train.parquet").to_pylist()
    pairs += pq.read_table(REPO / "examples" / "hh_helpful" / "test.parquet").to_pylist()
    harmless = REPO.parent / "shared" / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    if harmless.exists():
        import gzip
        import json

        hh = load_processor("hh_rlhf")
        with gzip.open(harmless, "rt") as f:
            for i, line in enumerate(f):
                try:
                    [pair] = hh.pairs(json.loads(line))
                except (RowError, RowDropped):
                    continue
                pairs.append({"id": f"harmless-{i}", "source": "hh-rlhf-harmless", "chosen": pair["chosen"],
                              "rejected": pair["rejected"]})
    return pairs


def write_shards(pairs: list[dict], total: int, directory: Path, shards: int) -> None:
    rows = [{**pairs[i % len(pairs)], "id": f"{i}"} for i in range(total)]
    size = -(-total // shards)
    for k in range(shards):
        pq.write_table(pa.Table.from_pylist(rows[k * size : (k + 1) * size]), directory / f"part-{k:03d}.parquet",
                       row_group_size=2048)


def tokens_of(table: pa.Table) -> int:
    lengths = lambda column: pa.compute.sum(pa.compute.list_value_length(table[column])).as_py() or 0
    return 2 * lengths("prompt_ids") + lengths("chosen_ids") + lengths("rejected_ids")


def plain_loop(spec) -> tuple[int, int, float]:
    from btrm.data import PairPreprocessor
    from btrm.sources import plan_fragments, read_fragment

    worker = PairPreprocessor(spec)
    pairs = tokens = 0
    start = time.perf_counter()
    for fragment in plan_fragments(spec.path, ("chosen", "rejected")):
        for numbers, rows in read_fragment(fragment, spec.batch_rows):
            table, _ = worker.process_rows(fragment.path, numbers, rows)
            pairs += table.num_rows
            tokens += tokens_of(table)
    return pairs, tokens, time.perf_counter() - start


def ray_pipeline(spec, tasks: int) -> tuple[int, int, float]:
    from btrm.data import build_pair_dataset, new_ledger

    ledger = new_ledger("bench", 1.0)
    start = time.perf_counter()
    pairs = tokens = 0
    for batch in build_pair_dataset(spec, ledger, num_tasks=tasks, task_cpus=1).iter_batches(
            batch_format="pyarrow", batch_size=None):
        pairs += batch.num_rows
        tokens += tokens_of(batch)
    return pairs, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=60000)
    parser.add_argument("--tokenizer", default=str(REPO.parent / "shared" / "data" / "tokenizers" / "qwen3"),
                        help="A local tokenizer directory with a chat template (the figures are Qwen3's; no hub is "
                             "reached). Default: ../shared/data/tokenizers/qwen3 beside the checkout.")
    parser.add_argument("--max_length", type=int, default=4096)
    args = parser.parse_args()
    if not Path(args.tokenizer).is_dir():
        parser.error(f"--tokenizer {args.tokenizer}: no such directory; give a local tokenizer (a Qwen3 one for "
                     "figures comparable to the README's)")

    import ray
    from transformers import AutoTokenizer

    from btrm.data import DataSpec
    from btrm.tokenize import TokenizationSpec

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_dir = Path(tmp) / "tokenizer"
        AutoTokenizer.from_pretrained(args.tokenizer).save_pretrained(tokenizer_dir)
        data = Path(tmp) / "pairs"
        data.mkdir()
        write_shards(real_pairs(), args.pairs, data, shards=max(4, cores * 2))
        spec = DataSpec(path=str(data), tokenizer_path=str(tokenizer_dir),
                        tokenization=TokenizationSpec(max_length=args.max_length))
        results = [("plain loop, 1 process", 1, *plain_loop(spec))]
        ray.init(address="local", num_cpus=cores + 1, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ray_pipeline(spec, 1)  # warm-up: worker processes and imports
        results.append(("Ray Data, 1 task", 1, *ray_pipeline(spec, 1)))
        if cores > 1:
            results.append((f"Ray Data, {cores} tasks", cores, *ray_pipeline(spec, cores)))
        ray.shutdown()

    base = results[0][3] / results[0][4]
    print(f"\n{args.pairs} real pairs, Qwen3 tokenizer, max_length {args.max_length}, {cores} cores\n")
    print(f"{'pipeline':<24} {'pairs/s':>9} {'tokens/s':>11} {'tokens/s/core':>14} {'vs plain/core':>14}")
    for name, used_cores, pairs, tokens, seconds in results:
        per_core = tokens / seconds / used_cores
        print(f"{name:<24} {pairs / seconds:>9.0f} {tokens / seconds:>11.0f} {per_core:>14.0f} {per_core / base - 1:>+13.1%}")


if __name__ == "__main__":
    main()
