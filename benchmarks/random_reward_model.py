"""A randomly initialised Qwen3-shaped reward model, written as `btrm train` exports one (Hugging Face files,
tokenizer, btrm.json manifest): something to load-test the scoring service with on a GPU at a real model's
size without training one first. Its rewards mean nothing; its cost per token is a real model's.

    python benchmarks/random_reward_model.py --tokenizer ../shared/data/tokenizers/qwen3 --shape full \\
        --output /tmp/qwen3-1.7b-random
    python benchmarks/serve_load.py --model_path /tmp/qwen3-1.7b-random

Shapes are train_throughput.py's: ``full`` is Qwen3-1.7B's (28 layers, hidden 2048), ``tiny`` 2 layers.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config; nothing is downloaded

import torch  # noqa: E402
from train_throughput import build_classifier, model_config  # noqa: E402

from btrm.export import write_model_dir  # noqa: E402
from btrm.model import reward_token_rule  # noqa: E402
from btrm.tokenize import TokenizationSpec, load_tokenizer, prepare_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="A Qwen3 tokenizer directory (with its chat template).")
    parser.add_argument("--output", required=True, help="Directory to write the model to.")
    parser.add_argument("--shape", choices=("full", "tiny"), default="full")
    parser.add_argument("--max_length", type=int, default=4096)
    args = parser.parse_args(argv)

    tokenizer = prepare_tokenizer(load_tokenizer(args.tokenizer))
    config = model_config(args.shape)
    if len(tokenizer) > config.vocab_size:
        raise SystemExit(f"{args.tokenizer} has {len(tokenizer)} tokens, more than a Qwen3 embedding's {config.vocab_size}")
    config.pad_token_id = tokenizer.pad_token_id
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_classifier(config, torch.bfloat16, device)
    spec = TokenizationSpec(max_length=args.max_length, reward_token=reward_token_rule(config))
    manifest = {"format": "btrm reward model v1", "base_model": f"random Qwen3 ({args.shape} shape), untrained",
                "tokenization": {**spec.to_dict(), "chat_template": tokenizer.chat_template},
                "reward_token_rule": "last token of the templated conversation",
                "pad_token_id": tokenizer.pad_token_id}
    write_model_dir(args.output, model, None, tokenizer, manifest)
    print(f"{args.output}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, max_length {args.max_length}")


if __name__ == "__main__":
    main()
