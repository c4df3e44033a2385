"""The Ray Data pipeline: source rows → processor → validation → tokenization, with a ledger.

    plan_fragments (driver: list files, check footers and schemas)
      → ray.data.from_items(fragments)
      → map_batches(preprocess_fragments)   tasks: read rows, convert, validate, tokenize (streaming)
      → rows of token ids: prompt_ids, chosen_ids, rejected_ids, margin, id, source, ...

The ledger counts every row: read, kept, dropped by reason, truncated. Each batch of rows reports to
one ``Ledger`` actor under the key (file, first row), so a retried task or a second epoch replaces its
earlier report instead of counting twice.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import os
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import ray

from btrm.config import uploaded_working_dir
from btrm.processors import ProcessorError, RowDropped, RowError, load_processor
from btrm.sources import (BadRow, Fragment, SourceError, first_few, plan_fragments, read_fragment,
                          without_credentials)
from btrm.tokenize import PairTokenizer, TokenizationSpec, load_tokenizer, tokens_past_embedding

DROP_REASONS = ("invalid", "tie", "missing_label", "identical", "overlong")
EXAMPLES_PER_REASON = 20  # places of dropped rows kept in the ledger, per drop reason
NO_ROWS = -1  # the ledger key's row of a fragment that held none (no batch's first row can be -1)
QUESTION_CHARS = 200

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source", pa.string()),
    ("file", pa.string()),
    ("row", pa.int64()),
    ("question", pa.string()),  # the last user turn, shortened for display
    ("question_key", pa.int64()),  # a digest of all of it: --eval_split_ratio holds pairs out by it
    ("prompt_ids", pa.list_(pa.int32())),
    ("chosen_ids", pa.list_(pa.int32())),
    ("rejected_ids", pa.list_(pa.int32())),
    ("margin", pa.float32()),  # 0 where the pair gives none (the ledger counts the pairs with one)
    ("truncated", pa.int32()),
])


@dataclass(frozen=True)
class DataSpec:
    """Which rows and how to read them; shared by the jobs and pickled into Ray actors."""

    path: str
    tokenizer_path: str
    tokenization: TokenizationSpec
    dataset_format: str = "standard"
    custom_bt_dataset_path: str | None = None
    batch_rows: int = 512
    embedding_rows: int | None = None  # the model's: a pair holding a token id past them is invalid

    def __post_init__(self):
        # Data tasks load the processor in other processes, on other nodes: a path relative to this process's
        # directory names nothing there, unless a Ray job uploaded it (each task runs in its node's copy).
        if self.custom_bt_dataset_path and not uploaded_working_dir():
            object.__setattr__(self, "custom_bt_dataset_path", os.path.abspath(self.custom_bt_dataset_path))


@dataclass
class LedgerReport:
    rows_read: int = 0
    pairs: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncated: int = 0
    truncated_tokens: int = 0
    with_margin: int = 0  # pairs that carry a preference strength (--use_margin trains on it)
    unread_fields: list[str] = field(default_factory=list)  # row fields the processor declares it does not read
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, other: "LedgerReport") -> None:
        self.rows_read += other.rows_read
        self.pairs += other.pairs
        self.truncated += other.truncated
        self.truncated_tokens += other.truncated_tokens
        self.with_margin += other.with_margin
        self.unread_fields = sorted({*self.unread_fields, *other.unread_fields})
        for reason, n in other.dropped.items():
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        self.examples.extend(other.examples)

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def dropped_against_limit(self) -> int:
        """The drops --max_drop_fraction bounds: all but ties, which hold no preference by design (HelpSteer3's
        "about the same", a PandaLM draw), not by a fault of the data; a tie-heavy source must not fail its run."""
        return self.dropped_total - self.dropped.get("tie", 0)

    @property
    def drop_fraction(self) -> float:
        """Of the pairs the rows gave, ties left out, the share dropped."""
        seen = self.pairs + self.dropped_against_limit
        return self.dropped_against_limit / seen if seen else 0.0


class DataError(RuntimeError):
    """The data failed a run-level check (too many drops, nothing left); carries the ledger, and says it unless
    it was ``printed`` just before."""

    def __init__(self, message: str, ledger: dict[str, Any], printed: bool = False):
        super().__init__(f"{message} (the ledger above)" if printed else f"{message}\n{format_ledger(ledger)}")
        self.ledger = ledger


@contextlib.contextmanager
def bad_data_ends_the_job(hint: str | None = None):
    """A job whose data fails (a source that cannot be read, a processor that cannot be loaded, a ledger over
    its limits) ends with the message alone: it says what and where (file, row, field; the ledger); a traceback
    through btrm adds nothing. ``hint``: said again after a ledger over its limits (a likely cause, noted when
    the job began, and since scrolled away)."""
    try:
        yield
    except (SourceError, ProcessorError, DataError) as e:
        # Raised in a data task, it reaches the driver as a RayTaskError that is also one of these, whose
        # str is the whole remote traceback (Ray Data has logged it already): the message is its cause's.
        message = str(e.cause if isinstance(e, ray.exceptions.RayTaskError) else e)
        raise SystemExit(f"{message}\nnote: {hint}" if hint and isinstance(e, DataError) else message) from None


@ray.remote(num_cpus=0)
class Ledger:
    """Collects the per-batch reports of one dataset. Reports are keyed, so re-runs replace, not add."""

    def __init__(self, name: str, max_drop_fraction: float, early_check_rows: int = 2000):
        self.name = name
        self.max_drop_fraction = max_drop_fraction
        self.early_check_rows = early_check_rows
        self.reports: dict[tuple[str, int], LedgerReport] = {}
        # Running counts for the early check: every batch waits for its record, and summing all reports
        # at each one would grow with the data (a million rows: minutes of the pipeline waiting on this actor).
        self.rows_read = self.pairs = self.dropped = 0
        self.judged, self.verdict = False, None  # (a failed verdict stays: a retried task is told it again)

    def record(self, key: tuple[str, int], report: LedgerReport) -> str | None:
        """Stores a batch's report; returns an error message if the first early_check_rows rows show too many
        drops. Judged once: a bad stretch further on is judged with all the data (by check_drop_fraction), not
        on running counts that the rest of the data may bring back under the limit."""
        replaced = self.reports.get(key, LedgerReport())
        self.reports[key] = report
        self.rows_read += report.rows_read - replaced.rows_read
        self.pairs += report.pairs - replaced.pairs
        self.dropped += report.dropped_against_limit - replaced.dropped_against_limit
        if not self.judged and self.rows_read >= self.early_check_rows:
            self.judged = True
            seen = self.pairs + self.dropped
            if seen and self.dropped / seen > self.max_drop_fraction:
                self.verdict = (f"{self.name}: {self.dropped} of {seen} pairs dropped in the first {self.rows_read} "
                                f"rows read ({self.dropped / seen:.1%}, ties aside) > --max_drop_fraction "
                                f"{self.max_drop_fraction:.1%}")
        return self.verdict

    def summary(self) -> dict[str, Any]:
        total, rows_per_file = LedgerReport(), {}
        for key in sorted(self.reports):
            total.add(self.reports[key])
            rows_per_file[key[0]] = rows_per_file.get(key[0], 0) + self.reports[key].rows_read
        result = asdict(total)
        result.update(
            dataset=self.name,
            files=len(rows_per_file),
            files_without_rows=[path for path, rows in rows_per_file.items() if not rows],
            dropped_total=total.dropped_total,
            drop_fraction=round(total.drop_fraction, 6),
            examples=_first_per_reason(total.examples),
        )
        return result


def _first_per_reason(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kept: list[dict[str, Any]] = []
    per_reason: dict[str, int] = {}
    for example in examples:
        per_reason[example["reason"]] = per_reason.get(example["reason"], 0) + 1
        if per_reason[example["reason"]] <= EXAMPLES_PER_REASON:
            kept.append(example)
    return kept


def format_ledger(ledger: dict[str, Any]) -> str:
    drops = ", ".join(f"{k} {v}" for k, v in ledger["dropped"].items() if v) or "none"
    lines = [
        f"[{ledger['dataset']}] {ledger['rows_read']} rows read from {ledger['files']} file(s) → "
        f"{ledger['pairs']} pairs; dropped {ledger['dropped_total']} ({ledger['drop_fraction']:.1%}"
        f"{', ties aside' if ledger['dropped'].get('tie') else ''}): {drops}; "
        f"prompt truncated in {ledger['truncated']} pairs ({ledger['truncated_tokens']} tokens)"
        + (f"; {ledger['with_margin']} with a margin" if ledger["with_margin"] else ""),
    ]
    if ledger["files_without_rows"]:
        empty = ledger["files_without_rows"]
        lines.append(f"  {len(empty)} file(s) hold no rows: {first_few(empty, 3)}")
    if ledger["unread_fields"]:  # a misspelt optional field (`margn`) shows here
        lines.append(f"  ignored fields (the processor does not read them): {', '.join(ledger['unread_fields'])}")
    for example in ledger["examples"][:10]:
        lines.append(f"  - {example['reason']}: {example['file']} row {example['row']}: {example['message']}")
    if len(ledger["examples"]) > 10:
        lines.append(f"  ... and {len(ledger['examples']) - 10} more (a job that finishes keeps them all: the export's "
                     "btrm.json, the evaluation's summary)")
    return "\n".join(lines)


def _raised_at(error: Exception, processor: type) -> str:
    """Where in the processor's own file ``error`` was raised (its deepest line there), to say with it."""
    source = inspect.getsourcefile(processor)
    lines = [frame for frame in traceback.extract_tb(error.__traceback__) if frame.filename == source]
    return f" (at {source}:{lines[-1].lineno}: {lines[-1].line})" if lines else ""


class PairPreprocessor:
    """Turns fragments into batches of tokenized pairs and reports them to the ledger: the processor and the
    tokenizer of one data spec, loaded once in each process that runs the pipeline's tasks."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        self.processor = load_processor(spec.dataset_format, spec.custom_bt_dataset_path)
        self.tokenizer = PairTokenizer(load_tokenizer(spec.tokenizer_path), spec.tokenization)

    def __call__(self, batch: dict[str, Any], ledger) -> Iterator[pa.Table]:
        pending = None  # the previous batch's report: checked while this one is processed, not waited for
        for fragment in batch["fragment"]:
            rows_read = 0
            fragment = Fragment(**fragment)
            for row_numbers, rows in read_fragment(fragment, self.spec.batch_rows):
                table, report = self.process_rows(fragment.path, row_numbers, rows, fragment.unread_columns)
                rows_read += len(rows)
                _check(pending, ledger)
                pending = ledger.record.remote((fragment.path, row_numbers[0]), report)
                yield table
            if not rows_read:  # an empty file (a failed upload, say) is reported, not passed over
                _check(pending, ledger)
                pending = ledger.record.remote((fragment.path, NO_ROWS), LedgerReport())
        _check(pending, ledger)

    def process_rows(self, path: str, row_numbers, rows: list[Any],
                     unread_columns: tuple[str, ...] = ()) -> tuple[pa.Table, LedgerReport]:
        """``unread_columns``: the file's columns left unread (the rows do not hold them), for the ledger."""
        report = LedgerReport(rows_read=len(rows))

        def drop(reason: str, row: int, message: str, field: str | None = None) -> None:
            report.dropped[reason] = report.dropped.get(reason, 0) + 1
            if report.dropped[reason] <= EXAMPLES_PER_REASON:
                report.examples.append({"reason": reason, "file": path, "row": row, "field": field, "message": message})

        read_fields = self.processor.declared_fields()
        if read_fields is not None:
            fields = {name for row in rows if isinstance(row, dict) for name in row}
            report.unread_fields = sorted((fields - set(read_fields)) | set(unread_columns))
        pairs, places = [], []
        for row_number, row in zip(row_numbers, rows):
            if isinstance(row, BadRow):
                drop("invalid", row_number, f"the row {row.message}", row.field)
                continue
            if not isinstance(row, dict):
                drop("invalid", row_number, f"the row must be an object of fields, got {type(row).__name__}")
                continue
            try:
                converted = self.processor.pairs(row)
            except RowError as e:
                drop("invalid", row_number, str(e), e.field)
                continue
            except RowDropped as e:
                drop(e.reason, row_number, str(e))
                continue
            except Exception as e:  # a user's processor failing on one row must not take the rest down
                drop("invalid", row_number, f"processor {type(self.processor).__name__} raised {type(e).__name__}: "
                     f"{e}{_raised_at(e, type(self.processor))}")
                continue
            if not converted:  # the ledger must add up: a row gives pairs or a drop reason
                drop("invalid", row_number, f"processor {type(self.processor).__name__} gave no pair for this row "
                     "(a processor drops a row by raising RowDropped(reason) or RowError(field, message))")
                continue
            several = len(converted) > 1
            for k, pair in enumerate(converted):
                which = f" (in the row's pair {k + 1} of {len(converted)})" if several else ""
                if isinstance(pair, RowDropped):
                    drop(pair.reason, row_number, f"{pair}{which}")
                    continue
                if isinstance(pair, RowError):  # (named by its field: validate_pair's say which pair already)
                    drop("invalid", row_number, str(pair), pair.field)
                    continue
                pairs.append(pair)
                # A pair without an id is named by its place: unique across files, and across the pairs of
                # one row (a HelpSteer3 row with two rejected answers gives two), as a drop of it says too.
                places.append((row_number, f"{path}:{row_number}" + (f"/{k}" if several else ""), which))

        encoded = self.tokenizer.encode_groups([(pair["chosen"], pair["rejected"]) for pair in pairs],
                                               [pair["tools"] for pair in pairs]) if pairs else []
        out = []
        for pair, (row_number, place, which), shared in zip(pairs, places, encoded):
            if isinstance(shared, RowDropped):
                drop(shared.reason, row_number, f"{shared}{which}")
                continue
            if isinstance(shared, Exception):
                drop("invalid", row_number, f"the chat template refuses the conversation: {shared}{which}")
                continue
            unknown = tokens_past_embedding(self.tokenizer.tokenizer, shared, self.spec.embedding_rows)
            if unknown:
                drop("invalid", row_number, f"{unknown}{which}")
                continue
            if shared.tails[0] == shared.tails[1]:  # a pair the model cannot tell apart teaches nothing
                drop("identical", row_number, "the answers template to the same tokens: they differ only in what "
                     f"the chat template does not render (the Qwen3 template strips leading newlines, say){which}")
                continue
            report.pairs += 1
            report.with_margin += pair["margin"] is not None
            question = _last_user_turn(pair["chosen"])
            if shared.truncated:
                report.truncated += 1
                report.truncated_tokens += shared.truncated
            out.append({
                "id": pair["id"] if pair["id"] is not None else place,
                "source": pair["source"],
                "file": path,
                "row": row_number,
                "question": _shortened(question),
                "question_key": question_key(question),
                "prompt_ids": shared.prompt_ids,
                "chosen_ids": shared.tails[0],
                "rejected_ids": shared.tails[1],
                "margin": pair["margin"] or 0.0,
                "truncated": shared.truncated,
            })
        return pa.Table.from_pylist(out, schema=PAIR_SCHEMA), report


def _check(pending, ledger) -> None:
    failure = ray.get(pending) if pending is not None else None
    if failure:
        raise DataError(failure, ray.get(ledger.summary.remote()))


def preprocess_fragments(batch: dict[str, Any], spec: DataSpec, ledger) -> Iterator[pa.Table]:
    """The pipeline's Ray Data task. Tasks run in Ray's pooled worker processes, which outlive a dataset, so
    each process keeps the preprocessor of the last specs it served: the next dataset of the same job
    (evaluation after training, a resumed run's rebuild) starts warm, where an actor pool spent seconds a
    dataset starting processes and importing transformers before its first row."""
    yield from _preprocessor(spec, _files_stamp(spec.custom_bt_dataset_path, spec.tokenizer_path))(batch, ledger)


@functools.lru_cache(maxsize=2)
def _preprocessor(spec: DataSpec, stamp: tuple) -> PairPreprocessor:
    return PairPreprocessor(spec)


def _files_stamp(*paths: str | None) -> tuple:
    """When the processor's file and the tokenizer's files were written: a cached preprocessor serves only
    while they are unchanged (a long-lived driver may edit its processor, or retrain into the same folder)."""
    stamp = []
    for path in filter(None, paths):
        if os.path.isdir(path):
            stamp.extend((entry.path, entry.stat().st_mtime_ns) for entry in os.scandir(path) if entry.is_file())
        elif os.path.isfile(path):
            stamp.append((path, os.stat(path).st_mtime_ns))
    return tuple(sorted(stamp))


def _last_user_turn(messages: list[dict[str, str]]) -> str:
    text = next(m["content"] for m in reversed(messages[:-1]) if m["role"] == "user")
    return " ".join(text.split())


def _shortened(question: str) -> str:
    return question if len(question) <= QUESTION_CHARS else question[: QUESTION_CHARS - 1] + "…"


def question_key(question: str) -> int:
    """A 64-bit digest of a whole question (whitespace runs as one space). The held-out split goes by it, not
    by the shortened question: templated prompts share long openings, and cut to their first 200 characters
    all of a set's questions can be one."""
    return int.from_bytes(hashlib.blake2b(question.encode(), digest_size=8).digest(), "big", signed=True)


def build_pair_dataset(spec: DataSpec, ledger, num_tasks: int = 2, task_cpus: float = 1.0) -> "ray.data.Dataset":
    """A lazy Ray Dataset of tokenized pairs. Planning (listing files, checking parquet footers and
    schemas) happens now, on the caller, so a wrong path or a corrupt file fails before any work."""
    processor = load_processor(spec.dataset_format, spec.custom_bt_dataset_path)
    fragments = plan_fragments(spec.path, processor.required_fields, processor.declared_fields())
    if all(f.num_rows == 0 for f in fragments):  # parquet files without rows (writers closed before any: Spark's empty parts)
        raise SourceError(f"{without_credentials(spec.path)}: holds no rows (its parquet files are empty)")
    items = [{"fragment": asdict(f)} for f in fragments]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        preprocess_fragments,
        fn_kwargs={"spec": spec, "ledger": ledger},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=max(1, min(num_tasks, len(items)))),
        num_cpus=task_cpus,
    )
    # Pairs come out in file and row order, not in the order the actors finish: the same data gives the
    # same dataset, so a resumed run's shuffle (seeded) is the one it trained on, and it skips exactly the
    # steps it had trained.
    dataset.context.execution_options.preserve_order = True
    return dataset


def _held_out(key: int, ratio: float, seed: int) -> bool:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < ratio * 2**64


def _one_side(batch: pa.Table, ratio: float, seed: int, held_out: bool) -> pa.Table:
    mask = [_held_out(key, ratio, seed) == held_out for key in batch["question_key"].to_pylist()]
    return batch.filter(pa.array(mask, type=pa.bool_()))


def split_by_question(dataset: "ray.data.Dataset", ratio: float, seed: int) -> tuple["ray.data.Dataset", "ray.data.Dataset"]:
    """(the rest, the held-out pairs): about ``ratio`` of the questions, chosen by a hash of the question and
    ``seed``, go to the held-out side with every pair they have, so no prompt sits on both sides (HelpSteer3
    and hh-rlhf hold many pairs per question). Order is kept; the same seed gives the same split."""
    def side(held_out: bool) -> "ray.data.Dataset":
        return dataset.map_batches(_one_side, fn_kwargs={"ratio": ratio, "seed": seed, "held_out": held_out},
                                   batch_format="pyarrow", batch_size=None)
    return side(False), side(True)


def new_ledger(name: str, max_drop_fraction: float):
    return Ledger.remote(name, max_drop_fraction)


def close_ledger(ledger) -> dict[str, Any]:
    """The final ledger, printed (callers write it next to their outputs); a dataset that left no pair fails."""
    summary = ray.get(ledger.summary.remote())
    print(format_ledger(summary), flush=True)
    if summary["pairs"] == 0:
        raise DataError(f"{summary['dataset']}: no usable pairs", summary, printed=True)
    return summary


def check_drop_fraction(summary: dict[str, Any], max_drop_fraction: float) -> None:
    """Fails a run whose data dropped more than ``max_drop_fraction`` of its pairs (its ledger printed by
    :func:`close_ledger`)."""
    if summary["drop_fraction"] > max_drop_fraction:
        raise DataError(f"{summary['dataset']}: {summary['drop_fraction']:.1%} of pairs dropped (ties aside) > "
                        f"--max_drop_fraction {max_drop_fraction:.1%}; fix the data or raise the limit", summary,
                        printed=True)
