"""The standard pair format and the base class every processor derives from.

A processor turns one row of some source (a dict of that source's columns) into one or more pairs
in the standard format::

    {"chosen": [messages], "rejected": [messages], "margin": float | None, "id": str | None,
     "source": str | None}

where ``messages`` are ``{"role": ..., "content": ...}`` dicts, both sides share every message but the
last one, and the last one is the assistant answer being judged.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Iterable

ROLES = ("system", "user", "assistant", "tool")


class RowError(ValueError):
    """A row that cannot become a pair: it is counted as `invalid` and reported with its place."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.message = message


class RowDropped(Exception):
    """A well-formed row that carries no preference (a tie, a missing label): dropped and counted."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BaseBradleyTerryTrainDataset:
    """Converts rows of one source into standard-format pairs.

    Subclass it and implement :meth:`convert`. Raise :class:`RowError` (with the offending field) for
    a malformed row and :class:`RowDropped` for a row that holds no preference; both are counted in
    the ledger and never stop the other rows. ``required_fields`` are checked against a file's schema
    before any row is read, so a file of the wrong kind fails early with one clear message.
    """

    name: ClassVar[str] = "custom"
    required_fields: ClassVar[tuple[str, ...]] = ()

    def convert(self, row: dict[str, Any]) -> dict[str, Any] | Iterable[dict[str, Any]]:
        raise NotImplementedError

    def pairs(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        """Runs :meth:`convert` and checks every pair it returns against the standard format."""
        converted = self.convert(row)
        pairs = [converted] if isinstance(converted, dict) else list(converted)
        return [validate_pair(pair) for pair in pairs]


# ----------------------------------------------------------------------------------------------
# Helpers shared by processors


def require(row: dict[str, Any], field: str) -> Any:
    """The value of ``field``, or a RowError that names it."""
    if field not in row or row[field] is None:
        raise RowError(field, f"missing (the row has {sorted(k for k, v in row.items() if v is not None)})")
    return row[field]


def first_given(row: dict[str, Any], *fields: str) -> Any:
    """The first of ``fields`` the row has a value for (a null column counts as absent), else None."""
    return next((row[f] for f in fields if row.get(f) is not None), None)


def as_messages(value: Any, field: str) -> list[dict[str, Any]]:
    """A list of messages; a JSON string of one is accepted (a common way to store them in parquet)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise RowError(field, "is a string that is not a JSON list of messages") from None
    if hasattr(value, "tolist"):  # numpy arrays from Arrow list columns
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError(field, f"must be a list of messages, got {type(value).__name__}")
    return [as_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def as_message(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RowError(field, f"must be a message {{'role', 'content'}}, got {type(value).__name__}")
    role, content = value.get("role"), value.get("content")
    if role not in ROLES:
        raise RowError(f"{field}.role", f"unknown role {role!r}; expected one of {list(ROLES)}")
    if not isinstance(content, str):
        raise RowError(f"{field}.content", f"must be a string, got {type(content).__name__}")
    if not content.strip():
        raise RowError(f"{field}.content", "is empty")
    return {"role": role, "content": content}


def as_margin(value: Any, field: str = "margin") -> float | None:
    if value is None:
        return None
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise RowError(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(margin) or margin < 0:
        raise RowError(field, f"must be a finite number >= 0 (a preference strength), got {value!r}")
    return margin


def validate_pair(pair: dict[str, Any]) -> dict[str, Any]:
    """Checks a pair against the standard format and returns it normalised.

    Raises RowError for a malformed pair and RowDropped('identical') when both answers are the same.
    """
    chosen = as_messages(require(pair, "chosen"), "chosen")
    rejected = as_messages(require(pair, "rejected"), "rejected")
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        check_conversation(messages, side)
    if chosen[:-1] != rejected[:-1]:
        first = next(
            (i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
            min(len(chosen), len(rejected)) - 1,
        )
        raise RowError(
            f"rejected[{first}]",
            "chosen and rejected must share the same prompt (every message but the final answer); "
            f"they differ at message {first}",
        )
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise RowDropped("identical", "chosen and rejected answers are the same")
    source = pair.get("source")
    pair_id = pair.get("id")
    return {
        "chosen": chosen,
        "rejected": rejected,
        "margin": as_margin(pair.get("margin")),
        "id": None if pair_id is None else str(pair_id),
        "source": None if source is None else str(source),
    }


def check_conversation(messages: list[dict[str, Any]], side: str) -> None:
    if len(messages) < 2:
        raise RowError(side, f"needs a prompt and an answer, got {len(messages)} message(s)")
    if messages[-1]["role"] != "assistant":
        raise RowError(f"{side}[{len(messages) - 1}].role", f"the conversation must end with an assistant answer, not {messages[-1]['role']!r}")
    for i, message in enumerate(messages):
        if message["role"] == "system" and i != 0:
            raise RowError(f"{side}[{i}].role", "a system message may only come first")
    if not any(m["role"] == "user" for m in messages[:-1]):
        raise RowError(side, "the prompt has no user message")
    previous = messages[-2]["role"]
    if previous not in ("user", "tool"):
        raise RowError(f"{side}[{len(messages) - 2}].role", f"the final answer must follow a user or tool turn, not {previous!r}")
