"""The training job's driver: data through Ray Data, a TorchTrainer over DeepSpeed workers, the export.

    pairs (Ray Data: read → process → validate → tokenize; ledger checked before any training)
      → TorchTrainer(train_loop_per_worker) on N workers, train pairs streamed with get_dataset_shard
      → final checkpoint = the exported model → published atomically at --output_path
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from btrm.config import TrainConfig, check_job_outputs, check_writable, gpus_wanted
from btrm.data import DataSpec, build_pair_dataset, check_drop_fraction, close_ledger, new_ledger, split_by_question
from btrm.deepspeed_configs import fill_deepspeed_config, load_deepspeed_config, precision_note
from btrm.export import ExportNotReplaceable, check_replaceable, publish_dir
from btrm.model import check_reward_architecture, embedding_rows, position_limit, resolve_model_path, reward_token_rule
from btrm.sources import without_credentials
from btrm.tokenize import TEMPLATE_DATE, TokenizationSpec, load_tokenizer, prepare_tokenizer, read_chat_template
from btrm.tracking import check_tracker, new_run_id
from btrm.train_loop import (EXPORT_DIR, NON_FINITE_TENSORS, PROBE_REWARD, Plan, check_resume_terms, latest_checkpoint,
                             recorded_resume_terms, resume_terms, train_loop_per_worker)


def tokenization_for(model_path: str, model_config, config) -> TokenizationSpec:
    """The tokenization a model (at ``model_path``, its ``AutoConfig`` ``model_config``) gets, checked on the
    driver (no chat template, too long a max_length, a tokenizer with more tokens than the embedding has rows)."""
    limit = position_limit(model_config)
    if limit is not None and config.max_length > limit:
        raise SystemExit(f"--max_length {config.max_length} exceeds what {config.model_name} can read "
                         f"({limit} positions); lower it")
    try:
        spec = TokenizationSpec(max_length=config.max_length, overlong=config.overlong,
                                reward_token=reward_token_rule(model_config),
                                chat_template=read_chat_template(config.chat_template), date_string=TEMPLATE_DATE)
        tokenizer = prepare_tokenizer(load_tokenizer(model_path), spec.chat_template)
    except (FileNotFoundError, ValueError) as e:  # no such --chat_template; a tokenizer without one: what to pass
        raise SystemExit(str(e)) from None
    check_embedding_rows(tokenizer, model_config, config.model_name)
    return spec


def check_embedding_rows(tokenizer, model_config, model_name: str) -> None:
    """Refuses a tokenizer whose text can reach a token id the model's embedding lacks (one extended, the model
    never resized): the first forward that meets it fails, on GPUs as a bare 'device-side assert'. Special
    tokens past the embedding (Gemma 3's <image_soft_token>) only come from text holding them literally: noted."""
    rows = embedding_rows(model_config)
    if rows is None:
        return
    beyond = {token.content: token.special for i, token in tokenizer.added_tokens_decoder.items() if i >= rows}
    plain = [content for content, special in beyond.items() if not special]
    if tokenizer.vocab_size > rows or plain:
        raise SystemExit(f"{model_name}: its tokenizer has {len(tokenizer)} tokens and the model's embedding {rows} "
                         f"rows, and text can reach the ones past it ({plain[:5] or 'its base vocabulary'}): the "
                         "first forward that meets one fails (on GPUs as a 'device-side assert'). Resize the "
                         "embedding and save the model (model.resize_token_embeddings(len(tokenizer))), or use the "
                         "tokenizer it was trained with")
    if beyond:
        print(f"[btrm] note: special tokens {sorted(beyond)[:5]} have ids past the model's {rows} embedding rows; a "
              "pair whose text holds one literally is dropped as invalid", flush=True)


def planned_pairs(name: str, path: str, model_path: str, spec: TokenizationSpec, config,
                  rows: int | None) -> tuple[Any, Any]:
    """(a lazy dataset of tokenized pairs, its ledger). Its processor is loaded and its files listed and
    checked now (build_pair_dataset), before any pair is read. ``rows``: the model's embedding rows (a pair
    holding a token past them is invalid)."""
    ledger = new_ledger(name, config.max_drop_fraction)
    data_spec = DataSpec(path=path, tokenizer_path=model_path, tokenization=spec,
                         dataset_format=config.processor_name(), custom_bt_dataset_path=config.custom_bt_dataset_path,
                         embedding_rows=rows)
    return build_pair_dataset(data_spec, ledger, config.num_data_workers, config.data_worker_cpus), ledger


def materialized_pairs(dataset, ledger, config, hold_out: float = 0.0, shuffle: bool = False) -> tuple[Any, dict, Any]:
    """The pairs of :func:`planned_pairs`, read, tokenized and materialized (each epoch rereads them; Ray
    spills to disk what memory cannot hold), with the closed ledger and, with ``hold_out``, the pairs of that
    share of the questions, held out of the rest (else None). ``shuffle``: in --seed's order (training's)."""
    held_out = None
    if hold_out:
        # The pipeline runs once for both sides: the ledger counts every row once.
        dataset, held_out = split_by_question(dataset.materialize(), hold_out, config.seed)
        held_out = held_out.materialize()
    if shuffle:
        dataset = dataset.random_shuffle(seed=config.seed)
    dataset = dataset.materialize()
    summary = close_ledger(ledger)
    check_drop_fraction(summary, config.max_drop_fraction)
    return dataset, summary, held_out


def train_data_config() -> DataConfig:
    """The training pairs split among the workers in order, never by where their blocks happen to sit: a
    run restarted or resumed on other nodes deals every worker the same pairs, so it skips exactly the
    steps it had trained (Ray Train's default ingest options take the driver's preserve_order=False, and
    locality hints then route blocks by node)."""
    ingest = DataConfig.default_ingest_options()
    ingest.preserve_order = True
    return DataConfig(datasets_to_split=["train"], execution_options={"train": ingest})


def check_margins(ledger: dict[str, Any], path: str) -> None:
    """--use_margin trains on the pairs' preference strengths: data that gives none would train a plain
    Bradley-Terry loss while the run says otherwise."""
    with_margin, pairs = ledger["with_margin"], ledger["pairs"]
    if with_margin == 0:
        raise SystemExit(f"--use_margin: none of the {pairs} training pairs of {without_credentials(path)} carries a "
                         "margin (the standard format's `margin` field; helpsteer3's preference strength): give the "
                         "pairs margins, or leave out --use_margin")
    if with_margin < pairs:
        print(f"[btrm] --use_margin: {pairs - with_margin} of the {pairs} training pairs carry no margin and train "
              "with margin 0", flush=True)


def in_run(storage_path: str, run_name: str, *parts: str) -> str:
    """STORAGE/NAME[/PARTS...], a URI's options (s3://b/runs?endpoint_override=...) kept at its end."""
    base, mark, query = storage_path.partition("?") if "://" in storage_path else (storage_path, "", "")
    return "/".join([base.rstrip("/"), run_name, *parts]) + mark + query


def check_run_directory(storage_path: str, run_name: str, resume: bool) -> ray.train.Checkpoint | None:
    """Ray Train continues any run it finds under STORAGE/NAME; make that a choice, not a surprise. The
    checkpoint a resume continues from, if the run has one."""
    filesystem, root = pafs.FileSystem.from_uri(storage_path) if "://" in storage_path else (pafs.LocalFileSystem(), storage_path)
    exists = filesystem.get_file_info(f"{root}/{run_name}").type != pafs.FileType.NotFound
    where = without_credentials(storage_path)
    if resume and not exists:
        raise SystemExit(f"--resume: there is no run {run_name!r} in {where}")
    latest = latest_checkpoint(in_run(storage_path, run_name)) if exists else None
    checkpoint = latest.checkpoint if latest else None
    if exists and not resume:
        if checkpoint is None:
            raise SystemExit(f"run {run_name!r} already exists in {where}, stopped before its first checkpoint (nothing "
                             "to continue): pass --resume to train it again from the start under that name, or choose "
                             "another --run_name")
        raise SystemExit(f"run {run_name!r} already exists in {where}: pass --resume to continue it from its latest "
                         "checkpoint, or choose another --run_name")
    if resume and checkpoint is None:
        print(f"[btrm] --resume: run {run_name!r} stopped before its first checkpoint: training it from the start",
              flush=True)
    return checkpoint


def stopped_run_note(storage_path: str, run_name: str) -> str:
    """What a run that stopped before its end (Ctrl-C, a failure past --max_failures) can be continued from."""
    latest = latest_checkpoint(in_run(storage_path, run_name))
    if latest is None:
        return (f"run {run_name!r} stopped before its first checkpoint: the same command with --resume --run_name "
                f"{run_name} trains it again from the start")
    where = in_run(without_credentials(storage_path), run_name, Path(latest.checkpoint.path).name)
    return (f"run {run_name!r} stopped; its latest checkpoint, at step {latest.metrics.get('step', '?')}, is {where}: "
            f"the same command with --resume --run_name {run_name} continues from it")


def cpu_shortfall_note(config: TrainConfig, cluster_cpus: float) -> str | None:
    """Workers that reserve more CPUs than the cluster has: Ray Train waits for them without end (an autoscaler
    may be about to add them, so this is no refusal), and its own message blames a timeout."""
    wanted = config.num_workers * config.cpus_per_worker
    if wanted <= cluster_cpus:
        return None
    return (f"WARNING: --num_workers {config.num_workers} x --cpus_per_worker {config.cpus_per_worker:g} = {wanted:g} "
            f"CPUs, and this Ray cluster has {cluster_cpus:g}: the workers start only once an autoscaler adds CPUs "
            "(until then Ray Train logs WorkerGroupStartupTimeoutError every 60 s and retries); on one machine, lower "
            "--num_workers or --cpus_per_worker")


def check_apart_from_export(config: TrainConfig, storage_path: str) -> None:
    """Publishing replaces --output_path whole: the run's checkpoints and tracker files must not be inside it
    (they were deleted with an earlier export), nor the export inside the run's directory."""
    output = Path(config.output_path).resolve()
    inside = {"--storage_path": storage_path}
    if config.report_to != "none":
        inside["--tracking_dir"] = config.tracking_dir
    for option, path in inside.items():
        if "://" not in path and Path(path).resolve().is_relative_to(output):
            raise SystemExit(f"{option} {path} is inside --output_path {config.output_path}, which the export "
                             "replaces whole: give them places apart")
    if "://" not in storage_path and output.is_relative_to(Path(storage_path, config.run_name).resolve()):
        raise SystemExit(f"--output_path {config.output_path} is inside the run's directory under --storage_path "
                         f"({Path(storage_path, config.run_name)}), where Ray Train writes checkpoints: give another")


def run_training(config: TrainConfig) -> ray.train.Result:
    from transformers import AutoConfig

    check_tracker(config.report_to)
    outputs = {"--output_path": config.output_path, "--storage_path": config.storage_path}
    if config.report_to != "none":  # an offline run's files, `wandb sync`'s input, would go with the session
        outputs["--tracking_dir"] = config.tracking_dir
    check_job_outputs(outputs)
    config.run_name = config.run_name or time.strftime("btrm-%Y%m%d-%H%M%S")
    storage_path = config.storage_path if "://" in config.storage_path else os.path.abspath(config.storage_path)
    resumed_from = check_run_directory(storage_path, config.run_name, config.resume)
    config.tracking_dir = os.path.abspath(config.tracking_dir)  # workers have another working directory
    check_apart_from_export(config, storage_path)
    check_replaceable(config.output_path)  # now, not after the training it would take to find out
    check_writable("--output_path", config.output_path)
    model_path = resolve_model_path(config.model_name)
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as e:  # no such directory, no hub to reach, not a model transformers knows
        where = "a directory here" if os.path.isdir(model_path) else "not a directory here, so a hub name"
        raise SystemExit(f"--model_name {config.model_name}: {where}, and its config cannot be loaded: {e}") from None
    try:
        check_reward_architecture(model_config)
    except ValueError as e:
        raise SystemExit(f"--model_name {config.model_name}: {e}") from None
    spec = tokenization_for(model_path, model_config, config)
    if not ray.is_initialized():  # (after the checks above: a wrong run name or path is said at once)
        ray.init()
    use_gpu = gpus_wanted(config.use_gpu)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    if use_gpu and config.use_gpu == "auto" and gpus < config.num_workers:
        # (Ray would wait for GPUs that may never come, saying only that the workers cannot be scheduled)
        raise SystemExit(f"--use_gpu auto: the cluster has {gpus} GPU(s) and --num_workers {config.num_workers} needs "
                         f"one each: lower --num_workers, or --use_gpu true where an autoscaler adds GPU nodes, or "
                         "--use_gpu false to train on CPUs")
    if use_gpu and gpus > config.num_workers:  # (accelerate and torchrun users expect every GPU to be used)
        print(f"[btrm] note: the cluster has {gpus} GPUs and --num_workers {config.num_workers} trains on "
              f"{config.num_workers}; --num_workers {gpus} trains on all of them", flush=True)
    shortfall = cpu_shortfall_note(config, ray.cluster_resources().get("CPU", 0))
    if shortfall:
        print(f"[btrm] {shortfall}", flush=True)
    if config.attn_implementation == "flex_attention" and not use_gpu:  # (else every worker's first step fails)
        raise SystemExit("--attn_implementation flex_attention: FlexAttention has no CPU backward, and these workers "
                         "train on CPUs: use sdpa, or auto (sdpa on CPUs, flex_attention on GPUs)")
    deepspeed_config = load_deepspeed_config(config.deepspeed)
    try:  # each worker fills it (with the model's sizes); what is wrong with it shows now, before any data is read
        filled = fill_deepspeed_config(deepspeed_config, micro_batch=config.per_device_train_batch_size,
                                       accumulation=config.gradient_accumulation_steps, world_size=config.num_workers,
                                       max_grad_norm=config.max_grad_norm, bf16=config.bf16 and use_gpu, hidden_size=1)
    except ValueError as e:
        raise SystemExit(f"--deepspeed {config.deepspeed}: {e}") from None
    precision = precision_note(filled, use_gpu=use_gpu, bf16_asked=config.bf16, deepspeed=config.deepspeed,
                               pairs_per_step=config.per_device_train_batch_size * config.gradient_accumulation_steps)
    if precision:
        print(f"[btrm] {precision}", flush=True)

    recorded_terms = recorded_resume_terms(resumed_from)
    # What the options alone decide, before the data is read: a wrong resume stops at once.
    check_resume_terms(recorded_terms, resume_terms(config, deepspeed_config, use_gpu))

    rows = embedding_rows(model_config)
    # Both sets planned before either is read: a wrong --eval_set_path stops the job now, not after the
    # training pairs' tokenization.
    train_planned = planned_pairs("train", config.train_set_path, model_path, spec, config, rows)
    eval_planned = planned_pairs("eval", config.eval_set_path, model_path, spec, config, rows) \
        if config.eval_set_path else None
    train_ds, train_ledger, eval_ds = materialized_pairs(*train_planned, config, hold_out=config.eval_split_ratio,
                                                         shuffle=True)
    ledgers = {"train": train_ledger}
    if config.use_margin:
        check_margins(train_ledger, config.train_set_path)
    if eval_ds is not None:
        # Counted in questions too: the split draws questions, and on data with few of them, or many pairs to some,
        # the share of pairs held out can be far from the ratio.
        held_out = eval_ds.count()
        held_questions = len(eval_ds.unique("question_key")) if held_out else 0
        questions = held_questions + len(train_ds.unique("question_key"))
        if held_out == 0:
            raise SystemExit(f"--eval_split_ratio {config.eval_split_ratio} held out none of the {questions} training "
                             "questions; raise it, or give --eval_set_path")
        train_ledger["held_out_for_eval"] = {"pairs": held_out, "questions": held_questions,
                                             "of_questions": questions, "eval_split_ratio": config.eval_split_ratio,
                                             "seed": config.seed}
        print(f"[btrm] {held_out} of the {train_ledger['pairs']} training pairs held out for evaluation: every pair "
              f"of {held_questions} of the {questions} questions (--eval_split_ratio {config.eval_split_ratio} draws "
              "questions by a hash of each and --seed)", flush=True)
    eval_shards = []
    if eval_planned:
        eval_ds, ledgers["eval"], _ = materialized_pairs(*eval_planned, config)
    if eval_ds is not None:
        # Row-exact, disjoint shards (Dataset.split divides by blocks, and a small eval set is one block).
        count = eval_ds.count()
        cuts = [count * k // config.num_workers for k in range(1, config.num_workers)]
        eval_shards = eval_ds.split_at_indices(cuts) if cuts else [eval_ds]
    # No progress bars for what the workers read (each dataset carries its own context): the job log keeps
    # btrm's own progress lines. For the training pairs it is also a fix: Ray Data 2.60's coordinator that
    # streams them closes its bars from the executor thread while its own thread may still update them, an
    # AttributeError that fails the run at an epoch's end.
    for dataset in (train_ds, *eval_shards):
        dataset.context.enable_progress_bars = False

    pairs = train_ds.count()
    per_worker = pairs // config.num_workers
    if per_worker < 1:
        raise SystemExit(f"{pairs} training pairs are too few for {config.num_workers} workers"
                         + (f" (after --eval_split_ratio {config.eval_split_ratio} held some out)"
                            if config.eval_split_ratio else ""))
    # An epoch's last step takes the pairs that are left, fewer than a full step: none is skipped.
    steps_per_epoch = math.ceil(per_worker / (config.per_device_train_batch_size * config.gradient_accumulation_steps))
    total_steps = config.max_steps if config.max_steps > 0 else steps_per_epoch * config.num_train_epochs
    # Every worker reads as many pairs (Ray's equal split): the rest, the same pairs each epoch, go untrained.
    train_ledger["left_out_for_equal_workers"] = pairs - per_worker * config.num_workers
    print(f"[btrm] {pairs} training pairs on {config.num_workers} worker(s) ({'GPU' if use_gpu else 'CPU'}), "
          f"{train_ledger['left_out_for_equal_workers']} left out to keep workers in step; "
          f"{total_steps} optimizer steps ({total_steps / steps_per_epoch:.3g} epoch(s) of {steps_per_epoch})", flush=True)

    plan = Plan(config=config, model_path=model_path, tokenization=spec.to_dict(), deepspeed_config=deepspeed_config,
                use_gpu=use_gpu, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                eval_shards=eval_shards, ledgers=ledgers, tracker_run_id=new_run_id())
    # And what the data gave, before any worker starts: steps already trained are skipped by count.
    check_resume_terms(recorded_terms, {"pairs": train_ledger["pairs"]})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name=config.run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=config.save_total_limit),
            failure_config=FailureConfig(max_failures=config.max_failures),
            # Ray Train's own INFO lines (each worker's every report, its whole metrics dict) stay in the
            # session's logs/train/ files; the console keeps btrm's progress lines and Ray's warnings.
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": train_ds},
        dataset_config=train_data_config(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
    )
    try:
        result = trainer.fit()
    except BaseException:  # (Ctrl-C: Ray Train aborts the run; a worker's error past --max_failures)
        try:
            print(f"[btrm] {stopped_run_note(storage_path, config.run_name)}", flush=True)
        except Exception:  # (storage out of reach, say: the error that stopped the run is the one to see)
            pass
        raise
    metrics = result.metrics or {}
    if "eval/accuracy" in metrics:
        before = metrics.get("eval/accuracy_before_training")
        print(f"[btrm] eval accuracy {metrics['eval/accuracy']:.4f} over {metrics['eval/pairs']} pairs"
              + (f" (untrained: {before:.4f})" if before is not None else ""), flush=True)
    # Where the run's last checkpoint is, as a user names it (a cloud URI with its scheme), credentials masked.
    checkpoint = result.checkpoint
    kept = in_run(without_credentials(storage_path), config.run_name, Path(checkpoint.path).name, EXPORT_DIR)
    diverged = unusable_model(metrics)
    if diverged:
        raise SystemExit(f"the run diverged: {diverged}. The model is not published at --output_path (what it holds "
                         f"stays); the model and the run's log are in its last checkpoint, {kept}. "
                         "Lower --learning_rate or --max_grad_norm, or raise --warmup_ratio")
    exported = f"{checkpoint.path}/{EXPORT_DIR}"
    try:
        destination = publish_dir(exported, config.output_path, filesystem=checkpoint.filesystem)
    except (OSError, ExportNotReplaceable) as e:  # (out of disk, say; files put there meanwhile): the model is safe
        raise SystemExit(f"--output_path {config.output_path}: the model could not be written there ({e}); it is "
                         f"whole in the run's last checkpoint: copy {kept}") from None
    print(f"[btrm] model exported to {destination}", flush=True)
    return result


def unusable_model(metrics: dict[str, Any]) -> str | None:
    """Why the trained model the final report describes scores no pair (a diverged run), or None."""
    tensors = metrics.get(NON_FINITE_TENSORS, 0)
    if tensors:
        return f"{tensors} weight tensor(s) of the trained model hold NaN or infinite values"
    probe = metrics.get(PROBE_REWARD)
    if probe is not None and not math.isfinite(probe):
        return f"the trained model scores a one-token conversation {probe} (its weights overflow every forward)"
    pairs = metrics.get("eval/pairs", 0)
    if pairs and metrics.get("eval/non_finite_pairs") == pairs:
        return f"the trained model scores none of the {pairs} eval pairs as finite numbers"
    return None
