"""The standard pair format and the base class every processor derives from.

A processor turns one row of some source (a dict of that source's columns) into one or more pairs
in the standard format::

    {"chosen": [messages], "rejected": [messages], "tools": [schemas] | None, "margin": float | None,
     "id": str | None, "source": str | None}

where ``messages`` are ``{"role": ..., "content": ...}`` dicts, both sides share every message but the
last one, and the last one is the assistant answer being judged.

An assistant message may carry ``reasoning_content`` (a reasoning model's thinking) and ``tool_calls``
(OpenAI's or Hugging Face's layout; its content may then be empty), a ``tool`` message its ``tool_call_id``
and ``name``, and a pair the ``tools`` it offers (a list of JSON schemas, or a JSON string of one): the chat
template renders them as it would for generation. The keys of OpenAI's chat-completion message that templates
do not read (``refusal``, ``function_call``, ``annotations``, ``audio``) are taken in too: see :func:`as_message`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
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
    # Every field convert reads, where a processor declares them: the ledger names a source's other fields as
    # ignored, so a misspelt optional one (`margn`) shows, and a parquet file's other columns are not read at all
    # (convert never sees them). None: undeclared; every column is read and nothing is said.
    read_fields: ClassVar[tuple[str, ...] | None] = None

    @classmethod
    def declared_fields(cls) -> tuple[str, ...] | None:
        """``read_fields`` where this very class declares them. A subclass of a processor (one whose convert reads
        a column of its own, say) reads every column until it declares its own: the inherited ones would leave
        that column out of a parquet file's rows."""
        return cls.__dict__.get("read_fields")

    def convert(self, row: dict[str, Any]) -> dict[str, Any] | Iterable[dict[str, Any]]:
        raise NotImplementedError

    def pairs(self, row: dict[str, Any]) -> list[dict[str, Any] | RowDropped | RowError]:
        """Runs :meth:`convert` and checks every pair it returns against the standard format: each comes
        back normalised, or as the RowDropped of a pair whose answers are the same or (among several) the
        RowError of a malformed one, which cost that pair and not the row's others (a HelpSteer3 row with two
        rejected answers, one a copy of the chosen). A row's only pair, malformed, raises its RowError. A
        convert that returns None gives no pair; one may put a RowDropped or RowError in its list in place of a
        pair it cannot make."""
        converted = self.convert(row)
        # (a string is one wrong value, not a pair per character)
        pairs = [converted] if isinstance(converted, (Mapping, str, bytes)) else list(converted or ())
        return [_checked(pair, k, len(pairs), type(self).__name__) for k, pair in enumerate(pairs)]


# ----------------------------------------------------------------------------------------------
# Helpers shared by processors


def require(row: dict[str, Any], field: str) -> Any:
    """The value of ``field``, or a RowError that names it."""
    if field not in row or row[field] is None:
        raise RowError(field, f"missing (the row has {sorted(k for k, v in row.items() if v is not None)})")
    return row[field]


def absent(value: Any) -> bool:
    """None, or NaN: pandas' missing value (JSON written from a DataFrame of rows that lack a column holds NaN)."""
    return value is None or isinstance(value, float) and math.isnan(value)


def first_given(row: dict[str, Any], *fields: str) -> Any:
    """The first of ``fields`` the row has a value for (a null or NaN column counts as absent), else None."""
    return next((row[f] for f in fields if not absent(row.get(f))), None)


def as_messages(value: Any, field: str) -> list[dict[str, Any]]:
    """A list of messages; a JSON string of one is accepted (a common way to store them in parquet)."""
    return [as_message(m, f"{field}[{i}]") for i, m in enumerate(as_list(value, field, "messages"))]


def as_message(value: Any, field: str) -> dict[str, Any]:
    # A null key counts as absent: Arrow gives every message of a list<struct> column every key of the struct.
    if not isinstance(value, dict):
        raise RowError(field, f"must be a message {{'role', 'content'}}, got {type(value).__name__}")
    role, content = value.get("role"), value.get("content")
    if role == "function":  # OpenAI's older function result, the reply to a function_call: a tool message
        role = "tool"
    if role not in ROLES:
        raise RowError(f"{field}.role", f"unknown role {role!r}; expected one of {list(ROLES)}")
    message: dict[str, Any] = {"role": role}
    content = _with_refusal(value, content, field)
    if _given(value.get("audio")):
        raise RowError(f"{field}.audio", "an audio answer cannot be scored by a text model; give its transcript as content")
    calls, calls_field = _calls(value, field)
    if calls:
        if role != "assistant":
            raise RowError(calls_field, f"only an assistant message calls tools, not a {role!r} one")
        message["tool_calls"] = calls
        content = "" if content is None else content
    if role == "tool" and content is None:  # a tool that returned nothing
        content = ""
    content = _text_content(content, f"{field}.content")
    # A tool may return nothing, a tool call may come without words, and exports often carry an empty system
    # prompt (rendered as given); any other turn must say something.
    if not content.strip() and role not in ("tool", "system") and "tool_calls" not in message:
        raise RowError(f"{field}.content", "is empty")
    message["content"] = content
    # A reasoning model's thinking, kept apart from the answer (the Qwen3 template renders it in <think>).
    if role == "assistant" and value.get("reasoning_content") is not None:
        message["reasoning_content"] = _string(value["reasoning_content"], f"{field}.reasoning_content")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if value.get(key) is not None:
                message[key] = _string(value[key], f"{field}.{key}")
    return message


# OpenAI's chat-completion message carries keys chat templates do not render. Those that hold what the
# assistant said are moved where templates look (a refusal is its content, the older function_call a tool
# call); "annotations" (citations of the content) change nothing rendered and are ignored.
def _with_refusal(value: dict[str, Any], content: Any, field: str) -> Any:
    refusal = value.get("refusal")
    if not _given(refusal):
        return content
    if not isinstance(refusal, str):
        raise RowError(f"{field}.refusal", f"must be a string, got {type(refusal).__name__}")
    if _given(content):
        raise RowError(f"{field}.refusal", "a message has content or a refusal, not both")
    return refusal


def _calls(value: dict[str, Any], field: str) -> tuple[list[dict[str, Any]], str]:
    """The message's tool calls and the field they came from."""
    if _given(value.get("function_call")):
        if _given(value.get("tool_calls")):
            raise RowError(f"{field}.function_call", "give tool_calls or the older function_call, not both")
        return as_tool_calls([value["function_call"]], f"{field}.function_call"), f"{field}.function_call"
    if _given(value.get("tool_calls")):
        return as_tool_calls(value["tool_calls"], f"{field}.tool_calls"), f"{field}.tool_calls"
    return [], f"{field}.tool_calls"


def _given(value: Any) -> bool:
    # Exports write "no tool calls" as null, [] or "": all mean absent.
    return not absent(value) and not (hasattr(value, "__len__") and len(value) == 0)


def _parse_json(text: str, field: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # ValueError: invalid JSON, or an integer of more than 4300 digits
        raise RowError(field, f"is a string that is not {what}") from None


MAX_JSON_DEPTH = 32


def as_plain_json(value: Any, field: str) -> Any:
    """``value`` as plain JSON (objects with string keys, lists, text, numbers, booleans, null), bounded in
    depth: what a chat template's ``tojson`` renders alike in training and serving. Tool schemas and call
    arguments are free JSON from users and their parquet columns (numpy arrays among them). An object's member
    that is null counts as absent, as a message's does: a parquet struct column gives every row every key of
    any row (schemas with other rows' properties as null), and JSON lines of the same data would not."""
    return _plain_json(value, field, field, 0)


def _plain_json(value: Any, top: str, field: str, depth: int) -> Any:
    if depth > MAX_JSON_DEPTH:
        raise RowError(top, f"is nested deeper than {MAX_JSON_DEPTH} levels")
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, dict):
        bad_key = next((key for key in value if not isinstance(key, str) or not is_unicode(key)), None)
        if bad_key is not None:
            raise RowError(field, f"has a key that is not valid Unicode text: {bad_key!r}")
        return {key: item if _plain_leaf(item, depth) else _plain_json(item, top, f"{field}.{key}", depth + 1)
                for key, item in value.items() if item is not None}
    if isinstance(value, (list, tuple)):
        return [item if _plain_leaf(item, depth) else _plain_json(item, top, f"{field}[{i}]", depth + 1)
                for i, item in enumerate(value)]
    if isinstance(value, str):
        return _string(value, field)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    raise RowError(field, f"holds a {type(value).__name__}, which is not JSON")


_JSON_SCALARS = frozenset({bool, int, float, type(None)})


def _plain_leaf(item: Any, depth: int) -> bool:
    """An item of a container at ``depth`` that is plain JSON as it is: taken without a call of its own, or the
    formatting of its place (only an error names it): a list of millions of numbers, an enum sent to the service,
    is walked in a fraction of the time, not seconds of an HTTP replica's event loop."""
    kind = type(item)
    return depth < MAX_JSON_DEPTH and (kind in _JSON_SCALARS or kind is str and is_unicode(item))


def _text_content(value: Any, field: str) -> str:
    """A message's content: text, or OpenAI's list of content parts, text only, joined by newlines (as vLLM
    joins them): chat templates render content that is a string."""
    if hasattr(value, "tolist") and not isinstance(value, str):  # a numpy array (pandas rows)
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return _string(value, field)
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None:
            raise RowError(f"{field}[{i}]", "must be a text part {'type': 'text', 'text': ...} (content is a string "
                                            f"or a list of them), got {type(part).__name__}")
        if kind != "text":
            raise RowError(f"{field}[{i}]", f"a part of type {kind!r} cannot be read by a text model: give text "
                                            "parts only")
        texts.append(_string(part.get("text"), f"{field}[{i}].text"))
    return "\n".join(texts)


def _string(value: Any, field: str) -> str:
    """``value`` if it is a string of valid Unicode text, else a RowError naming ``field``."""
    if not isinstance(value, str):
        raise RowError(field, f"must be a string, got {type(value).__name__}")
    if not is_unicode(value):  # a tokenizer would fail on it, blaming the chat template, and parquet cannot hold it
        raise RowError(field, "is not valid Unicode text (a lone surrogate such as \\ud800: text cut inside an emoji?)")
    return value


def is_unicode(text: str) -> bool:
    """False for a str holding a lone surrogate (a JSON escape such as \\ud800): not text a tokenizer or a JSON
    answer can encode."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def as_list(value: Any, field: str, what: str) -> list:
    """A list (numpy arrays from Arrow list columns included); a JSON string of one is accepted."""
    if isinstance(value, str):
        value = _parse_json(value, field, f"a JSON list of {what}")
        if value is None:  # "null": how JSON-string columns store "none"
            return []
    if hasattr(value, "tolist"):  # numpy arrays from Arrow list columns
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError(field, f"must be a list of {what}, got {type(value).__name__}")
    return list(value)


def as_tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    """Tool calls in Hugging Face's layout, ``{"type": "function", "function": {"name", "arguments": {...}}}``.
    OpenAI's layout stores arguments as a JSON string: it is parsed, as chat templates expect a mapping (most
    render it with ``tojson``; a string would come out quoted)."""
    calls = as_list(value, field, "tool calls")
    normalised = []
    for i, call in enumerate(calls):
        place = f"{field}[{i}]"
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise RowError(place, "must be {'type': 'function', 'function': {'name': str, 'arguments': {...}}}")
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            arguments = _parse_json(arguments, f"{place}.function.arguments", "JSON")
        arguments = {} if arguments is None else as_plain_json(arguments, f"{place}.function.arguments")
        if not isinstance(arguments, dict):
            raise RowError(f"{place}.function.arguments", f"must be an object, got {type(arguments).__name__}")
        name = _string(function["name"], f"{place}.function.name")
        normalised.append({"type": "function", "function": {"name": name, "arguments": arguments},
                           **({"id": _string(call["id"], f"{place}.id")} if call.get("id") is not None else {})})
    return normalised


def as_tools(value: Any, field: str = "tools") -> list[dict[str, Any]] | None:
    """The tools a conversation offers (JSON schemas, passed to the chat template as ``tools``), or None."""
    if not _given(value):
        return None
    tools = as_plain_json(as_list(value, field, "tool schemas"), field)
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise RowError(f"{field}[{i}]", f"must be a JSON schema object, got {type(tool).__name__}")
        function = tool.get("function")
        named, place = (function, f"{field}[{i}].function") if isinstance(function, dict) else (tool, f"{field}[{i}]")
        if "name" in named and not (isinstance(named["name"], str) and named["name"]):
            raise RowError(f"{place}.name", f"must be a non-empty string, got {named['name']!r}")
    return tools or None


FLOAT32_MAX = 3.4028234663852886e38


def as_margin(value: Any, field: str = "margin") -> float | None:
    if value is None:
        return None
    try:
        margin = float(value)
    except (TypeError, ValueError):
        raise RowError(field, f"must be a number, got {value!r}") from None
    if not math.isfinite(margin) or margin < 0:
        raise RowError(field, f"must be a finite number >= 0 (a preference strength), got {value!r}")
    if margin > FLOAT32_MAX:  # (stored and trained in float32, where it would be infinite)
        raise RowError(field, f"must be at most float32's largest number ({FLOAT32_MAX:.4g}), got {value!r}")
    return margin


def _checked(pair: Any, index: int, count: int, processor: str) -> dict[str, Any] | RowDropped | RowError:
    if isinstance(pair, (RowDropped, RowError)):  # convert's own verdict on one of its pairs
        if count == 1:
            raise pair
        return pair
    try:
        if not isinstance(pair, Mapping):
            raise RowError("(pair)", f"{processor} gave {type(pair).__name__} where a pair belongs (a dict with chosen "
                                     "and rejected)")
        return validate_pair(pair)
    except RowDropped as e:
        return e
    except RowError as e:
        if count == 1:
            raise  # the row's only pair: the row is invalid
        return RowError(e.field, f"{e.message} (in the row's pair {index + 1} of {count})")


def validate_pair(pair: Mapping[str, Any]) -> dict[str, Any]:
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
    if _without_call_ids(chosen[-1]) == _without_call_ids(rejected[-1]):
        raise RowDropped("identical", "chosen and rejected answers are the same")
    source, pair_id, margin = (None if absent(pair.get(key)) else pair.get(key) for key in ("source", "id", "margin"))
    return {
        "chosen": chosen,
        "rejected": rejected,
        "tools": as_tools(pair.get("tools")),
        "margin": as_margin(margin),
        "id": None if pair_id is None else _string(str(pair_id), "id"),
        "source": None if source is None else _string(str(source), "source"),
    }


def _without_call_ids(message: dict[str, Any]) -> dict[str, Any]:
    # A call's id is drawn at random by the model that made it: two answers making the same call are the same.
    if "tool_calls" not in message:
        return message
    return {**message, "tool_calls": [{k: v for k, v in call.items() if k != "id"} for call in message["tool_calls"]]}


def check_prompt_end(messages: list[dict[str, Any]], field: str) -> None:
    """A prompt a row gives apart from its answers (HelpSteer3's ``context`` or ``input``) ends where an answer may
    follow: checked under the row's own field, not the pair's side (``chosen[3].role``) it becomes part of."""
    if not messages:
        raise RowError(field, "holds no message: the answers need a prompt (at least a user turn)")
    if messages[-1]["role"] not in ("user", "tool"):
        raise RowError(f"{field}[{len(messages) - 1}].role", "the answers follow it: it must end with a user or tool "
                                                             f"turn, not {messages[-1]['role']!r}")


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
