"""Training throughput: btrm's training step beside TRL's RewardTrainer, in one process, on the same model
config, the same pairs in the same order and the same device.

    python benchmarks/train_throughput.py --mode full [--json out.json]   # one GPU: Qwen3-1.7B shape
    python benchmarks/train_throughput.py --mode tiny                     # CPU smoke run (the test's)
    python benchmarks/train_throughput.py --compare btrm.json trl.json      # the ratios of separate runs' rows

Modes: ``full`` trains a randomly initialised Qwen3-1.7B-shaped classifier on the GPU (bf16, gradient
checkpointing, fused AdamW, max_length 4096; TRL with sdpa attention, btrm with whatever attention its
engine picks for packed rows); ``tiny`` a 2-layer Qwen3 in float32 on the CPU, one torch thread.
Data: ``synthetic`` (seeded random token ids: a shared prompt and two answers of uniform random lengths)
and/or ``real`` (hh-rlhf helpful and harmless, RM-Bench; from ../shared/data, tokenized with the real
Qwen3 tokenizer by btrm's own PairTokenizer). Settings: TRL at each micro-batch size (pairs), with
accumulation up to --pairs_per_step; btrm packed at each of those pair counts per micro-batch (TRL's own
unit) and at each token budget per micro-batch (btrm's default way to cut a step).

Every setting trains two passes over the same --steps optimizer steps: the first warms up (allocator,
kernels, and torch.compile, which pays once per new shape) and is excluded; figures come from the second.
  pairs/s, pair tok/s    pairs, and tokens of both full sequences (prompt counted twice), per second
  computed tok/step      tokens the model ran per optimizer step, padding included
  pad %                  share of computed tokens that are padding (btrm computes each prompt once)
  MFU                    6 x all parameters x computed tokens/s / the GPU's dense bf16 peak
TRL runs first: it must see no distributed environment (accelerate would wrap a 1-process DDP), while
btrm's DeepSpeed engine needs a 1-process group and keeps it for the rest of the process.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import gzip
import importlib.util
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, fields
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the models are built from a config; nothing is downloaded
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QWEN3_PAD = 151643  # <|endoftext|>, the Qwen3 tokenizer's pad token
MODES = {
    "full": dict(pairs_per_step=64, steps=4, trl_micro_batches="4,8,16", btrm_micro_batches="4,16",
                 btrm_max_tokens="16384,32768,65536", max_length=4096, prompt=(64, 1024), answer=(32, 768)),
    "tiny": dict(pairs_per_step=8, steps=2, trl_micro_batches="4", btrm_micro_batches="4", btrm_max_tokens="1024",
                 max_length=512, prompt=(8, 128), answer=(4, 96)),
}
GiB = 1024**3


def model_config(mode: str):
    from transformers import Qwen3Config

    shape = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128) if mode == "full" else \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
    # The full vocabulary in both modes, so real Qwen3 token ids fit the tiny model too.
    return Qwen3Config(vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=40960, rope_theta=1e6,
                       num_labels=1, pad_token_id=QWEN3_PAD, **shape)


def build_classifier(config, dtype: torch.dtype, device: torch.device):
    """A randomly initialised classifier, built directly on ``device``; the same weights every call."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForSequenceClassification.from_config(config, dtype=dtype, attn_implementation="sdpa")


def parameter_count(config) -> int:
    return sum(p.numel() for p in build_classifier(config, torch.float32, torch.device("meta")).parameters())


# ---------------------------------------------------------------------------------------------------
# Data: {"prompt_ids", "chosen_ids", "rejected_ids"} numpy object arrays of int lists, plus "margin",
# exactly what btrm's train_step takes.


def as_columns(prompts: list, chosen: list, rejected: list) -> dict[str, np.ndarray]:
    columns = {}
    for name, lists in (("prompt_ids", prompts), ("chosen_ids", chosen), ("rejected_ids", rejected)):
        column = np.empty(len(lists), dtype=object)  # filled one by one: equal lengths must not become 2-D
        for i, ids in enumerate(lists):
            column[i] = [int(t) for t in ids]
        columns[name] = column
    columns["margin"] = np.zeros(len(prompts), dtype=np.float32)
    return columns


def synthetic_pairs(count: int, prompt: tuple[int, int], answer: tuple[int, int], vocab: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    ids = lambda bounds: rng.integers(0, vocab, size=rng.integers(bounds[0], bounds[1], endpoint=True)).tolist()
    rows = [(ids(prompt), ids(answer), ids(answer)) for _ in range(count)]
    return as_columns(*zip(*rows))


def real_conversations(data_dir: Path, seed: int) -> list[tuple[list, list]]:
    """(chosen, rejected) conversations from hh-rlhf helpful (RM-Gallery's copy), hh-rlhf harmless-base
    test and RM-Bench, mixed by a seeded shuffle so any prefix has all three length profiles."""
    from btrm.processors import RowDropped, RowError, load_processor

    spec = importlib.util.spec_from_file_location("hh_helpful_build", REPO / "examples" / "hh_helpful" / "build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    pairs = [build.to_pair(json.loads(line)) for line in
             (data_dir / "rm-gallery" / "anthropic_helpful_0521.jsonl").read_text().splitlines()]
    hh = load_processor("hh_rlhf")
    with gzip.open(data_dir / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as f:
        for line in f:
            try:
                pairs += hh.pairs(json.loads(line))
            except (RowError, RowDropped):
                continue
    for subset in ("chat", "code", "safety-refuse", "safety-response"):
        for item in json.loads((data_dir / "rm-bench" / f"{subset}_filtered.json").read_text()):
            # Three styles of each answer; the last (detailed, markdown) is the longest.
            prompt = [{"role": "user", "content": item["prompt"]}]
            pairs.append({side: prompt + [{"role": "assistant", "content": item[side][2]}]
                          for side in ("chosen", "rejected")})
    conversations = [(pair["chosen"], pair["rejected"]) for pair in pairs]
    random.Random(seed).shuffle(conversations)
    return conversations


def real_pairs(count: int, data_dir: Path, max_length: int, seed: int) -> tuple[dict, int]:
    """The first ``count`` real pairs that fit ``max_length``, and how many were dropped as over-long."""
    from transformers import AutoTokenizer

    from btrm.processors.base import RowDropped
    from btrm.tokenize import PairTokenizer, TokenizationSpec

    tokenizer = PairTokenizer(AutoTokenizer.from_pretrained(data_dir / "tokenizers" / "qwen3"),
                              TokenizationSpec(max_length=max_length))
    assert tokenizer.tokenizer.pad_token_id == QWEN3_PAD, "the model config's pad token must be the tokenizer's"
    encoded, dropped = [], 0
    for chosen, rejected in real_conversations(data_dir, seed):
        try:
            encoded.append(tokenizer.encode_group([chosen, rejected]))
        except RowDropped:
            dropped += 1
            continue
        if len(encoded) == count:
            break
    if len(encoded) < count:
        raise SystemExit(f"only {len(encoded)} real pairs fit max_length {max_length}; {count} are needed")
    return as_columns([e.prompt_ids for e in encoded], [e.tails[0] for e in encoded],
                      [e.tails[1] for e in encoded]), dropped


def data_stats(pairs: dict) -> dict:
    prompt = np.array([len(p) for p in pairs["prompt_ids"]])
    answers = np.array([[len(c), len(r)] for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"])])
    sequences = prompt[:, None] + answers
    return {"pairs": len(prompt), "mean_sequence": float(sequences.mean()), "max_sequence": int(sequences.max()),
            "mean_prompt": float(prompt.mean()), "pair_tokens": int(sequences.sum()),
            "unique_tokens": int(prompt.sum() + answers.sum())}


def step_slices(pairs: dict, pairs_per_step: int) -> list[dict]:
    count = len(pairs["prompt_ids"])
    return [{k: v[i : i + pairs_per_step] for k, v in pairs.items()} for i in range(0, count, pairs_per_step)]


# ---------------------------------------------------------------------------------------------------
# Measurement


@dataclass
class Measurement:
    """One setting's second pass (the first only warms up)."""

    pairs: int
    pair_tokens: int  # both full sequences of every pair, prompt counted twice
    real_tokens: int  # tokens the system computed that are not padding
    computed_tokens: int  # tokens the system computed, padding included
    steps: int
    warmup_s: float  # the first pass, excluded from the figures
    measured_s: float
    peak_bytes: int | None  # None on the CPU


@dataclass(frozen=True)
class Setting:
    """How a step's pairs are cut: ``pairs`` per micro-batch (TRL; btrm packed), or btrm's ``tokens`` budget."""

    pairs: int | None = None
    tokens: int | None = None

    def label(self, pairs_per_step: int) -> str:
        return f"{self.tokens} tokens" if self.tokens else f"micro {self.pairs} x{pairs_per_step // self.pairs}"


@dataclass
class Result:
    system: str
    data: str
    setting: Setting
    measurement: Measurement | str  # a str: why the setting did not run ("OOM": out of GPU memory)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    # Called once the model is built: the peak then covers training (weights, gradients, optimizer state,
    # activations), not the transient of random initialisation.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_bf16_flops(device: torch.device) -> float | None:
    """Dense bf16 tensor-core peak of the GPU; None where unknown (MFU then reads n/a)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    # H100 SXM ("NVIDIA H100 80GB HBM3") and H200 share 989 TFLOP/s; H100 PCIe and NVL are slower parts.
    if "H200" in name or ("H100" in name and "PCIe" not in name and "NVL" not in name):
        return 989e12
    return None


def guarded(run, device: torch.device) -> Measurement | str:
    """``run()``, or why it failed ("OOM" when the setting does not fit in GPU memory): one setting's failure
    (a compile error, say) leaves the others to run. Either way the GPU is left empty."""
    try:
        return run()
    except torch.OutOfMemoryError:
        return "OOM"
    except Exception as e:  # noqa: BLE001 - a figure table: the next setting still runs, the row says why not
        traceback.print_exc()
        return f"{type(e).__name__}: {e}"[:200]
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# TRL


def pad_only_tokenizer():
    """TRL needs a processing_class, but with pre-tokenized data it reads only its pad token; the real
    tokenizer is not needed (and synthetic data has none)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": QWEN3_PAD}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>")),
                                   pad_token="<|endoftext|>")


class CountingCollator:
    """Wraps TRL's collator to record what each micro-batch computes: (padded size, real tokens)."""

    def __init__(self, collator):
        self.collator, self.calls = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.calls.append((batch["input_ids"].numel(), int(batch["attention_mask"].sum())))
        return batch


def step_clock(device: torch.device):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Marks the start of the first optimizer step and the end of every one. The Trainer collates a
        step's micro-batches before on_step_begin, so a step's time runs from the previous step's end."""

        def __init__(self):
            self.marks: list[float] = []

        def mark(self) -> None:
            synchronize(device)
            self.marks.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.marks:
                self.mark()

        def on_step_end(self, args, state, control, **kwargs):
            self.mark()

    return StepClock()


def checkpointing_option(config_class) -> str:
    """transformers 5.24 renamed ``gradient_checkpointing`` to ``activation_checkpointing`` (the old name is a
    deprecated alias there); GPU images may carry an older transformers that knows only the old name."""
    names = {f.name for f in fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def run_trl(config, pairs: dict, setting: Setting, args, device: torch.device) -> Measurement:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import RewardConfig, RewardTrainer
    from trl.trainer.reward_trainer import DataCollatorForPreference

    micro = setting.pairs
    gpu, accumulation = device.type == "cuda", args.pairs_per_step // micro
    full = lambda side: [p + a for p, a in zip(pairs["prompt_ids"], pairs[side])]
    dataset = Dataset.from_dict({"chosen_ids": full("chosen_ids"), "rejected_ids": full("rejected_ids")})
    model = build_classifier(config, torch.bfloat16 if gpu else torch.float32, device)
    reset_peak_memory(device)
    clock, collator = step_clock(device), CountingCollator(DataCollatorForPreference(pad_token_id=QWEN3_PAD))
    with tempfile.TemporaryDirectory() as output_dir:
        trl_args = RewardConfig(
            output_dir=output_dir, max_length=args.max_length, per_device_train_batch_size=micro,
            gradient_accumulation_steps=accumulation, max_steps=2 * args.steps, learning_rate=2e-6,
            bf16=gpu, use_cpu=not gpu, optim="adamw_torch_fused", **{checkpointing_option(RewardConfig): True},
            train_sampling_strategy="sequential",  # both passes, and btrm, see the pairs in this order
            dataloader_num_workers=0, report_to="none", save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True, seed=args.seed)
        trainer = RewardTrainer(model=model, args=trl_args, train_dataset=dataset, data_collator=collator,
                                processing_class=pad_only_tokenizer(), callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # it would print the end-of-training metrics
        # RewardTrainer silently drops pairs longer than its max_length; none may go missing here.
        assert len(trainer.train_dataset) == len(dataset), "TRL dropped pairs as longer than max_length"
        trainer.train()
    assert len(collator.calls) == 2 * args.steps * accumulation, len(collator.calls)
    second = collator.calls[len(collator.calls) // 2 :]
    real = sum(r for _, r in second)
    assert real == data_stats(pairs)["pair_tokens"], "TRL did not train on every token of every pair"
    return Measurement(pairs=len(dataset), pair_tokens=real, real_tokens=real,
                       computed_tokens=sum(n for n, _ in second), steps=args.steps,
                       warmup_s=clock.marks[args.steps] - clock.marks[0],
                       measured_s=clock.marks[-1] - clock.marks[args.steps], peak_bytes=peak_memory(device))


# ---------------------------------------------------------------------------------------------------
# btrm


def init_single_process_group(gpu: bool) -> None:
    """The 1-process group btrm's DeepSpeed engine runs in (Ray Train sets one up in a real run)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if gpu else "gloo")


def run_btrm(config, pairs: dict, setting: Setting, args, device: torch.device) -> Measurement:
    from btrm.config import TrainConfig
    from btrm.train_loop import build_engine, micro_batcher, train_step

    gpu = device.type == "cuda"
    init_single_process_group(gpu)
    train_config = TrainConfig(
        train_set_path="unused", model_name="unused", max_length=args.max_length, bf16=gpu,
        gradient_checkpointing=True, per_device_train_batch_size=setting.pairs or 1,
        gradient_accumulation_steps=args.pairs_per_step // (setting.pairs or 1),
        packing=True, max_tokens_per_batch=setting.tokens or 0, deepspeed="zero2", learning_rate=2e-6,
        compile_layers=args.btrm_compile_layers, seed=args.seed)
    classifier = build_classifier(config, torch.float32, device)  # DeepSpeed keeps fp32 masters, computes in bf16
    reset_peak_memory(device)
    engine = build_engine(classifier, train_config, use_gpu=gpu, total_steps=2 * args.steps)
    try:
        batcher = micro_batcher(classifier, train_config, QWEN3_PAD, train_config.per_device_train_batch_size)
        seconds, stats = [], []
        for step_pairs in step_slices(pairs, args.pairs_per_step) * 2:
            synchronize(device)
            start = time.perf_counter()
            stats.append(train_step(engine, step_pairs, batcher, train_config))
            synchronize(device)
            seconds.append(time.perf_counter() - start)
            # On stderr, as it goes: the first steps compile the layers (minutes on a GPU), and a run cut short
            # by a time limit still tells how far it got.
            print(f"btrm {setting.label(args.pairs_per_step)}: step {len(seconds)} of {2 * args.steps} in "
                  f"{seconds[-1]:.1f} s", file=sys.stderr, flush=True)
        peak = peak_memory(device)
    finally:
        # DeepSpeed's gradient hooks keep the engine, its fp32 masters and Adam state alive past this function
        # (~25 GB for the 1.7B model): the next setting would start with them and report them in its peak.
        engine.destroy()
        del engine, classifier
    second = stats[args.steps :]
    return Measurement(pairs=sum(s["pairs"] for s in second), pair_tokens=sum(s["tokens"] for s in second),
                       real_tokens=data_stats(pairs)["unique_tokens"],  # packed: each prompt once, no padding
                       computed_tokens=sum(s["computed_tokens"] for s in second), steps=args.steps,
                       warmup_s=sum(seconds[: args.steps]), measured_s=sum(seconds[args.steps :]),
                       peak_bytes=peak)


# ---------------------------------------------------------------------------------------------------
# Report

COLUMNS = [("system", 6), ("data", 9), ("setting", 15), ("pairs/s", 9), ("pair tok/s", 11), ("computed tok/step", 17),
           ("pad %", 6), ("peak GiB", 8), ("MFU", 6), ("warm-up s", 9), ("measured s", 10)]


def figures(result: Result, pairs_per_step: int, params: int, peak_flops: float | None) -> dict:
    row = {"system": result.system, "data": result.data, "setting": result.setting.label(pairs_per_step),
           "micro_batch_pairs": result.setting.pairs, "micro_batch_tokens": result.setting.tokens}
    m = result.measurement
    if isinstance(m, str):
        return {**row, "failed": m}
    return {**row, "failed": None, "pairs_per_s": m.pairs / m.measured_s,
            "pair_tokens_per_s": m.pair_tokens / m.measured_s,
            "computed_tokens_per_step": m.computed_tokens / m.steps,
            "padding_share": 1 - m.real_tokens / m.computed_tokens,
            "peak_memory_gib": None if m.peak_bytes is None else m.peak_bytes / GiB,
            "mfu": None if peak_flops is None else 6 * params * m.computed_tokens / m.measured_s / peak_flops,
            "warmup_s": m.warmup_s, "measured_s": m.measured_s}


def format_row(row: dict) -> str:
    if row["failed"]:
        cells = [row["system"], row["data"], row["setting"], row["failed"]]
    else:
        optional = lambda value, spec: "n/a" if value is None else format(value, spec)
        cells = [row["system"], row["data"], row["setting"], f"{row['pairs_per_s']:.2f}",
                 f"{row['pair_tokens_per_s']:,.0f}", f"{row['computed_tokens_per_step']:,.0f}",
                 f"{100 * row['padding_share']:.1f}", optional(row["peak_memory_gib"], ".1f"),
                 optional(row["mfu"], ".1%"), f"{row['warmup_s']:.2f}", f"{row['measured_s']:.2f}"]
    return "  ".join(cell.rjust(width) if i > 2 else cell.ljust(width)
                     for i, (cell, (_, width)) in enumerate(zip(cells, COLUMNS)))


def comparison(rows: list[dict]) -> dict[str, dict]:
    """Per data set, at the same pairs per optimizer step: both at 4 pairs per micro-batch (TRL's unit), and
    each at its fastest setting (btrm's MFU there beside it)."""
    ratios = {}
    for data in dict.fromkeys(row["data"] for row in rows):
        fitted = lambda system: [r for r in rows if r["system"] == system and r["data"] == data and not r["failed"]]
        btrm, trl = fitted("btrm"), fitted("trl")
        if not btrm or not trl:
            continue
        best, trl_best = max(btrm, key=lambda r: r["pairs_per_s"]), max(trl, key=lambda r: r["pairs_per_s"])
        at4 = {name: next((r["pairs_per_s"] for r in system if r["micro_batch_pairs"] == 4), None)
               for name, system in (("btrm", btrm), ("trl", trl))}
        ratios[data] = {"btrm_best_pairs_per_s": best["pairs_per_s"], "btrm_best_setting": best["setting"],
                        "btrm_best_mfu": best["mfu"], "trl_best_setting": trl_best["setting"],
                        "vs_trl_best": best["pairs_per_s"] / trl_best["pairs_per_s"],
                        "at_micro_4": at4["btrm"] / at4["trl"] if at4["btrm"] and at4["trl"] else None}
    return ratios


def print_comparison(ratios: dict[str, dict], pairs_per_step: int) -> None:
    print()
    for name, r in ratios.items():
        at4 = "n/a" if r["at_micro_4"] is None else f"{r['at_micro_4']:.2f}x"
        mfu = "n/a" if r["btrm_best_mfu"] is None else f"{r['btrm_best_mfu']:.1%}"
        print(f"{name}, {pairs_per_step} pairs per step: at 4 pairs per micro-batch btrm is {at4} TRL; "
              f"btrm's best {r['btrm_best_pairs_per_s']:.2f} pairs/s ({r['btrm_best_setting']}, MFU {mfu}) is "
              f"{r['vs_trl_best']:.2f}x TRL's best ({r['trl_best_setting']})")


def compare_reports(paths: list[Path]) -> dict[str, dict]:
    """The comparison of the rows of --json files written by separate runs, which must have measured alike."""
    reports = [json.loads(path.read_text()) for path in paths]
    alike = ("device", "mode", "layers", "hidden", "max_length", "pairs_per_step", "steps", "data")
    for path, report in zip(paths[1:], reports[1:]):
        differ = [key for key in alike if report["header"].get(key) != reports[0]["header"].get(key)]
        if differ:
            raise SystemExit(f"{path} was measured otherwise than {paths[0]} ({', '.join(differ)}): no comparison")
    ratios = comparison([row for report in reports for row in report["results"]])
    print_comparison(ratios, reports[0]["header"]["pairs_per_step"])
    return ratios


def optimizer_memory_note(params: int) -> str:
    return (f"optimizer memory: TRL trains bf16 weights, so AdamW's m and v are bf16 (4 B/param); DeepSpeed's bf16 "
            f"keeps fp32 master weights, m and v (12 B/param) plus an fp32 gradient partition (4 B/param): ~12 B/param "
            f"more, {12 * params / GiB:.1f} GiB for this model on one GPU. In exchange, bf16 weights round away any "
            f"update below ~0.4% of the weight, i.e. most AdamW updates at lr 2e-6.")


def versions() -> dict[str, str | None]:
    """Of the libraries the figures depend on (a GPU image may carry others than this repository pins)."""
    from importlib.metadata import PackageNotFoundError, version

    def of(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    return {package: of(package) for package in ("torch", "transformers", "deepspeed", "trl", "datasets")}


def header(args, device: torch.device, config, params: int, data: dict) -> dict:
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu, {torch.get_num_threads()} torch thread(s)", "versions": versions(),
            "mode": args.mode, "layers": config.num_hidden_layers, "hidden": config.hidden_size, "parameters": params,
            "max_length": args.max_length, "pairs_per_step": args.pairs_per_step, "steps": args.steps,
            "btrm_compile_layers": args.btrm_compile_layers,
            "data": {name: {**data_stats(pairs), "dropped_overlong": dropped}
                     for name, (pairs, dropped) in data.items()}}


def print_header(info: dict) -> None:
    print(f"device: {info['device']}; " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v))
    print(f"model: Qwen3, {info['layers']} layers, hidden {info['hidden']}: "
          f"{info['parameters'] / 1e9:.3f} B parameters; max_length {info['max_length']}")
    print(f"btrm: compile_layers {info['btrm_compile_layers']} (auto: compiled on a GPU)")
    print(f"each setting: {info['steps']} optimizer steps of {info['pairs_per_step']} pairs, timed on a second pass "
          "over the same pairs (the first warms up and is excluded)")
    for name, s in info["data"].items():
        dropped = "" if s["dropped_overlong"] is None else f"; {s['dropped_overlong']} over-long pairs skipped"
        print(f"data {name}: {s['pairs']} pairs, mean sequence {s['mean_sequence']:.0f} tokens "
              f"(max {s['max_sequence']}), mean prompt {s['mean_prompt']:.0f}{dropped}")
    print()
    print("  ".join(name.rjust(width) if i > 2 else name.ljust(width) for i, (name, width) in enumerate(COLUMNS)))


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), default="full", help="full: one GPU; tiny: CPU (CI)")
    parser.add_argument("--data", choices=("synthetic", "real", "both"), default="both")
    parser.add_argument("--systems", default="btrm,trl", help="comma-separated: btrm, trl")
    parser.add_argument("--pairs_per_step", type=int, help="pairs per optimizer step (full 64, tiny 8)")
    parser.add_argument("--steps", type=int, help="optimizer steps timed per setting, after as many warm-up "
                        "steps over the same pairs (full 4, tiny 2)")
    parser.add_argument("--trl_micro_batches", help="TRL pairs per micro-batch, comma-separated (full 4,8,16; tiny 4)")
    parser.add_argument("--btrm_micro_batches", help="btrm pairs per packed micro-batch, comma-separated "
                        "(full 4,16; tiny 4)")
    parser.add_argument("--btrm_max_tokens", help="btrm tokens per micro-batch, comma-separated "
                        "(full 16384,32768,65536; tiny 1024)")
    parser.add_argument("--btrm_compile_layers", choices=("auto", "true", "false"), default="auto",
                        help="btrm's --compile_layers: each decoder layer torch.compiled (auto: on a GPU). false "
                        "measures packing alone, without the compile time of the first steps")
    parser.add_argument("--max_length", type=int, help="longest sequence, both systems (full 4096, tiny 512)")
    parser.add_argument("--data_dir", type=Path, default=REPO.parent / "shared" / "data",
                        help="real data and the Qwen3 tokenizer (real data is skipped without it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the header, rows and ratios here")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="JSON", help="measure nothing: compare the rows of "
                        "these --json files, written by separate runs on the same device, model and data (btrm's and "
                        "TRL's, as benchmarks/gpu_figures.sh's stages write them)")
    args = parser.parse_args(argv)
    for key, value in MODES[args.mode].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.systems = args.systems.split(",")
    args.trl_micro_batches = [int(x) for x in str(args.trl_micro_batches).split(",")]
    args.btrm_micro_batches = [int(x) for x in str(args.btrm_micro_batches).split(",")]
    args.btrm_max_tokens = [int(x) for x in str(args.btrm_max_tokens).split(",")]
    if not set(args.systems) <= {"btrm", "trl"}:
        parser.error(f"--systems: btrm and/or trl, got {args.systems}")
    if any(args.pairs_per_step % micro for micro in args.trl_micro_batches + args.btrm_micro_batches):
        parser.error("--pairs_per_step must be a multiple of every --trl_micro_batches and --btrm_micro_batches size")
    return args


def load_data(args, vocab: int) -> dict[str, tuple[dict, int | None]]:
    """{name: (pairs, over-long pairs dropped, None for synthetic)}; the same pairs go to every setting."""
    count, data = args.pairs_per_step * args.steps, {}
    if args.data in ("synthetic", "both"):
        data["synthetic"] = (synthetic_pairs(count, args.prompt, args.answer, vocab, args.seed), None)
    if args.data in ("real", "both"):
        if args.data_dir.is_dir():
            data["real"] = real_pairs(count, args.data_dir, args.max_length, args.seed)
        else:
            print(f"real data skipped: {args.data_dir} is absent")
    return data


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.compare:
        compare_reports(args.compare)
        return
    if args.mode == "full" and not torch.cuda.is_available():
        raise SystemExit("--mode full needs a GPU (--mode tiny runs on the CPU)")
    device = torch.device("cuda" if args.mode == "full" else "cpu")
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, when deepspeed is first imported
        # A smoke run: one thread keeps it quick when other processes share the cores (oversubscribed
        # OpenMP threads spin-wait, and a 2-thread run on 2 busy cores was 10-20x slower).
        torch.set_num_threads(1)
    import transformers

    transformers.logging.set_verbosity_error()
    if "trl" in args.systems:
        import datasets  # TRL's input; btrm alone runs without it

        datasets.disable_progress_bars()

    config = model_config(args.mode)
    params, peak_flops = parameter_count(config), peak_bf16_flops(device)
    data = load_data(args, config.vocab_size)
    info = header(args, device, config, params, data)
    print_header(info)
    rows = []
    settings = {"trl": [Setting(pairs=n) for n in args.trl_micro_batches],
                "btrm": [Setting(pairs=n) for n in args.btrm_micro_batches] + [Setting(tokens=n) for n in args.btrm_max_tokens]}
    for system, run in (("trl", run_trl), ("btrm", run_btrm)):
        if system not in args.systems:  # TRL first: see the module docstring
            continue
        for name, (pairs, _) in data.items():
            for setting in settings[system]:
                measurement = guarded(lambda: run(config, pairs, setting, args, device), device)
                rows.append(figures(Result(system, name, setting, measurement), args.pairs_per_step, params, peak_flops))
                print(format_row(rows[-1]), flush=True)
                if args.json:  # row by row: a run cut short by a time limit keeps the rows it finished
                    args.json.write_text(json.dumps({"header": info, "results": rows}, indent=2))
    ratios = comparison(rows)
    print_comparison(ratios, args.pairs_per_step)
    if device.type == "cuda":  # on the CPU both train float32 weights
        print(optimizer_memory_note(params))
    if args.json:
        args.json.write_text(json.dumps({"header": info, "results": rows, "comparison": ratios}, indent=2))


if __name__ == "__main__":
    # SIGUSR1 prints every thread's stack and goes on: gpu_figures.sh sends it at a stage's time limit, so
    # that a run cut off shows where it was (compiling, waiting for a replica), then stops it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    main()
