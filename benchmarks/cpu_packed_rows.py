"""What a packed row's length costs on a CPU, where its attention mask is dense ([T, T] under sdpa) and
every token attends across the whole row: the forward's time per pair at several row budgets, for a tiny
Qwen3 (hidden 64, the tests' model) and two layers of Qwen3-0.6B's shape. btrm caps CPU rows at
btrm.batching.DENSE_MASK_TOKENS from these figures.

    python benchmarks/cpu_packed_rows.py [--pairs 48] [--threads 1]

Pairs: random token ids, a prompt of 64-700 tokens and answers of 16-300 (about hh-rlhf's lengths), laid out
as training, evaluation and the service lay them out (btrm.batching.pack_groups), rows cut first-fit.
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from transformers import AutoModelForSequenceClassification, Qwen3Config

from btrm.batching import pack_groups, plan_by_tokens
from btrm.model import RewardModel

SHAPES = {
    "tiny (hidden 64)": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=16),
    "Qwen3-0.6B-shaped": dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16,
                              num_key_value_heads=8, head_dim=128),
}
BUDGETS = (4096, 2048, 1024, 512)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a per-core figure)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    ids = lambda low, high: [rng.randrange(1000, 5000) for _ in range(rng.randint(low, high))]  # noqa: E731
    pairs = [(ids(64, 700), ids(16, 300), ids(16, 300)) for _ in range(args.pairs)]
    lengths = [len(p) + len(c) + len(r) for p, c, r in pairs]
    print(f"{args.pairs} pairs of {sum(lengths) / len(lengths):.0f} tokens on average (prompt once), "
          f"{args.threads} thread(s), 2 layers, float32, sdpa with a dense mask")
    print("| model | row budget | rows | ms per pair |\n|---|---:|---:|---:|")
    for name, shape in SHAPES.items():
        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=8000, num_hidden_layers=2, max_position_embeddings=8192, pad_token_id=0,
                             num_labels=1, **shape)
        model = RewardModel(AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").eval())
        for budget in BUDGETS:
            rows = plan_by_tokens(lengths, budget)
            started = time.perf_counter()
            with torch.no_grad():
                for row in rows:
                    model(pack_groups([pairs[i][0] for i in row], [[pairs[i][1], pairs[i][2]] for i in row], 0))
            seconds = time.perf_counter() - started
            print(f"| {name} | {budget} | {len(rows)} | {1000 * seconds / len(pairs):.1f} |", flush=True)


if __name__ == "__main__":
    main()
