"""The evaluation job: per-pair rewards, accuracy and diagnostics for an exported reward model.

    pairs (the training pipeline: read → process → validate → tokenize under the manifest's policy)
      → map_batches(PairScorer)   actors holding the model (one GPU each when the cluster has GPUs)
      → one row per pair on the driver, in input order
      → <output>.parquet|.jsonl  +  <output stem>.summary.json (figures, tokenization, data ledger)

Every figure of the summary is computed by :func:`summarize` from the per-pair table alone, so anyone
can recompute it from the file. A pair the model fails on (say, out of memory) is recorded with its
error and place and left out of the figures; rows the pipeline cannot turn into pairs are in the ledger.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from btrm.batching import take
from btrm.cli import summary
from btrm.config import (SCORING_DTYPES, USE_GPU_CHOICES, DataOptions, check_cpus, check_job_outputs, check_writable,
                         gpus_wanted, option, parse_config)
from btrm.data import (DataSpec, bad_data_ends_the_job, build_pair_dataset, check_drop_fraction, close_ledger,
                       new_ledger)
from btrm.export import read_manifest
from btrm.model import check_trained_weights, embedding_rows, position_limit
from btrm.scoring import actor_scorer, is_cuda_error
from btrm.sources import glob_matches, is_glob, without_credentials
from btrm.tokenize import OVERLONG_POLICIES, TokenizationSpec, load_tokenizer, prepare_tokenizer, read_chat_template

OUTPUT_SUFFIXES = (".parquet", ".jsonl")
UNSCORED_EXAMPLES = 50
ANSWER_LENGTH_UNIT = ("tokens after the prompt the pair shares: the answer (less any opening both answers share) "
                      "plus the chat template's end-of-turn tokens")

SCORED_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("file", pa.string()),
    ("row", pa.int64()),  # 0-based row of the file (JSONL: line number - 1), as in the ledger
    ("question", pa.string()),  # the last user turn, shortened for display
    ("reward_chosen", pa.float64()),  # null when the pair could not be scored (see error)
    ("reward_rejected", pa.float64()),
    ("reward_margin", pa.float64()),  # reward_chosen - reward_rejected
    ("chosen_tokens", pa.int32()),  # the whole sequence the model read (prompt + answer, after truncation)
    ("rejected_tokens", pa.int32()),
    ("chosen_answer_tokens", pa.int32()),  # see ANSWER_LENGTH_UNIT
    ("rejected_answer_tokens", pa.int32()),
    ("truncated", pa.bool_()),
    ("truncated_tokens", pa.int32()),  # prompt tokens cut from the left (the manifest's policy)
    ("error", pa.string()),
])


@dataclass
class EvalConfig(DataOptions):
    """Options of `jobs/evaluate.py` / `btrm evaluate`."""

    # Tokenization defaults to the manifest's: the model is scored as it was trained.
    max_length: int | None = option(None, "Longest sequence in tokens (prompt + answer), per side; "
                                    "unset: the one the model was trained with, from its manifest.")
    overlong: str | None = option(None, "What to do with a pair longer than --max_length: cut the shared prompt "
                                  "from the left or drop the pair; unset: the manifest's policy.",
                                  OVERLONG_POLICIES)
    chat_template: str | None = option(None, "Jinja chat template file or shipped name replacing the one the model "
                                       "was trained with (it changes the rewards); unset: the manifest's.")
    model_path: str | None = option(None, "Exported reward model: the directory the training job wrote "
                                    "(Hugging Face files plus btrm.json).")
    data_path: str | None = option(None, "Pairs to score: a parquet file, a directory of shards, a glob, a cloud URI "
                                   "or JSON/JSONL, read by --dataset_format or your own processor.")
    output: str = option("./outputs/eval/pairs.parquet", "Per-pair results, .parquet or .jsonl; the summary is "
                         "written next to it as <output stem>.summary.json.")
    batch_size: int = option(256, "Pairs handed to a scoring actor at a time. Decoders: packed into rows of at "
                             "most --max_batch_tokens tokens, each prompt computed once for both answers (as in "
                             "training); encoders: sequences sorted by length and padded.")
    max_batch_tokens: int = option(32768, "Tokens per forward pass, padding included (the memory knob; packed rows "
                                   "on CPUs stay under 1024: their attention mask is dense there).")
    num_scorers: int | None = option(None, "Scoring actors, each holding a copy of the model; "
                                     "unset: one per GPU of the cluster (scoring on GPUs), else 1.")
    use_gpu: str = option("auto", "Score on GPUs: auto (when the cluster has any now), true (an autoscaling "
                          "cluster starts GPU nodes for the job) or false.", USE_GPU_CHOICES)
    scorer_cpus: float = option(1.0, "CPUs reserved by each scoring actor when scoring on CPU.")
    dtype: str = option("auto", "Weights and activations when scoring: auto (bfloat16 on GPUs that have it, "
                        "float32 on CPUs), bfloat16 or float32.", SCORING_DTYPES)
    show: int = option(0, "Print the first N pairs with their question and rewards.")

    def validate(self) -> None:
        super().validate()
        if not self.model_path:
            raise ValueError("--model_path is required")
        if not self.data_path:
            raise ValueError("--data_path is required")
        if not self.output.endswith(OUTPUT_SUFFIXES):
            raise ValueError(f"--output {self.output}: must end in {' or '.join(OUTPUT_SUFFIXES)}")
        if "://" in self.output:
            raise ValueError(f"--output {self.output}: a local file (on the machine running the job)")
        for written in (Path(self.output), summary_path(self.output)):
            if written.is_dir():  # found only when the scores are written, after all the scoring
                raise ValueError(f"--output {self.output}: {written} is a directory; give a file's path")
        if "://" not in self.data_path:
            output, data = Path(self.output).resolve(), Path(self.data_path).resolve()
            if output == data:
                raise ValueError(f"--output {self.output} is --data_path: the scores would replace the pairs")
            if data.is_dir() and output.is_relative_to(data):
                raise ValueError(f"--output {self.output} is inside --data_path {self.data_path}: a later run "
                                 "would read the scores as pairs")
            if is_glob(self.data_path):
                for written in (self.output, str(summary_path(self.output))):
                    if glob_matches(self.data_path, written):
                        raise ValueError(f"--output {self.output}: --data_path {self.data_path} matches {written}, "
                                         "so a later run would read it as pairs; write it elsewhere")
        for name in ("batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if self.num_scorers is not None and self.num_scorers < 1:
            raise ValueError("--num_scorers must be at least 1")
        check_cpus("scorer_cpus", self.scorer_cpus)
        if self.show < 0:
            raise ValueError("--show must be 0 or more")


def summary_path(output: str | Path) -> Path:
    """``scores.parquet`` → ``scores.summary.json``."""
    return Path(output).with_suffix(".summary.json")


class PairScorer:
    """A Ray Data actor holding the model: batches of tokenized pairs in, one result row per pair out."""

    def __init__(self, model_dir: str, max_length: int, max_batch_tokens: int, dtype: str = "auto"):
        self.scorer = actor_scorer(model_dir, max_length=max_length, dtype=dtype)
        self.max_batch_tokens = max_batch_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        r_chosen, r_rejected, errors = self._score(batch)
        for i, (chosen, rejected) in enumerate(zip(r_chosen, r_rejected)):
            if errors[i] is None and not (math.isfinite(chosen) and math.isfinite(rejected)):
                # A diverged model's NaN would make every figure of the summary NaN (and is not JSON).
                errors[i] = f"the model's rewards are not finite ({chosen}, {rejected}): has its training diverged?"
                r_chosen[i] = r_rejected[i] = None
        margins = [None if c is None else c - r for c, r in zip(r_chosen, r_rejected)]
        return pa.table({
            "id": batch["id"],
            "source": batch["source"],
            "file": batch["file"],
            "row": batch["row"],
            "question": batch["question"],
            "reward_chosen": r_chosen,
            "reward_rejected": r_rejected,
            "reward_margin": margins,
            "chosen_tokens": [len(p) + len(t) for p, t in zip(batch["prompt_ids"], batch["chosen_ids"])],
            "rejected_tokens": [len(p) + len(t) for p, t in zip(batch["prompt_ids"], batch["rejected_ids"])],
            "chosen_answer_tokens": [len(t) for t in batch["chosen_ids"]],
            "rejected_answer_tokens": [len(t) for t in batch["rejected_ids"]],
            "truncated": batch["truncated"] > 0,
            "truncated_tokens": batch["truncated"],
            "error": errors,
        }, schema=SCORED_SCHEMA)

    def _score(self, batch: dict[str, np.ndarray]) -> tuple[list, list, list]:
        try:
            r_chosen, r_rejected = self.scorer.pair_rewards(batch, self.max_batch_tokens)
            return r_chosen, r_rejected, [None] * len(r_chosen)
        except Exception as e:
            _raise_if_cuda_error(e)
            # One pair the model fails on must not take its batch down: find it by scoring pair by pair.
            return self._score_one_by_one(batch)

    def _score_one_by_one(self, batch: dict[str, np.ndarray]) -> tuple[list, list, list]:
        n = len(batch["prompt_ids"])
        r_chosen, r_rejected, errors = [None] * n, [None] * n, [None] * n
        for i in range(n):
            try:
                [r_chosen[i]], [r_rejected[i]] = self.scorer.pair_rewards(take(batch, [i]), self.max_batch_tokens)
            except Exception as e:
                _raise_if_cuda_error(e)
                errors[i] = f"{type(e).__name__}: {e}"
        return r_chosen, r_rejected, errors


def _raise_if_cuda_error(error: Exception) -> None:
    """Every later forward of this actor fails too: scored pair by pair, each would be one more error."""
    if is_cuda_error(error):
        raise RuntimeError(f"the GPU of this scoring actor failed ({type(error).__name__}: {error}); its CUDA context "
                           "is unusable: run the evaluation again") from error


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None


def _correlation(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r, or None where it is undefined (fewer than two points, a constant series)."""
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarize(pairs: pa.Table) -> dict[str, Any]:
    """The evaluation's figures from the per-pair table (:data:`SCORED_SCHEMA`) alone.

    Exact over all scored pairs (not a mean of batch means). A tie (equal rewards) counts as wrong in
    ``accuracy``, as in training's eval, and is reported as ``tie_rate``. ``reward_std`` is the
    population std over both sides of every pair: with ``reward_mean``, what normalises rewards later.
    """
    unscored = pairs.filter(pc.is_valid(pairs["error"]))
    scored = pairs.filter(pc.is_null(pairs["error"]))

    def column(name: str) -> np.ndarray:
        return scored[name].to_numpy().astype(np.float64)

    r_c, r_r = column("reward_chosen"), column("reward_rejected")
    margin = r_c - r_r
    length_c, length_r = column("chosen_answer_tokens"), column("rejected_answer_tokens")
    rewards, lengths = np.concatenate([r_c, r_r]), np.concatenate([length_c, length_r])
    truncated = column("truncated_tokens")
    sources = scored["source"].to_pylist()
    by_source: dict[str, dict[str, Any]] = {}
    if any(s is not None for s in sources):
        names = np.array(["(none)" if s is None else s for s in sources], dtype=object)
        for name in sorted(set(names)):
            mask = names == name
            by_source[name] = {"pairs": int(mask.sum()), "accuracy": float(np.mean(r_c[mask] > r_r[mask]))}
    return {
        "pairs": scored.num_rows,
        "unscored": unscored.num_rows,
        "accuracy": _mean(r_c > r_r),
        "tie_rate": _mean(r_c == r_r),
        "loss": _mean(np.logaddexp(0.0, -margin)),  # Bradley-Terry: -log sigmoid(margin)
        "mean_margin": _mean(margin),
        "reward_chosen_mean": _mean(r_c),
        "reward_rejected_mean": _mean(r_r),
        "reward_mean": _mean(rewards),
        "reward_std": float(rewards.std()) if len(rewards) else None,
        "truncated_pairs": int((truncated > 0).sum()),
        "truncated_tokens": int(truncated.sum()),
        "accuracy_by_source": by_source,
        "length_bias": {
            "answer_length": ANSWER_LENGTH_UNIT,
            # The accuracy a judge that always prefers the longer answer gets on the same pairs.
            "longer_answer_accuracy": _mean(length_c > length_r),
            "equal_length_rate": _mean(length_c == length_r),
            "reward_length_correlation": _correlation(rewards, lengths),
            "margin_length_correlation": _correlation(margin, length_c - length_r),
        },
        "unscored_pairs": unscored.select(["file", "row", "id", "error"]).slice(0, UNSCORED_EXAMPLES).to_pylist(),
    }


def _figure(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def format_summary(summary: dict[str, Any]) -> str:
    bias = summary["length_bias"]
    rows = [
        ("pairs scored", f"{summary['pairs']} ({summary['unscored']} could not be scored)"),
        ("accuracy", _figure(summary["accuracy"])),
        ("tie rate", _figure(summary["tie_rate"])),
        ("loss", _figure(summary["loss"])),
        ("mean margin", _figure(summary["mean_margin"], sign=True)),
        ("reward chosen / rejected", f"{_figure(summary['reward_chosen_mean'], sign=True)} / "
                                     f"{_figure(summary['reward_rejected_mean'], sign=True)}"),
        ("reward mean / std", f"{_figure(summary['reward_mean'], sign=True)} / {_figure(summary['reward_std'])}"),
        ("prompt truncated", f"{summary['truncated_pairs']} pairs ({summary['truncated_tokens']} tokens)"),
        ("longer answer wins", f"{_figure(bias['longer_answer_accuracy'])} "
                               f"(equal lengths {_figure(bias['equal_length_rate'])})"),
        ("corr(reward, length)", _figure(bias["reward_length_correlation"], sign=True)),
        ("corr(margin, length diff)", _figure(bias["margin_length_correlation"], sign=True)),
    ]
    rows += [(f"accuracy [{name}]", f"{_figure(s['accuracy'])} ({s['pairs']} pairs)")
             for name, s in summary["accuracy_by_source"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {value}" for name, value in rows]
    lines.append(f"  (answer length: {bias['answer_length']})")
    for pair in summary["unscored_pairs"][:10]:
        lines.append(f"  - not scored: {pair['file']} row {pair['row']} (id {pair['id']}): {pair['error']}")
    return "\n".join(lines)


def format_pairs(pairs: pa.Table, count: int) -> str:
    """The first ``count`` pairs, readable: question, both rewards, lengths, the verdict."""
    lines = []
    for k, pair in enumerate(pairs.slice(0, count).to_pylist(), 1):
        place = f"{pair['file']} row {pair['row']}"
        lines.append(f"[{k}] id {pair['id']}" + (f" ({pair['source']})" if pair["source"] else "") + f", {place}")
        lines.append(f"    Q: {pair['question']}")
        if pair["error"] is not None:
            lines.append(f"    not scored: {pair['error']}")
            continue
        verdict = "right" if pair["reward_margin"] > 0 else "tie" if pair["reward_margin"] == 0 else "wrong"
        lines.append(f"    chosen   {pair['reward_chosen']:+.4f}  ({pair['chosen_tokens']} tokens, "
                     f"answer {pair['chosen_answer_tokens']})")
        lines.append(f"    rejected {pair['reward_rejected']:+.4f}  ({pair['rejected_tokens']} tokens, "
                     f"answer {pair['rejected_answer_tokens']})")
        lines.append(f"    margin {pair['reward_margin']:+.4f}: {verdict}"
                     + (f"; prompt truncated by {pair['truncated_tokens']} tokens" if pair["truncated"] else ""))
    return "\n".join(lines)


def eval_tokenization(config: EvalConfig, manifest: dict[str, Any], model_config) -> TokenizationSpec:
    """The manifest's tokenization with the options given, checked against what the model (its
    ``AutoConfig``) can read."""
    tokenization = dict(manifest["tokenization"])
    if config.max_length is not None:
        tokenization["max_length"] = config.max_length
    if config.overlong is not None:
        tokenization["overlong"] = config.overlong
    if config.chat_template is not None:
        try:
            tokenization["chat_template"] = read_chat_template(config.chat_template)
        except FileNotFoundError as e:
            raise SystemExit(str(e)) from None
    try:
        spec = TokenizationSpec(**tokenization)
    except ValueError as e:  # (--max_length 4)
        raise SystemExit(f"--max_length/--overlong: {e}") from None
    if config.chat_template is not None:  # (the manifest's rendered in training): now, not in every data task
        try:
            prepare_tokenizer(load_tokenizer(config.model_path), spec.chat_template)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    limit = position_limit(model_config)
    if limit is not None and spec.max_length > limit:
        given = "--max_length" if config.max_length is not None else "the manifest's max_length"
        raise SystemExit(f"{given} {spec.max_length} exceeds what {config.model_path} can read ({limit} positions)"
                         + ("" if config.max_length is not None else ": give a lower --max_length"))
    return spec


@contextlib.contextmanager
def replaced_whole(*paths: Path) -> Iterator[list[Path]]:
    """Temporary files beside ``paths`` to write, which replace them once all are written: a job stopped midway
    (killed, out of disk) leaves the earlier files whole, never a truncated one, and the per-pair file and its
    summary are replaced one right after the other (not the pairs, then minutes later their summary)."""
    partials = [path.with_name(f".{path.name}.partial-{os.getpid()}") for path in paths]
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        yield partials
        for partial, path in zip(partials, paths):
            os.replace(partial, path)
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)


def write_pairs(pairs: pa.Table, path: Path, parquet: bool) -> None:
    if parquet:
        pq.write_table(pairs, path)
    else:
        with open(path, "w", encoding="utf-8") as f:  # (ensure_ascii=False: whatever the locale's encoding)
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in pairs.to_pylist())


def score_pairs(config: EvalConfig, model_path: str, spec: TokenizationSpec, rows: int | None, ledger) -> pa.Table:
    """Scores every pair of --data_path on the cluster; the per-pair table, in input order. ``rows``: the
    model's embedding rows (a pair holding a token past them is invalid)."""
    data_spec = DataSpec(path=config.data_path, tokenizer_path=model_path, tokenization=spec,
                         dataset_format=config.processor_name(), custom_bt_dataset_path=config.custom_bt_dataset_path,
                         embedding_rows=rows)
    pairs = build_pair_dataset(data_spec, ledger, config.num_data_workers, config.data_worker_cpus)
    # The dataset's own context (a copy made when it was created): input order, so --show prints the
    # first pairs of the data and the output file lines up with it.
    pairs.context.execution_options.preserve_order = True
    use_gpu = gpus_wanted(config.use_gpu)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if use_gpu else 0
    num_scorers = config.num_scorers or max(gpus, 1)
    print(f"[btrm] scoring with {num_scorers} actor(s) on {'GPU' if use_gpu else 'CPU'}; max_length {spec.max_length}, "
          f"overlong pairs: {spec.overlong}"
          + (" (no GPU is up yet to count: --num_scorers N scores on N GPU nodes an autoscaler starts)"
             if use_gpu and gpus == 0 and config.num_scorers is None else ""), flush=True)
    scored = pairs.map_batches(
        PairScorer,
        fn_constructor_kwargs={"model_dir": model_path, "max_length": spec.max_length,
                               "max_batch_tokens": config.max_batch_tokens, "dtype": config.dtype},
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=num_scorers),
        **({"num_gpus": 1} if use_gpu else {"num_cpus": config.scorer_cpus}),
    )
    blocks = [block.cast(SCORED_SCHEMA) for block in scored.iter_batches(batch_size=None, batch_format="pyarrow")]
    return pa.concat_tables(blocks) if blocks else SCORED_SCHEMA.empty_table()


def processor_note(config: EvalConfig, manifest: dict[str, Any]) -> str | None:
    """What to say when the model trained on pairs another processor read than this evaluation's: the same
    layout of data, read otherwise, is every row dropped as invalid (and nothing would say why)."""
    trained = manifest.get("training", {}).get("options", {})
    name = trained.get("custom_bt_dataset_name") if trained.get("custom_bt_dataset_path") else trained.get("dataset_format")
    if not name or name == config.processor_name():
        return None
    given = ("--custom_bt_dataset_path " + trained["custom_bt_dataset_path"] + " --custom_bt_dataset_name " + name
             if trained.get("custom_bt_dataset_path") else f"--dataset_format {name}")
    return (f"the model trained on pairs read by processor {name}; this evaluation reads --data_path with "
            f"{config.processor_name()}. For data in the training's layout, pass {given}")


def run_evaluation(config: EvalConfig) -> dict[str, Any]:
    """Scores --data_path with --model_path; writes the per-pair file and the summary; returns the summary."""
    from transformers import AutoConfig

    check_job_outputs({"--output": config.output})
    check_writable("--output", config.output)  # now, not after the scoring
    model_path = str(Path(config.model_path).resolve())
    try:
        manifest = read_manifest(model_path)
        check_trained_weights(model_path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--model_path {e}") from None
    model_config = AutoConfig.from_pretrained(model_path)
    spec = eval_tokenization(config, manifest, model_config)
    note = processor_note(config, manifest)
    if note:
        print(f"[btrm] note: {note}", flush=True)
    if not ray.is_initialized():
        ray.init()
    # A ledger over its limits, reading with a built-in processor what the model trained on through another,
    # ends with the note again (a processor of the user's is a choice, not an oversight).
    with bad_data_ends_the_job(hint=None if config.custom_bt_dataset_path else note):
        ledger = new_ledger("eval", config.max_drop_fraction)
        pairs = score_pairs(config, model_path, spec, embedding_rows(model_config), ledger)
        data = close_ledger(ledger)
        summary = summarize(pairs)
        summary = {
            **summary,
            "model_path": model_path,
            "data_path": without_credentials(config.data_path),
            "processor": {"name": config.processor_name(), "path": config.custom_bt_dataset_path},
            "output": str(Path(config.output).resolve()),
            "tokenization": {**spec.to_dict(), "chat_template": config.chat_template or "the manifest's"},
            "data": data,
        }
        summary_file = summary_path(config.output)
        with replaced_whole(Path(config.output), summary_file) as (pairs_partial, summary_partial):
            write_pairs(pairs, pairs_partial, parquet=Path(config.output).suffix == ".parquet")
            summary_partial.write_text(json.dumps(summary, indent=2, allow_nan=False))
        if config.show:
            print(format_pairs(pairs, config.show), flush=True)
        print(f"[btrm] evaluation of {model_path} on {summary['data_path']}\n{format_summary(summary)}", flush=True)
        print(f"[btrm] per-pair results: {config.output}; summary: {summary_file}", flush=True)
        # Checked once the output is written: the scores of the pairs kept are the job's work, kept whatever the
        # verdict (a source whose first 2000 rows already fail it stopped then, writing nothing: btrm.data.Ledger).
        check_drop_fraction(data, config.max_drop_fraction)
        # The figures leave out the pairs the model failed on: not a few random ones (out of memory takes the
        # longest); none scored is a failure whatever the limit.
        total = summary["pairs"] + summary["unscored"]
        unscored = summary["unscored"] / total
        if summary["pairs"] == 0 or unscored > config.max_drop_fraction:
            first = summary["unscored_pairs"][0]
            verdict = (f"none of the {total} pairs could be scored (whatever --max_drop_fraction)"
                       if summary["pairs"] == 0 else
                       f"{summary['unscored']} of the {total} pairs could not be scored ({unscored:.1%} > "
                       f"--max_drop_fraction {config.max_drop_fraction:.1%}): the figures above leave them out")
            raise SystemExit(f"{verdict}. The first, {first['file']} row {first['row']}: {first['error']} (every one "
                             f"in {config.output}'s error column)")
        return summary


def main(argv: list[str] | None = None) -> None:
    config = parse_config(EvalConfig, summary("evaluate"), argv)
    with bad_data_ends_the_job():
        run_evaluation(config)
