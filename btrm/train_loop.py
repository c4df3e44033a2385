"""The per-worker training loop: one DeepSpeed engine per Ray Train worker.

Read top to bottom: set up (model, optimizer, schedule, engine, resume) → for each optimizer step's
pairs: cut them into micro-batches (packed under a token budget, or padded), forward chosen and
rejected together, Bradley-Terry loss, ``engine.backward`` per micro-batch and one ``engine.step``
(DeepSpeed owns clipping, precision and ZeRO) → log, evaluate, checkpoint → evaluate once more and export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
import ray.train
import torch
import torch.distributed as dist

from btrm.batching import DENSE_MASK_TOKENS, FLEX_BLOCK, MicroBatcher, split_to, take
from btrm.config import TrainConfig, recorded_options
from btrm.deepspeed_configs import bf16_enabled, fill_deepspeed_config, load_deepspeed_config
from btrm.export import json_safe, model_on_this_node, write_model_dir
from btrm.loss import bradley_terry_loss, pair_correct
from btrm.model import RewardModel, disable_dropout, load_reward_model, packing_unsupported
from btrm.sources import without_credentials
from btrm.tokenize import load_tokenizer, prepare_tokenizer
from btrm.tracking import Tracker

# Workers log instead of printing: Ray Train 2.60 redirects a worker's print to the root logger and, since
# Ray wraps the worker's stdout, also tees it to that stdout, so every printed line reached the job log twice.
log = logging.getLogger(__name__)

CHECKPOINT_TAG = "deepspeed"
EXPORT_DIR = "model"
EVAL_REWARDS = "eval_rewards.parquet"
TRAINING_LOG = "training_log.jsonl"
# In the final report only, for the driver, which publishes no model of a diverged run: how many of the export's
# weight tensors hold NaN or infinities, and the reward of a one-token conversation (see diverged_figures).
NON_FINITE_TENSORS = "export/non_finite_tensors"
PROBE_REWARD = "export/probe_reward"
RESUME_TERMS = "resume_terms.json"  # beside DeepSpeed's state: the driver checks a --resume against it before starting


@dataclass
class Plan:
    """What the driver decided for every worker (see btrm.train)."""

    config: TrainConfig
    model_path: str
    tokenization: dict[str, Any]
    deepspeed_config: dict[str, Any]
    use_gpu: bool
    total_steps: int
    steps_per_epoch: int
    eval_shards: list[Any]  # one MaterializedDataset per worker, or empty
    ledgers: dict[str, Any]
    # Chosen here, not on a worker: workers Ray Train restarts before the first checkpoint (which keeps it)
    # go on in the same tracker run instead of opening another.
    tracker_run_id: str


@dataclass
class Progress:
    """Where training stands; saved in every checkpoint so a resumed run continues exactly there."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    pairs_seen: int = 0

    @classmethod
    def resumed(cls, saved: dict[str, int], steps_per_epoch: int) -> "Progress":
        """A checkpoint's progress; at the next epoch's start when it was taken at an epoch's last step: a finished
        run extended by more epochs would otherwise read its last epoch's pairs again only to skip them all."""
        progress = cls(**saved)
        if progress.step_in_epoch >= steps_per_epoch:
            progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
        return progress


@dataclass
class Window:
    """Sums over the micro-batches since the last log line, reduced across workers when logged."""

    values: dict[str, float] = field(default_factory=dict)

    def add(self, **sums: float) -> None:
        for k, v in sums.items():
            self.values[k] = self.values.get(k, 0.0) + float(v)

    def reduce(self, device: torch.device) -> dict[str, float]:
        keys = sorted(self.values)
        tensor = torch.tensor([self.values[k] for k in keys], dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        self.values = {}
        return dict(zip(keys, tensor.tolist()))


def _import_deepspeed(use_gpu: bool):
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not use_gpu:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op on first use (minutes on a
        # fresh machine). gloo does the same job, with identical results; skip the build.
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    return deepspeed


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rng_state_{rank}.pt")


def save_rng_state(directory: str, rank: int) -> None:
    """This worker's random-number state (what draws its dropout masks), beside DeepSpeed's in a checkpoint:
    a resumed run draws the masks the uninterrupted run would have (as the Hugging Face Trainer does)."""
    torch.save({"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None},
               _rng_file(directory, rank))


def restore_rng_state(directory: str, rank: int) -> None:
    """The state :func:`save_rng_state` saved; a checkpoint from before btrm saved it keeps the seeded one."""
    if not os.path.exists(_rng_file(directory, rank)):
        return
    state = torch.load(_rng_file(directory, rank), weights_only=False)  # (numpy's state is no tensor)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _optimizer(model, config: TrainConfig, use_gpu: bool) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            # (under ZeRO-3 a parameter is an empty placeholder, its own shape in ds_shape)
            dimensions = len(getattr(parameter, "ds_shape", parameter.shape))
            (no_decay if dimensions < 2 or "norm" in name.lower() else decay).append(parameter)
    groups = [{"params": params, "weight_decay": weight_decay}
              for params, weight_decay in zip((decay, no_decay), _weight_decays(config))]
    return torch.optim.AdamW(groups, lr=config.learning_rate, fused=use_gpu)


def _weight_decays(config: TrainConfig) -> tuple[float, float]:
    """Of the optimizer's two parameter groups: matrices decay, biases and norms do not."""
    return config.weight_decay, 0.0


def follow_schedule(engine, config: TrainConfig) -> None:
    """After a checkpoint is loaded: the learning rate and weight decay of this run's options, on the schedule
    they give at the restored step. The checkpoint's optimizer and scheduler state carry the old run's: a new
    --learning_rate would be ignored, and a run extended with a larger --max_steps would train its first
    resumed step at the finished schedule's last rate (0) before jumping onto the new curve."""
    scheduler, step = engine.lr_scheduler, engine.global_steps
    scheduler.base_lrs = [config.learning_rate] * len(scheduler.base_lrs)
    scheduler.last_epoch = step  # (transformers' schedules are LambdaLR: a rate is base x factor(step))
    rates = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, rate, weight_decay in zip(scheduler.optimizer.param_groups, rates, _weight_decays(config), strict=True):
        group.update(lr=rate, initial_lr=config.learning_rate, weight_decay=weight_decay)
    scheduler._last_lr = rates  # what get_last_lr() (and the engine's get_lr()) report


def engine_config(config: TrainConfig, use_gpu: bool, deepspeed_config: dict[str, Any] | None,
                  model_config) -> dict[str, Any]:
    """The DeepSpeed config of this worker's engine: --deepspeed's (or ``deepspeed_config``), filled for the job's
    options and the model's (its ``PretrainedConfig``) sizes."""
    return fill_deepspeed_config(
        deepspeed_config or load_deepspeed_config(config.deepspeed), micro_batch=config.per_device_train_batch_size,
        accumulation=config.gradient_accumulation_steps, world_size=dist.get_world_size(),
        max_grad_norm=config.max_grad_norm, bf16=config.bf16 and use_gpu,
        hidden_size=getattr(model_config.get_text_config(), "hidden_size", 1024),
    )


def load_classifier(plan: Plan, pad_token_id: int):
    """The classifier to train. Under ZeRO-3 it is built partitioned, each worker holding its share of the weights
    only (deepspeed.zero.Init, which transformers' from_pretrained enters while an HfDeepSpeedConfig lives): loaded
    whole, every worker would hold all of them, in host memory and on its GPU before DeepSpeed partitions them,
    and ZeRO-3 could not train a model larger than one GPU."""
    if plan.deepspeed_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return load_reward_model(plan.model_path, pad_token_id)
    from transformers import AutoConfig
    from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

    # DeepSpeed on Ray Train's process group now (deepspeed.initialize would take it later): zero.Init partitions
    # over its world size, which it reads as 1 until then.
    _import_deepspeed(plan.use_gpu).init_distributed()
    # (a local that lives through the loading: transformers holds it by a weak reference)
    ds_config = engine_config(plan.config, plan.use_gpu, plan.deepspeed_config,
                              AutoConfig.from_pretrained(model_on_this_node(plan.model_path)))
    partitioned = HfDeepSpeedConfig(ds_config)  # noqa: F841
    try:
        return load_reward_model(plan.model_path, pad_token_id)
    finally:  # (transformers reads it while it lives: a model loaded later in this process is loaded whole)
        unset_hf_deepspeed_config()


def build_engine(classifier, config: TrainConfig, use_gpu: bool, total_steps: int,
                 deepspeed_config: dict[str, Any] | None = None):
    """A DeepSpeed engine around ``RewardModel(classifier)``: attention kernels for the batch layout,
    dropout off (by default), gradient checkpointing, compiled layers, AdamW with a transformers schedule.
    Needs torch.distributed."""
    deepspeed = _import_deepspeed(use_gpu)
    ds_config = engine_config(config, use_gpu, deepspeed_config, classifier.config)
    zero3 = ds_config["zero_optimization"].get("stage", 0) == 3
    packed = config.packing and packing_unsupported(classifier) is None
    attention = config.attn_implementation
    if attention == "auto":
        attention = "flex_attention" if packed and use_gpu else ("sdpa" if packed else None)
    if attention:
        classifier.set_attn_implementation(attention)
    if config.disable_dropout:
        disable_dropout(classifier)
    if config.gradient_checkpointing:
        # transformers 5.24 (pinned) renamed it and warns at the old name; the GPU images seen ship 5.17,
        # which knows only the old one.
        if hasattr(classifier, "activation_checkpointing_enable"):
            classifier.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            classifier.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.compile_layers == "true" or (config.compile_layers == "auto" and use_gpu and not zero3):
        # Each layer compiled on its own: the element-wise work fuses, and checkpointing still wraps
        # whole layers. ZeRO-3's gathering hooks would break the graphs, hence not by default there.
        for layer in getattr(classifier.base_model, "layers", []):
            layer.compile(dynamic=True)
    from transformers import get_scheduler

    model = RewardModel(classifier)
    optimizer = _optimizer(model, config, use_gpu)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer,
                              num_warmup_steps=math.ceil(config.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def micro_batcher(classifier, config: TrainConfig, pad_token_id: int, pairs_per_batch: int) -> MicroBatcher:
    packed = config.packing and packing_unsupported(classifier) is None
    flex = classifier.config._attn_implementation == "flex_attention"
    max_tokens = config.max_tokens_per_batch if flex else min(config.max_tokens_per_batch, DENSE_MASK_TOKENS)
    return MicroBatcher(packed, pad_token_id, max_tokens, pairs_per_batch, FLEX_BLOCK if flex else 1)


# Pairs a later epoch's reshuffle mixes at a time on each worker (Ray Data's local shuffle buffer; a
# reference-length pair holds a few tens of kilobytes of token ids).
RESHUFFLE_PAIRS = 4096


def resume_terms(config: TrainConfig, deepspeed_config: dict[str, Any], use_gpu: bool,
                 pairs: int | None = None) -> dict[str, Any]:
    """What a resumed run must keep of the run it continues: what decides which pairs each worker reads, in
    which order (or skipping the steps already trained would skip others), how they are tokenized (the rest
    of the run would train on other ids than the manifest's), the model, and the layout of DeepSpeed's state
    (its ZeRO stage and precisions: load_checkpoint reads the shards back as they were written; under ZeRO-1,
    bf16 summed in float32 is another optimizer). Without
    ``pairs`` (the training pairs the data gave), the terms the options alone decide."""
    terms = {"model_name": config.model_name, "dataset_format": config.processor_name(),
             "max_length": config.max_length, "overlong": config.overlong, "chat_template": config.chat_template,
             "train_set_path": without_credentials(config.train_set_path), "seed": config.seed,
             "eval_split_ratio": config.eval_split_ratio, "num_workers": config.num_workers,
             "pairs_per_step": config.per_device_train_batch_size * config.gradient_accumulation_steps,
             "zero_stage": deepspeed_config.get("zero_optimization", {}).get("stage", 0),
             "bf16": bf16_enabled(deepspeed_config, config.bf16 and use_gpu),
             "grad_accum_dtype": deepspeed_config.get("data_types", {}).get("grad_accum_dtype"),
             # (CPU workers would load a GPU run's DeepSpeed state; and a resume that finds no GPU nodes up, on an
             # autoscaling cluster, says so here rather than as a change of bf16)
             "use_gpu": use_gpu}
    return terms if pairs is None else {**terms, "pairs": pairs}


def latest_checkpoint(run_dir: str) -> ray.train.Result | None:
    """The latest checkpoint of the Ray Train run at ``run_dir`` (the one a resume continues from), with the
    metrics reported with it (its step), or None."""
    # Ray Train logs, reading a run's snapshot, that a new run should have another name or the folder deleted:
    # advice for its controller, not for a driver that is resuming the run on purpose.
    snapshot_log = logging.getLogger("ray.train.v2._internal.execution.checkpoint.checkpoint_manager")
    level = snapshot_log.level
    snapshot_log.setLevel(logging.WARNING)
    try:
        saved = ray.train.Result.from_path(run_dir)
    except RuntimeError:  # the run stopped before Ray Train recorded any checkpoint
        return None
    finally:
        snapshot_log.setLevel(level)
    return saved if saved.checkpoint else None


def recorded_resume_terms(checkpoint: ray.train.Checkpoint | None) -> dict[str, Any] | None:
    """The resume terms ``checkpoint`` recorded; None without one (a resume then starts from the beginning)."""
    if checkpoint is None:
        return None
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/{RESUME_TERMS}") as f:
            return json.loads(f.read())
    except FileNotFoundError:  # a checkpoint from before btrm recorded it
        return None


def check_resume_terms(saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    if saved is None:
        return
    changed = [key for key in now if key in saved and saved[key] != now[key]]
    if changed:
        gpus = (" (--use_gpu true waits for GPU workers: an autoscaling cluster starts GPU nodes for them)"
                if "use_gpu" in changed and saved["use_gpu"] else "")
        raise SystemExit("--resume: the run being continued was trained otherwise ("
                         + "; ".join(f"{key}: {saved[key]!r} then, {now[key]!r} now" for key in changed)
                         + f"). Resume with the same data and options{gpus} (a resume reads the pairs in the same order "
                         "and DeepSpeed's state in the same layout), or start a new run (another --run_name)")


def epoch_order(seed: int, epoch: int) -> dict[str, int]:
    """``iter_batches`` options for an epoch's order. The first epoch reads the driver's global shuffle;
    each later one mixes the pairs again, as a sampler's ``set_epoch`` does, so that no two epochs repeat
    the same steps. Seeded by the epoch: a run resumed mid-epoch reads that epoch's order again and skips
    exactly the steps it had trained."""
    return {} if epoch == 0 else {"local_shuffle_buffer_size": RESHUFFLE_PAIRS, "local_shuffle_seed": seed + epoch}


def train_step(engine, pairs: dict[str, Any], batcher: MicroBatcher, config: TrainConfig) -> dict[str, float]:
    """One optimizer step over ``pairs`` (this worker's share): micro-batches cut by ``batcher``, one
    backward each, one DeepSpeed step. The loss is the mean over the step's pairs however they were cut;
    every worker runs as many micro-batches as the busiest (ZeRO's collectives pair them up). Returns
    sums for the logs."""
    count = len(pairs["prompt_ids"])
    lengths = batcher.lengths(pairs)
    plan = batcher.plan(lengths)
    most = torch.tensor([len(plan)], device=engine.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    plan = split_to(plan, int(most.item()), lengths)
    # Summed on the device and read once per step: reading them per micro-batch would stall the GPU.
    summed = torch.zeros(4, dtype=torch.float64, device=engine.device)  # loss, correct, chosen, rejected
    tokens = computed_tokens = 0
    for i, indices in enumerate(plan):
        batch = batcher.collate(take(pairs, indices)).to(engine.device)
        engine.set_gradient_accumulation_boundary(i == len(plan) - 1)
        r_chosen, r_rejected = batch.pair_rewards(engine(batch))
        loss = bradley_terry_loss(r_chosen, r_rejected, batch.margin if config.use_margin else None,
                                  config.center_rewards_coefficient, reduction="sum")
        engine.backward(loss / count, scale_wrt_gas=False)
        r_chosen, r_rejected = r_chosen.detach(), r_rejected.detach()
        summed += torch.stack([loss.detach(), pair_correct(r_chosen, r_rejected).sum(), r_chosen.sum(),
                               r_rejected.sum()]).double()
        tokens, computed_tokens = tokens + batch.num_tokens, computed_tokens + batch.computed_tokens
    if not (engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled()):
        # DeepSpeed's ZeRO and 16-bit optimizers measure the gradient norm (before clipping) and the engine
        # takes it from their _global_grad_norm after the step; a plain optimizer (zero0 in float32) has none,
        # and the log would say NaN. Measured here, on the gradients averaged across workers, before step()
        # clips and clears them.
        engine.optimizer._global_grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in engine.module.parameters() if p.grad is not None]).item()
    engine.step()
    loss, correct, chosen, rejected = summed.tolist()
    return {"loss": loss, "correct": correct, "chosen": chosen, "rejected": rejected, "pairs": count,
            "tokens": tokens, "computed_tokens": computed_tokens, "micro_batches": len(plan), "steps": 1}


def _quiet_worker_console(rank: int) -> None:
    """Keeps the job log to btrm's progress lines and what a user can act on. On each worker:

    - Ray Train 2.60 logs each ``ray.train.report``, its whole metrics dict, at INFO: two long lines per
      checkpoint. Its logger is named by its file path, so RunConfig's LoggingConfig level (which filters
      ``ray.train.*``) does not reach it.
    - Ray Data logs each evaluation pass over the worker's eval shard (start, plan, finish) at INFO, and
      warns once that progress bars are off (btrm turns them off: the job log has its own progress).
    - transformers draws progress bars for loading and saving a few-megabyte model, and every worker prints the
      same load report (a base model's new score head: "MISSING ... newly initialized"): rank 0's is enough.
      Where ``CI`` is set (GitHub Actions, GitLab), transformers also passes its records up to the root logger,
      which Ray Train prints to the worker's console too: each of its messages would show twice.
    - DeepSpeed calls ``torch.distributed.all_gather_into_tensor``, deprecated in torch 2.13: a
      FutureWarning per worker that only a DeepSpeed release can act on.
    """
    import warnings

    from ray.train.v2._internal.execution import context
    from transformers.utils import logging as transformers_logging

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    transformers_logging.disable_progress_bar()
    transformers_logging.disable_propagation()
    if rank != 0:
        transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message="`torch.distributed.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


def train_loop_per_worker(loop_config: dict[str, Plan]) -> None:
    plan = loop_config["plan"]
    config = plan.config
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    _quiet_worker_console(rank)
    _seed_everything(config.seed)

    tokenizer = prepare_tokenizer(load_tokenizer(plan.model_path), plan.tokenization["chat_template"])
    classifier = load_classifier(plan, tokenizer.pad_token_id)
    engine = build_engine(classifier, config, plan.use_gpu, plan.total_steps, plan.deepspeed_config)
    zero3 = engine.zero_optimization_partition_weights()
    train_batcher = micro_batcher(classifier, config, tokenizer.pad_token_id, config.per_device_train_batch_size)
    eval_batcher = micro_batcher(classifier, config, tokenizer.pad_token_id, config.per_device_eval_batch_size)
    if rank == 0:
        reason = config.packing and packing_unsupported(classifier)
        log.info(f"[btrm] {config.per_device_train_batch_size * config.gradient_accumulation_steps} pairs per worker and "
                 f"optimizer step, in {train_batcher.describe()}"
                 + (f" (no packing: {reason})" if reason else ""))

    progress = Progress()
    history: list[dict[str, Any]] = []  # the log lines, exported as training_log.jsonl
    before: dict[str, float] = {}  # the untrained model's eval figures (--eval_before_training)
    tracker_run_id = plan.tracker_run_id  # or a resumed run's, to go on in
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            _, client_state = engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
            restore_rng_state(directory, rank)
        follow_schedule(engine, config)
        progress = Progress.resumed(client_state["progress"], plan.steps_per_epoch)
        # A resumed run (--resume, or Ray Train restarting failed workers) exports the whole log, not its own part.
        history, before = client_state["history"], client_state["before"]
        tracker_run_id = client_state.get("tracker_run_id") or tracker_run_id  # (older checkpoints kept none)
        if rank == 0:
            log.info(f"[btrm] resumed from step {progress.global_step} (epoch {progress.epoch}, "
                     f"{progress.pairs_seen} pairs seen)")

    tracker = (Tracker(config.report_to, config.project, config.run_name, recorded_options(config), config.tracking_dir,
                       tracker_run_id) if rank == 0 else None)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = plan.eval_shards[rank] if plan.eval_shards else None
    window = Window()

    def record(metrics: dict[str, float]) -> None:
        """Into the tracker and the log."""
        if tracker:
            tracker.log(metrics, step=progress.global_step)
        history.append({**metrics, "step": progress.global_step})

    def report(metrics: dict[str, float], checkpoint_dir: str) -> None:
        """To Ray Train, with the checkpoint directory to persist. Only with a checkpoint: Ray Train 2.60 keeps
        no metrics but a checkpoint's, and each report waits for its controller to take the previous one (a
        queue of one, polled every 2 s), so reporting every log step would hold fast steps to one per 2 s."""
        ray.train.report({**metrics, "step": progress.global_step, "epoch": progress.epoch},
                         checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir))

    def save_state(directory: str) -> None:
        engine.save_checkpoint(directory, tag=CHECKPOINT_TAG,
                               client_state={"progress": vars(progress), "history": history, "before": before,
                                             "tracker_run_id": tracker.run_id if tracker else None})
        save_rng_state(directory, rank)
        if rank == 0:
            with open(os.path.join(directory, RESUME_TERMS), "w") as f:
                json.dump(resume_terms(config, plan.deepspeed_config, plan.use_gpu, plan.ledgers["train"]["pairs"]), f)

    def save_checkpoint(metrics: dict[str, float]) -> None:
        if metrics:
            record(metrics)  # first: the checkpoint's log includes this step's line
        with tempfile.TemporaryDirectory() as directory:
            save_state(directory)
            report(metrics, directory)

    def evaluate() -> dict[str, Any] | None:
        if eval_shard is None:
            return None
        result = evaluate_pairs(engine, eval_shard, eval_batcher, lockstep=zero3)
        if rank == 0:
            log.info(f"[btrm] eval @ step {progress.global_step}: accuracy {result['eval/accuracy']:.4f} over "
                     f"{result['eval/pairs']} pairs, loss {result['eval/loss']:.4f}")
        return result

    if config.eval_before_training and progress.global_step == 0:
        before = {f"{k}_before_training": v for k, v in (evaluate() or {}).items() if k != "rewards"}
        record(before)

    # Throughput counts the time in training steps only, not evaluations and checkpoints between logs; the
    # ETA, the time since training began (the evaluation of the untrained model is no training step's).
    started, train_seconds, steps_at_start = time.time(), 0.0, progress.global_step
    pairs_per_step = config.per_device_train_batch_size * config.gradient_accumulation_steps
    done = progress.global_step >= plan.total_steps
    if done and rank == 0:
        log.info(f"[btrm] the run had trained its {progress.global_step} steps already: nothing more to train (raise "
                 "--max_steps or --num_train_epochs to go on); evaluating and exporting it again")
    while not done:  # epochs until the plan's steps are done (--max_steps may ask for more than one, or less)
        engine.train()
        steps = train_shard.iter_batches(batch_size=pairs_per_step, batch_format="numpy", prefetch_batches=2,
                                         **epoch_order(config.seed, progress.epoch))
        for index, pairs in enumerate(steps):
            if index < progress.step_in_epoch:
                continue  # resumed mid-epoch: these steps were trained before the checkpoint
            step_started = time.time()
            learning_rate = engine.get_lr()[0]  # the step's own: engine.step() moves the schedule on
            window.add(**train_step(engine, pairs, train_batcher, config))  # returns once the step is done
            train_seconds += time.time() - step_started
            progress.step_in_epoch = index + 1
            progress.pairs_seen += len(pairs["prompt_ids"]) * world_size
            progress.global_step = engine.global_steps
            step = progress.global_step
            metrics: dict[str, float] = {}
            if step % config.logging_steps == 0 or step == plan.total_steps:
                metrics = _train_metrics(window.reduce(device), engine, train_seconds, learning_rate)
                train_seconds = 0.0
                if rank == 0:
                    _log_progress(step, plan.total_steps, metrics, time.time() - started, step - steps_at_start)
            if config.eval_steps and step % config.eval_steps == 0 and step != plan.total_steps:
                metrics.update({k: v for k, v in (evaluate() or {}).items() if k != "rewards"})
            if config.save_steps and step % config.save_steps == 0 and step != plan.total_steps:
                save_checkpoint(metrics)
            elif metrics:
                record(metrics)
            if step >= plan.total_steps:
                done = True
                break
        else:
            progress.epoch += 1
            progress.step_in_epoch = 0

    final = evaluate() or {}
    metrics = {**before, **{k: v for k, v in final.items() if k != "rewards"}, "final": 1.0}
    if history and history[-1].get("final") and history[-1]["step"] == progress.global_step:
        history.pop()  # a finished run resumed with nothing more to train: its final line once, the latest
    record(metrics)
    with tempfile.TemporaryDirectory() as directory:
        # The final checkpoint holds the DeepSpeed state and the log (a later run under the same name continues
        # from it) and, under model/, the export. Ray Train persists it to storage, from where the driver
        # publishes model/ at --output_path (rank 0 may run on another node than the driver).
        save_state(directory)
        # Every rank takes part in gathering ZeRO-3 shards; rank 0 writes the export. Both are the root module's
        # (RewardModel's): keys under `classifier.`, taken off once below (a BERT's own head is `classifier` too).
        state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3 else engine.module.state_dict()
        # A diverged run's model scores every pair NaN: the driver is told, and publishes nothing over what
        # --output_path holds (the checkpoint keeps the model and its log, to see where it went wrong).
        metrics = {**metrics, **diverged_figures(engine, state_dict, eval_batcher)}
        if rank == 0:
            export_dir = os.path.join(directory, EXPORT_DIR)
            state_dict = {k.removeprefix("classifier."): v for k, v in state_dict.items()}
            write_model_dir(export_dir, engine.module.classifier, state_dict, tokenizer,
                            _manifest(plan, tokenizer, final, progress))
            _write_side_files(export_dir, plan.ledgers, history, final.get("rewards"))
        report(metrics, directory)
    if tracker:
        tracker.finish()


@torch.no_grad()
def diverged_figures(engine, state_dict: dict[str, torch.Tensor] | None, batcher: MicroBatcher) -> dict[str, float]:
    """What tells a diverged model, the same on every rank (the driver gets one rank's report): how many weight
    tensors hold NaN or infinities (counted where a rank holds ``state_dict``: under ZeRO-3 only rank 0, None
    elsewhere), and the reward of a one-token conversation, which a model whose weights overflow every forward
    (huge, yet finite) scores NaN. Not the loss: DeepSpeed skips a step whose gradients overflow, and one NaN
    micro-batch in the last logged steps says nothing of the model."""
    # (max and min: NaN and infinities show in them, and neither makes a tensor as large as the weight, as
    # isfinite would: an embedding's worth of GPU memory at the end of a long run)
    count = sum(1 for tensor in (state_dict or {}).values() if tensor.is_floating_point() and tensor.numel()
                and not (torch.isfinite(tensor.max()) and torch.isfinite(tensor.min())))
    non_finite = torch.tensor([count], device=engine.device)
    dist.all_reduce(non_finite, op=dist.ReduceOp.MAX)
    engine.eval()  # (a forward on every rank: under ZeRO-3 it is a collective)
    probe = batcher.collate(_FILLER_PAIRS).to(engine.device)
    reward = engine(probe)[0].item()
    engine.train()
    return {NON_FINITE_TENSORS: int(non_finite.item()), PROBE_REWARD: reward}


def _write_side_files(export_dir: str, ledgers: dict[str, Any], history: list[dict[str, Any]], rewards) -> None:
    for name, ledger in ledgers.items():
        with open(os.path.join(export_dir, f"ledger_{name}.json"), "w") as f:
            json.dump(ledger, f, indent=2)
    with open(os.path.join(export_dir, TRAINING_LOG), "w") as f:
        f.writelines(json.dumps(json_safe(line), allow_nan=False) + "\n" for line in history)
    if rewards is not None:
        pq.write_table(rewards, os.path.join(export_dir, EVAL_REWARDS))


def _train_metrics(sums: dict[str, float], engine, seconds: float, learning_rate: float) -> dict[str, float]:
    pairs = max(sums["pairs"], 1.0)
    grad_norm = engine.get_global_grad_norm()
    return {
        "train/loss": sums["loss"] / pairs,
        "train/accuracy": sums["correct"] / pairs,
        "train/reward_chosen": sums["chosen"] / pairs,
        "train/reward_rejected": sums["rejected"] / pairs,
        "train/margin": (sums["chosen"] - sums["rejected"]) / pairs,
        "train/learning_rate": learning_rate,
        "train/grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
        "train/pairs_per_second": sums["pairs"] / seconds,
        "train/tokens_per_second": sums["tokens"] / seconds,
        "train/computed_tokens_per_second": sums["computed_tokens"] / seconds,
        "train/micro_batches_per_step": sums["micro_batches"] / max(sums["steps"], 1.0),
    }


def _log_progress(step: int, total: int, metrics: dict[str, float], elapsed: float, steps_done: int) -> None:
    eta = elapsed / max(steps_done, 1) * (total - step)
    log.info(f"[btrm] step {step}/{total} ({step / total:.0%}) loss {metrics['train/loss']:.4f} "
             f"acc {metrics['train/accuracy']:.3f} margin {metrics['train/margin']:+.3f} "
             f"lr {metrics['train/learning_rate']:.2e} grad_norm {metrics['train/grad_norm']:.3f} "
             f"{metrics['train/pairs_per_second']:.1f} pairs/s {metrics['train/tokens_per_second']:.0f} tok/s "
             f"elapsed {_duration(elapsed)} ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


@torch.no_grad()
def evaluate_pairs(engine, shard, batcher: MicroBatcher, lockstep: bool) -> dict[str, Any]:
    """Rewards of every eval pair of this worker's shard, gathered on every rank; exact figures over all
    pairs (not a mean of batch means). ``lockstep`` (ZeRO-3: a forward is a collective) makes every
    rank run as many forwards as the busiest one."""
    engine.eval()
    ids, chosen, rejected = [], [], []
    # Streamed: a large eval set is never held whole as micro-batches.
    work = (take(pairs, indices) for pairs in shard.iter_batches(batch_size=4096, batch_format="numpy")
            for indices in batcher.plan(batcher.lengths(pairs)))
    while True:
        pairs = next(work, None)
        if lockstep:  # one forward on every rank while any rank has pairs left
            more = torch.tensor([pairs is not None], dtype=torch.int32, device=engine.device)
            dist.all_reduce(more, op=dist.ReduceOp.MAX)
            if not more.item():
                break
        elif pairs is None:
            break
        batch = batcher.collate(_FILLER_PAIRS if pairs is None else pairs).to(engine.device)
        r_c, r_r = batch.pair_rewards(engine(batch))
        if pairs is None:
            continue
        ids.extend(str(x) for x in pairs["id"])
        chosen.extend(r_c.tolist())
        rejected.extend(r_r.tolist())
    engine.train()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (ids, chosen, rejected))
    ids = [x for part in gathered for x in part[0]]
    r_c = np.array([x for part in gathered for x in part[1]], dtype=np.float64)
    r_r = np.array([x for part in gathered for x in part[2]], dtype=np.float64)
    if len(ids) == 0:
        return {}
    both = np.concatenate([r_c, r_r])
    return {
        "eval/accuracy": float(np.mean(r_c > r_r)),
        "eval/loss": float(np.mean(np.logaddexp(0.0, r_r - r_c))),  # -log(sigmoid(r_c - r_r)), stable
        "eval/pairs": len(ids),
        # (a diverged model scores them all NaN: the driver then publishes nothing)
        "eval/non_finite_pairs": int(np.sum(~(np.isfinite(r_c) & np.isfinite(r_r)))),
        "eval/reward_chosen": float(r_c.mean()),
        "eval/reward_rejected": float(r_r.mean()),
        "eval/reward_mean": float(both.mean()),
        "eval/reward_std": float(both.std()),
        "rewards": pa.table({"id": ids, "reward_chosen": r_c, "reward_rejected": r_r}),
    }


# A one-token pair: the forward a rank with no eval pairs left runs so that ZeRO-3's collectives pair up.
_FILLER_PAIRS = {"prompt_ids": [[0]], "chosen_ids": [[0]], "rejected_ids": [[0]], "margin": np.zeros(1, np.float32)}


def _manifest(plan: Plan, tokenizer, final: dict[str, Any], progress: Progress) -> dict[str, Any]:
    return {
        "format": "btrm reward model v1",
        "base_model": plan.config.model_name,
        "tokenization": {**plan.tokenization, "chat_template": tokenizer.chat_template},
        "reward_token_rule": (
            "last token of the templated conversation" if plan.tokenization["reward_token"] == "last"
            else "first token of the templated conversation (the encoder's pooled token)"
        ),
        "pad_token_id": tokenizer.pad_token_id,
        "eval": {k.removeprefix("eval/"): v for k, v in final.items() if k != "rewards"},
        "training": {"steps": progress.global_step, "pairs_seen": progress.pairs_seen,
                     "options": recorded_options(plan.config)},
        "data": plan.ledgers,
    }
