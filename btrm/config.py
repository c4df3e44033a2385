"""Job options: one dataclass per job, exposed as flags; a YAML file supplies values the flags override.

Precedence: defaults < ``--config FILE.yaml`` < flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar, get_type_hints

import yaml

from btrm.deepspeed_configs import load_deepspeed_config

T = TypeVar("T")


def option(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices})


# Scoring an exported model (evaluation, serving): see btrm.scoring.scoring_dtype.
SCORING_DTYPES = ("auto", "bfloat16", "float32")


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("1", "true", "yes", "y", "on"):
        return True
    if str(value).lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_int(value: str | int) -> int:
    try:
        if isinstance(value, (bool, float)):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None


def parse_float(value: str | int | float) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(value)  # also YAML's 2e-6, which PyYAML reads as a string (YAML 1.1 wants 2.0e-6)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None


def parse_str(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # YAML's `use_gpu: true` means "true"
    # A path under ~: a shell expands it only as a word of its own, not in --output=~/x nor in a YAML file, and
    # taken as written it names a folder called "~" in the job's working directory.
    return os.path.expanduser(value) if isinstance(value, str) and value.startswith("~") else str(value)


# How an option's value is read, from a flag's text and from a YAML scalar alike.
VALUE_PARSERS: dict[Any, Callable[[Any], Any]] = {bool: str2bool, int: parse_int, float: parse_float,
                                                  int | None: parse_int, float | None: parse_float}


def gpus_wanted(use_gpu: str) -> bool:
    """A job's --use_gpu: true, false, or auto: whether the Ray cluster has a GPU now (an autoscaling cluster
    whose GPU nodes start only when a job asks for them has none before: there, say true)."""
    if use_gpu == "auto":
        import ray

        return ray.cluster_resources().get("GPU", 0) > 0
    return use_gpu == "true"


USE_GPU_CHOICES = ("auto", "true", "false")


def check_cpus(name: str, cpus: float) -> None:
    """A CPU reservation Ray can make (it refuses a negative one, after it has started, with a traceback)."""
    if not 0 < cpus < math.inf:
        raise ValueError(f"--{name} must be above 0, got {cpus}")


@dataclass
class DataOptions:
    """Options shared by every job that reads preference data."""

    max_length: int = option(4096, "Longest sequence in tokens (prompt + answer), per side.")
    overlong: str = option("truncate_prompt", "What to do with a pair longer than --max_length: cut the shared "
                           "prompt from the left (both answers survive whole) or drop the pair.",
                           ("truncate_prompt", "drop"))
    dataset_format: str = option("standard", "Built-in processor for the data: standard "
                                 "({chosen, rejected} message lists), helpsteer3 (RM-Gallery or NVIDIA layout), "
                                 "hh_rlhf (Human:/Assistant: transcripts).", ("standard", "helpsteer3", "hh_rlhf"))
    custom_bt_dataset_path: str | None = option(None, "Python file defining your own processor class "
                                                "(a BaseBradleyTerryTrainDataset subclass).")
    custom_bt_dataset_name: str | None = option(None, "Name of the processor class in --custom_bt_dataset_path.")
    chat_template: str | None = option(None, "Jinja chat template file for tokenizers without one, or a "
                                       "shipped name: plain (role: content segments, for BERT-style encoders and base decoders).")
    max_drop_fraction: float = option(0.05, "Fail the run, printing the ledger, if more than this share of "
                                      "pairs is dropped (missing labels, invalid, identical, overlong; ties, which hold no "
                                      "preference, are counted apart) or, in an evaluation, left unscored by the model; an "
                                      "evaluation writes the scores of the pairs it kept first, unless its first 2000 "
                                      "rows already show it (then it stops at once).")
    num_data_workers: int = option(2, "Ray Data tasks at a time that read, convert and tokenize pairs.")
    data_worker_cpus: float = option(1.0, "CPUs reserved by each data task.")

    def processor_name(self) -> str:
        return self.custom_bt_dataset_name if self.custom_bt_dataset_path else self.dataset_format

    def validate(self) -> None:
        if bool(self.custom_bt_dataset_path) != bool(self.custom_bt_dataset_name):
            raise ValueError("--custom_bt_dataset_path and --custom_bt_dataset_name go together")
        if self.custom_bt_dataset_path and self.dataset_format != "standard":  # (else one is silently not used)
            raise ValueError(f"--dataset_format {self.dataset_format} and --custom_bt_dataset_path: one processor reads "
                             "the data; give one or the other")
        if not 0 <= self.max_drop_fraction <= 1:
            raise ValueError(f"--max_drop_fraction must be in [0, 1], got {self.max_drop_fraction}")
        if self.num_data_workers < 1:
            raise ValueError(f"--num_data_workers must be at least 1, got {self.num_data_workers}")
        check_cpus("data_worker_cpus", self.data_worker_cpus)


@dataclass
class TrainConfig(DataOptions):
    """Options of `jobs/train.py` / `btrm train` (the reference trainer's names; README says which defaults differ)."""

    # The reference trainer's options that btrm names otherwise or does without: what its command lines get told.
    REFERENCE_ONLY_OPTIONS: ClassVar[dict[str, str]] = {
        "--eval_every_steps": "btrm's is --eval_steps",
        "--save_every_steps": "btrm's is --save_steps",
        "--logging_strategy": "btrm logs every --logging_steps steps; leave it out",
        "--optim": "btrm trains with torch's AdamW in DeepSpeed's engine (fused on GPUs); leave it out",
        "--do_eval": "btrm evaluates when given --eval_set_path or --eval_split_ratio; leave it out",
        "--eval_delay": "btrm evaluates every --eval_steps steps and at the end; leave it out",
        "--local_rank": "Ray Train places the workers (--num_workers); leave it out",
    }

    model_name: str = option("Qwen/Qwen3-1.7B", "Base model: a local directory or a hub name.")
    train_set_path: str | None = option(None, "Training pairs: a parquet file, a directory of shards, a glob, "
                                        "a cloud URI (s3://, gs://) or JSON/JSONL.")
    eval_set_path: str | None = option(None, "Held-out pairs, read like --train_set_path.")
    eval_split_ratio: float = option(0.0, "Without --eval_set_path: hold out this share of the training questions "
                                     "for evaluation, every pair of a held-out question (so no prompt is both "
                                     "trained on and evaluated); chosen by --seed. 0: none.")
    output_path: str = option("./outputs/reward_model", "Where the final Hugging Face model, tokenizer and "
                              "manifest (btrm.json) are written.")
    learning_rate: float = option(2e-6, "Peak learning rate.")
    num_train_epochs: int = option(1, "Passes over the training pairs.")
    max_steps: int = option(-1, "Optimizer steps in all; overrides --num_train_epochs, as in transformers' "
                            "TrainingArguments (the pairs are read again, in a new order, as often as it takes). "
                            "-1: --num_train_epochs decides.")
    bf16: bool = option(True, "Train in bfloat16 (on GPUs; CPU workers train in float32 and say so).")
    per_device_train_batch_size: int = option(1, "Pairs per micro-batch on each worker. An optimizer step takes "
                                              "per_device_train_batch_size x gradient_accumulation_steps pairs "
                                              "per worker; with --packing they are cut by --max_tokens_per_batch.")
    per_device_eval_batch_size: int = option(4, "Pairs per evaluation batch on each worker where pairs are "
                                             "counted, not budgeted in tokens (encoders, --packing false, or "
                                             "--max_tokens_per_batch 0).")
    gradient_accumulation_steps: int = option(64, "An optimizer step takes per_device_train_batch_size x this many "
                                              "pairs per worker (padded: that many micro-batches; with --packing "
                                              "they are cut by --max_tokens_per_batch instead).")
    packing: bool = option(True, "Decoder models: pack pairs into rows without padding, the prompt computed once "
                           "for both answers (exactly the rewards of the padded forward, far less compute). "
                           "Encoders, and --packing false, pad chosen and rejected per micro-batch.")
    max_tokens_per_batch: int = option(16384, "With --packing: most tokens in one micro-batch (a pair counts its "
                                       "prompt once and both answers); at least 2 x --max_length, so every pair "
                                       "fits. Without FlexAttention (CPUs, or sdpa/eager) btrm caps rows at 1024 tokens "
                                       "itself. 0: "
                                       "--per_device_train_batch_size pairs per micro-batch, packed.")
    attn_implementation: str = option("auto", "Attention kernels: auto (flex_attention for packed rows on GPUs, "
                                      "sdpa for packed rows on CPUs, the model's own default for padded pairs), "
                                      "flex_attention, sdpa or eager.",
                                      ("auto", "flex_attention", "sdpa", "eager"))
    compile_layers: str = option("auto", "torch.compile each decoder layer, fusing its element-wise work "
                                 "(norms, rotary, activations); auto: on GPUs below ZeRO-3.", ("auto", "true", "false"))
    gradient_checkpointing: bool = option(True, "Recompute activations in the backward pass to save memory.")
    disable_dropout: bool = option(True, "Set the model's dropout to 0, as TRL's RewardTrainer does: a pair's "
                                   "rewards then do not vary from one forward to the next.")
    deepspeed: str = option("zero2", "DeepSpeed config: a JSON path or a shipped name "
                            "(zero0, zero1, zero2, zero3, zero3_offload).")
    lr_scheduler_type: str = option("linear", "Learning-rate schedule after warm-up (transformers names; constant "
                                    "has no warm-up, constant_with_warmup has).",
                                    ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts",
                                     "polynomial", "inverse_sqrt"))
    warmup_ratio: float = option(0.03, "Share of the optimizer steps spent warming the learning rate up.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0: no clipping).")
    use_margin: bool = option(False, "Use the data's preference strength as a margin in the loss.")
    center_rewards_coefficient: float = option(0.0, "Weight of mean((r_chosen + r_rejected)^2) in the loss.")
    seed: int = option(42, "Random seed (model head, data order).")
    num_workers: int = option(1, "Ray Train workers, one per GPU on a GPU cluster: set it to the GPUs to train on "
                              "(1 trains on one, whatever the cluster has).")
    use_gpu: str = option("auto", "Train on GPUs: auto (when the cluster has any now), true (an autoscaling "
                          "cluster starts GPU nodes for the job) or false.", USE_GPU_CHOICES)
    cpus_per_worker: float = option(1.0, "CPUs reserved by each training worker.")
    logging_steps: int = option(10, "Log metrics every this many optimizer steps.")
    eval_steps: int = option(0, "Evaluate every this many optimizer steps (0: only at the end).")
    eval_before_training: bool = option(False, "Also evaluate the untrained model, to see what training adds.")
    save_steps: int = option(0, "Checkpoint every this many optimizer steps (0: only at the end).")
    save_total_limit: int = option(2, "Checkpoints kept in storage.")
    max_failures: int = option(0, "Worker failures to recover from (from the last checkpoint) before giving up.")
    storage_path: str = option("./runs", "Ray Train storage for checkpoints and results (a directory or a "
                               "cloud URI); the run lives in STORAGE_PATH/RUN_NAME.")
    run_name: str | None = option(None, "Name of the run (Ray Train run, wandb/swanlab run); default: btrm-DATE-TIME.")
    resume: bool = option(False, "Continue the run --run_name from its latest checkpoint in --storage_path "
                          "(with a larger --max_steps or --num_train_epochs, a finished run trains on).")
    report_to: str = option("none", "Experiment tracker, written from rank 0.", ("none", "wandb", "swanlab"))
    project: str = option("btrm", "wandb/swanlab project.")
    tracking_dir: str = option("./tracking", "Where wandb/swanlab keep their local (and offline) run files.")

    def validate(self) -> None:
        super().validate()
        if not self.train_set_path:
            raise ValueError("--train_set_path is required")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "num_train_epochs", "num_workers", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        for name in ("eval_steps", "save_steps", "max_failures", "learning_rate", "weight_decay", "max_grad_norm",
                     "center_rewards_coefficient"):
            if not 0 <= getattr(self, name) < math.inf:  # (NaN too; an infinite rate trains on NaNs)
                raise ValueError(f"--{name} must be at least 0, and finite")
        check_cpus("cpus_per_worker", self.cpus_per_worker)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"--max_steps must be at least 1, or -1 (--num_train_epochs decides), got {self.max_steps}")
        if "://" in self.tracking_dir and self.report_to != "none":
            raise ValueError(f"--tracking_dir {self.tracking_dir}: a local directory (wandb and swanlab write there; "
                             "their runs reach the cloud through their own servers)")
        if "://" in self.output_path:
            raise ValueError(f"--output_path {self.output_path}: a local directory (on the machine running the job); "
                             "the run's checkpoints in --storage_path, which may be a cloud URI, hold the model too")
        if self.max_tokens_per_batch < 0:
            raise ValueError(f"--max_tokens_per_batch must be at least 0 (0: pairs counted), got {self.max_tokens_per_batch}")
        if self.packing and 0 < self.max_tokens_per_batch < 2 * self.max_length:
            raise ValueError(f"--max_tokens_per_batch {self.max_tokens_per_batch} is less than 2 x --max_length "
                             f"({2 * self.max_length}): a pair of that length would not fit one micro-batch")
        if self.resume and not self.run_name:
            raise ValueError("--resume needs the --run_name of the run to continue")
        try:  # a misspelt name or a broken file shows with the usage, before Ray starts
            load_deepspeed_config(self.deepspeed)
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0 <= self.eval_split_ratio < 1:
            raise ValueError(f"--eval_split_ratio must be in [0, 1), got {self.eval_split_ratio}")
        for name, asked in (("--eval_before_training", self.eval_before_training), ("--eval_steps", self.eval_steps)):
            if asked and not (self.eval_set_path or self.eval_split_ratio):
                raise ValueError(f"{name} evaluates on the evaluation set: give --eval_set_path or --eval_split_ratio")
        if self.eval_split_ratio and self.eval_set_path:
            raise ValueError("--eval_split_ratio holds out training pairs for evaluation; with --eval_set_path "
                             "there is an evaluation set already: give one or the other")


def build_parser(cls: type, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file of option values; flags given here override it.")
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"help": f.metadata.get("help", ""), "default": argparse.SUPPRESS,
                                  "type": VALUE_PARSERS.get(kind, parse_str)}
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs.update(nargs="?", const=True, metavar="{true,false}")
        parser.add_argument(f"--{f.name}", **kwargs)
    # Show the defaults in --help even though parsing suppresses them (so the YAML can fill them).
    for action in parser._actions:
        match = next((f for f in dataclasses.fields(cls) if f"--{f.name}" in action.option_strings), None)
        if match is not None and (match.default is not None or not ("default" in action.help or "unset" in action.help)):
            # (an option whose help says what its absence means, "unset: the manifest's", is no "(default: None)")
            action.help = f"{action.help} (default: {match.default})"
    return parser


def recorded_options(config) -> dict[str, Any]:
    """The options as the manifest, trackers and checkpoints record them: source URIs' credentials masked."""
    from btrm.sources import without_credentials

    return {name: without_credentials(value) for name, value in vars(config).items()}


def uploaded_working_dir() -> bool:
    """Whether this driver runs in a Ray job that uploaded its working directory (`ray job submit --working-dir
    .`): every worker of the job then runs in its own node's copy of it."""
    import ray

    if ray.is_initialized() and ray.get_runtime_context().runtime_env.get("working_dir"):
        return True  # (also a driver's own `ray.init(runtime_env={"working_dir": ...})`)
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")  # what Ray gives a job's driver
    return bool((job.get("runtime_env") or {}).get("working_dir"))


def check_job_outputs(paths: dict[str, str]) -> None:
    """Refuses relative paths to write to (option → path) in a Ray job that uploaded its working directory (`ray job
    submit --working-dir .`): each names a place in the job's unpacked copy of that directory on the head node, which
    Ray deletes with its session, and which no other node sees. All of them at once: a submission takes a while."""
    relative = [f"{option} {path}" for option, path in paths.items()
                if "://" not in path and not os.path.isabs(os.path.expanduser(path))]
    if relative and uploaded_working_dir():
        raise SystemExit(f"{', '.join(relative)}: {'a relative path' if len(relative) == 1 else 'relative paths'}, and "
                         f"this Ray job runs in its unpacked copy of the working directory ({os.getcwd()}), which Ray "
                         "deletes with the session: give absolute paths on storage every node reads (or a cloud URI "
                         "where the option takes one)")


def check_writable(option: str, path: str) -> None:
    """Refuses, before any work, a local output whose folder cannot be made or written in (a read-only mount,
    a path through a file): found when the work is done, it would lose the results. Makes nothing (a job that
    fails later leaves no empty folders): the folder's nearest existing ancestor must take a file."""
    folder = Path(os.path.expanduser(path)).absolute().parent
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise SystemExit(f"{option} {path}: cannot write in {folder} ({e.strerror or e}); give a path that can be "
                         "written") from None


def parse_config(cls: type[T], description: str, argv: Sequence[str] | None = None) -> T:
    parser = build_parser(cls, description)
    parsed, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if unknown:
        told = getattr(cls, "REFERENCE_ONLY_OPTIONS", {})
        hints = [f"{name} ({told[name]})" for name in (token.split("=", 1)[0] for token in unknown) if name in told]
        parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; from the reference trainer: {'; '.join(hints)}"
                                                                       if hints else ""))
    args = vars(parsed)
    values: dict[str, Any] = {}
    config_file = args.pop("config", None)
    if config_file:
        values.update(load_yaml(config_file, cls))
    values.update(args)
    try:
        config = cls(**values)
        config.validate()
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    return config


def load_yaml(path: str, cls: type) -> dict[str, Any]:
    path = parse_str(path)  # (--config=~/x.yaml: no shell expands that ~)
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as e:
        raise SystemExit(f"--config {path}: cannot be read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise SystemExit(f"--config {path}: not valid YAML ({e})") from None
    if not isinstance(values, dict):
        raise SystemExit(f"--config {path}: expected a mapping of option: value")
    try:
        return typed_values(cls, values)
    except ValueError as e:
        raise SystemExit(f"--config {path}: {e}") from None


def typed_values(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` named like the fields of the options dataclass ``cls``, each read as its field's type (a YAML
    scalar, or text such as `serve run`'s key=value args) and checked against its choices; ValueError names
    the first unknown or wrong one."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        guesses = sorted({g for name in unknown for g in difflib.get_close_matches(name, fields, n=1)})
        raise ValueError(f"unknown option(s) {unknown}" + (f" (did you mean {', '.join(guesses)}?)" if guesses
                                                           else f"; the options are {sorted(fields)}"))
    hints = get_type_hints(cls)
    typed = {}
    for name, value in values.items():
        if isinstance(value, (list, dict)):  # (str() of it would read as a path: a list of files as a glob)
            raise ValueError(f"{name}: a {'list' if isinstance(value, list) else 'mapping'} ({value!r}); an option "
                             "takes one value (several files: a directory or a glob)")
        if value is None:  # YAML's null (or ~, or a key with no value)
            if fields[name].default is not None:
                raise ValueError(f"{name}: null; give it a value, or leave it out for its default "
                                 f"({fields[name].default!r})")
            typed[name] = None
            continue
        try:
            typed[name] = VALUE_PARSERS.get(hints[name], parse_str)(value)
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{name}: {e}") from None
        choices = fields[name].metadata.get("choices")
        if choices and typed[name] not in choices:
            raise ValueError(f"{name}: {value!r} is not one of {list(choices)}")
    return typed
