"""The scoring service: an exported reward model on Ray Serve, over HTTP.

    POST /compare   a prompt with a chosen and a rejected answer (or {"pairs": [...]}) → both rewards,
                    the margin and P(chosen better) = sigmoid(r_chosen - r_rejected)
    POST /score     a prompt with N candidate answers → their rewards and ranking
    GET  /health    ready: a model replica answers (never guarded by the token; HEAD too)
    GET  /info      model, manifest, tokenization, limits, version

Two deployments. ``RewardAPI`` replicas (the FastAPI ingress, CPU only) validate requests and tokenize
them exactly as training tokenized its pairs (:class:`btrm.scoring.ConversationEncoder` reads the chat
template, max length, truncation policy and reward token from the model's manifest), so a score here
equals the score training and evaluation computed for the same pair. They send token ids to
``RewardModel`` replicas (the model, on a GPU where there is one), which score the groups of concurrent
requests together (:class:`ForwardQueue`), packed or in length buckets so that a short request is not
padded to a long one.

Run it with ``btrm serve --model_path DIR`` (a private local Ray), or from a Serve config
(``serve run serve/config.yaml``) whose ``import_path`` points at :func:`app_builder`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import re
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Awaitable, Callable, Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PrivateAttr, Tag,
                      model_validator)
from pydantic_core import PydanticCustomError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

import btrm
from btrm.cli import summary
from btrm.config import SCORING_DTYPES, option, parse_config, typed_values
from btrm.export import read_manifest
from btrm.processors.base import ROLES, RowError, as_message, as_tools, check_conversation, is_unicode
from btrm.tokenize import (TEMPLATE_ERRORS, AnswersTooLong, SharedPromptIds, TokensPastEmbedding, UnrenderedToolUse,
                            tool_names)

logger = logging.getLogger("ray.serve")  # Serve's logger: lines reach the replica's log, as Ray's docs say

APP_NAME = "btrm"
DEFAULT_TOKEN_ENV = "BTRM_API_TOKEN"
UNGUARDED_PATHS = ("/health",)

# ----------------------------------------------------------------------------------------------
# Options


# The most pairs, candidates, messages or tools a request may list at all (max_pairs and max_candidates are at
# most this): past it, validation stops at the list's length instead of checking each of ~200k tiny pairs (or
# messages) an 8 MiB body can hold (seconds of the HTTP replica's event loop), and the request gets a 413, the
# same as one past max_pairs. Not in the schema (as maxItems): the schema's bounds are 422s.
MAX_LISTED = 4096
LISTED_LIMITS = {"pairs": "max_pairs", "candidates": "max_candidates"}  # each list's option
# Lists nest (pairs of messages of tool calls), so a cap per list does not bound the whole: a request may hold this
# many JSON values per pair or candidate its limit allows (a long conversation with tools holds a few hundred), and
# more get a 413 before any is validated (~10 us each on the event loop: 8 MiB of tiny tool calls held it 8 s).
JSON_VALUES_PER_ITEM = 1024


@dataclass
class ServiceOptions:
    """What a replica needs: the model, the request limits, its resources and where the token comes from.
    These are the ``args`` of :func:`app_builder` in a Serve config and flags of ``btrm serve``."""

    model_path: str | None = option(None, "Exported model directory (training's --output_path): Hugging Face "
                                    "files plus the btrm.json manifest.")
    token_env: str = option(DEFAULT_TOKEN_ENV, "Environment variable holding the bearer token that guards every "
                            "route but /health (unset or empty: no token).")
    token_file: str | None = option(None, "File holding the bearer token (overrides --token_env).")
    require_token: bool = option(False, "Refuse to start without a bearer token (where a Serve config's application "
                                 "is built, on whichever node, its variable or file may be missing: fail, not open).")
    max_candidates: int = option(64, "Most candidate answers one /score request may carry (more: 413; "
                                 f"at most {MAX_LISTED}).")
    max_pairs: int = option(64, "Most pairs one batch /compare request may carry (more: 413; at "
                            f"most {MAX_LISTED}).")
    max_body_bytes: int = option(8 * 1024 * 1024, "Largest request body in bytes (larger: 413).")
    max_request_chars: int = option(4 * 1024 * 1024, "Most characters one request has templated, its prompt counted "
                                    "once per answer (more: 413): a replica tokenizes one request at a time.")
    max_tools: int = option(128, "Most tool names (offered or called) in one conversation (more: 413), as in "
                            "OpenAI's API: checking that the template renders them all grows with their square.")
    max_batch_sequences: int = option(128, "Most answers scored in one batch across concurrent requests; "
                                      "at least max_candidates and 2 x max_pairs.")
    batch_wait_timeout_s: float = option(0.005, "How long a request reaching an idle model replica waits for others "
                                         "to join its batch (those arriving during a forward join the next at once).")
    max_batch_tokens: int = option(16384, "Most tokens in one forward pass, padding included (decoders: packed "
                                   "rows, each prompt computed once; on CPUs btrm caps rows at 1024 tokens itself).")
    forward_timeout_s: float = option(300.0, "A forward pass (one of a batch's, at most max_batch_tokens) still "
                                      "running after this long fails the model replica's health check and Serve "
                                      "replaces the replica (a hung GPU would hold every request sent to it); 0: no "
                                      "limit.")
    replica_cpus: float = option(1.0, "CPUs reserved by each model replica (its torch threads).")
    replica_gpus: str = option("auto", "GPUs per model replica: auto (1 when the cluster has a GPU, else 0) or a "
                              "number; a fraction lets replicas share a GPU (0.25: four), each launching on its own core.")
    dtype: str = option("auto", "Weights and activations: auto (bfloat16 on GPUs that have it, float32 on CPUs), "
                        "bfloat16 or float32.", SCORING_DTYPES)

    def validate(self) -> None:
        if not self.model_path:
            raise ValueError("--model_path is required (a model directory exported by `btrm train`)")
        for name in ("max_candidates", "max_pairs", "max_body_bytes", "max_request_chars", "max_tools",
                     "max_batch_sequences", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        for name in ("max_candidates", "max_pairs"):
            if getattr(self, name) > MAX_LISTED:
                raise ValueError(f"--{name} must be at most {MAX_LISTED}")
        # Serve refuses a request larger than a whole batch: the biggest request must fit in one.
        largest_request = max(self.max_candidates, 2 * self.max_pairs)
        if self.max_batch_sequences < largest_request:
            raise ValueError(f"--max_batch_sequences ({self.max_batch_sequences}) must be at least max_candidates "
                             f"and 2 x max_pairs ({largest_request}): the largest request is scored in one batch")
        for name in ("batch_wait_timeout_s", "forward_timeout_s"):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(f"--{name} must be >= 0, and finite")
        if self.dtype not in SCORING_DTYPES:  # flags check choices; a Serve config's args reach only this
            raise ValueError(f"--dtype {self.dtype!r}: expected one of {list(SCORING_DTYPES)}")
        if self.replica_gpus != "auto":
            try:
                gpus = float(self.replica_gpus)
            except ValueError:
                raise ValueError(f"--replica_gpus must be auto or a number, got {self.replica_gpus!r}") from None
            if gpus < 0:
                raise ValueError("--replica_gpus must be >= 0")

    def limits(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in
                ("max_candidates", "max_pairs", "max_body_bytes", "max_request_chars", "max_tools",
                 "max_batch_sequences", "max_batch_tokens")}


@dataclass
class ServeCommand(ServiceOptions):
    """Options of ``btrm serve``: the service plus where it listens and the Ray it runs on."""

    host: str = option("127.0.0.1", "Address to listen on (0.0.0.0 exposes the service beyond this machine).")
    port: int = option(8000, "HTTP port.")
    num_replicas: int = option(1, "Model replicas (a Serve config can autoscale instead).")
    api_replicas: int = option(1, "HTTP replicas, one CPU each: they validate and tokenize requests for the model "
                               "replicas (add some when /compare's CPU work, not the model, limits throughput).")
    request_timeout_s: float = option(60.0, "A request still unanswered after this long gets a 408.")
    ray_address: str = option("local", "Ray to run on: local (a private Ray for this command), auto (the cluster "
                              "`ray start` began on this machine) or an address.")

    def validate(self) -> None:
        super().validate()
        for name in ("num_replicas", "api_replicas"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be at least 1")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"--port must be in [1, 65535], got {self.port}")
        if not 0 < self.request_timeout_s < math.inf:
            raise ValueError(f"--request_timeout_s must be above 0, and finite, got {self.request_timeout_s}")


def read_token(options: ServiceOptions) -> str | None:
    """The bearer token: the contents of --token_file, else the --token_env variable, else None (no guard;
    refused under --require_token)."""
    if options.token_file:
        path = Path(options.token_file)
        if not path.is_file():
            raise FileNotFoundError(f"--token_file {path}: no such file")
        token, source = path.read_text().strip(), f"--token_file {path}"
        if not token:
            raise ValueError(f"{source} is empty")
    else:
        token, source = os.environ.get(options.token_env, "").strip(), f"${options.token_env}"
    # An HTTP header carries bytes a server reads as Latin-1: a token of other characters would never match.
    if not (token.isascii() and token.isprintable()):
        raise ValueError(f"{source}: the bearer token must be printable ASCII characters")
    if not token and options.require_token:
        raise ValueError(f"--require_token: {source} is not set where the application is built "
                         f"({os.uname().nodename}); set it there, or give a --token_file every node reads")
    return token or None


# ----------------------------------------------------------------------------------------------
# Requests and responses (the OpenAPI schema at /openapi.json documents them)


def _unicode(text: str) -> str:
    if not is_unicode(text):
        raise ValueError("must be valid Unicode text (a lone surrogate escape such as \\ud800 is not)")
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or only whitespace")
    return _unicode(text)


# minLength: the schema tells schema-driven clients and tests that "" is refused (a pattern for "not only
# whitespace" would not match str.strip() exactly in every regex dialect: left out).
Text = Annotated[str, AfterValidator(_not_blank), Field(json_schema_extra={"minLength": 1})]


class _Strict(BaseModel):
    # A misspelt field is an error that names it, not a silently ignored key.
    model_config = ConfigDict(extra="forbid")


class FunctionCall(_Strict):
    name: Text
    arguments: dict[str, Any] | str = Field(default_factory=dict,
                                            description="An object, or a JSON string of one (OpenAI's layout).")


class ToolCall(_Strict):
    id: Annotated[str, AfterValidator(_unicode)] | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class FlatToolCall(FunctionCall):
    """A call without the ``function`` wrapper, as some exports (and training data) write it."""

    id: Annotated[str, AfterValidator(_unicode)] | None = None
    type: Literal["function"] = "function"


def _at_most_listed(value: Any) -> Any:
    if isinstance(value, list) and len(value) > MAX_LISTED:
        raise PydanticCustomError("too_many", "{count} items, more than any limit allows ({limit})",
                                  {"count": len(value), "limit": MAX_LISTED})
    return value


JSON_STRING_FIELDS = ("tools", "arguments")  # strings that validation parses as JSON and walks


def json_values_past(value: Any, limit: int) -> int:
    """How many JSON values ``value`` holds, itself included; counted no further than one past ``limit``. The JSON
    a tools or arguments string holds counts as what it holds (an answer's text is text, however it looks)."""
    count, pending = 0, [value]
    while pending and count <= limit:
        item = pending.pop()
        count += 1
        if isinstance(item, dict):
            pending.extend(_parsed_or_none(v) if k in JSON_STRING_FIELDS and isinstance(v, str) else v
                           for k, v in item.items())
        elif isinstance(item, list):
            pending.extend(item)
    return count


def _parsed_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # (not JSON, or nested past Python's stack: validation says what is wrong)
        return None


def _tools_at_most_listed(value: Any) -> Any:
    if isinstance(value, str) and value.lstrip().startswith("["):  # tools as a JSON string: its list counts
        _at_most_listed(_parsed_or_none(value))  # (not JSON: as_tools says what is wrong with it)
        return value
    return _at_most_listed(value)


class TextPart(_Strict):
    """OpenAI's text content part: a message's content may be a list of them (joined by newlines, as in training)."""

    type: Literal["text"]
    text: Annotated[str, AfterValidator(_unicode)]


def _call_layout(value: Any) -> str:
    # (a validated call too: pydantic asks again when it dumps one, and warned about each flat call it was told
    # was wrapped, the call's id in the text: Python kept every such warning)
    flat = isinstance(value, FlatToolCall) or isinstance(value, dict) and "function" not in value and "name" in value
    return "<flat>" if flat else "<wrapped>"


# The tags pydantic puts in an error's loc for the request's unions: those told apart by a Discriminator (in <>,
# so that none is also the name of a field a client sends: a misspelt "text" key must stay in the loc), and the
# members' types in the others (tools, arguments: an object or a JSON string). invalid_request drops them, so
# that a loc is the path into the JSON sent.
UNION_TAGS = frozenset({"<wrapped>", "<flat>", "<text>", "<message>", "<pair>", "<batch>", "str", "dict[str,any]",
                        "list[dict[str,any]]", "list[TextPart]"})


def _union_tag(part: str | int) -> bool:
    # (and pydantic's own for a validated member: content's text is "function-after[_unicode(), str]")
    return part in UNION_TAGS or isinstance(part, str) and part.startswith("function-after[")


# Told apart by the "function" key, so that a bad call's errors name the fields of the layout it meant.
AnyToolCall = Annotated[Annotated[ToolCall, Tag("<wrapped>")] | Annotated[FlatToolCall, Tag("<flat>")],
                        Discriminator(_call_layout)]


class Message(_Strict):
    """A chat message. ``content`` may be empty in a tool's reply and empty or left out in an assistant
    message that calls tools; ``tool_call_id`` and ``name`` belong to tool replies."""

    # "function": OpenAI's older function result, read as a tool message (as_message), as training reads it.
    role: Literal[(*ROLES, "function")]  # type: ignore[valid-type]
    content: Annotated[Annotated[str, AfterValidator(_unicode)] | list[TextPart] | None,
                       BeforeValidator(_at_most_listed)] = None
    tool_calls: Annotated[list[AnyToolCall] | None, BeforeValidator(_at_most_listed)] = None
    reasoning_content: Annotated[str, AfterValidator(_unicode)] | None = Field(
        None, description="An assistant's thinking, apart from its answer (rendered as the chat template does).")
    tool_call_id: Annotated[str, AfterValidator(_unicode)] | None = None
    name: Annotated[str, AfterValidator(_unicode)] | None = None
    # The rest of OpenAI's chat-completion message, so that one can be sent as it came; scored as training
    # reads them (as_message).
    refusal: Annotated[str, AfterValidator(_unicode)] | None = Field(
        None, description="OpenAI's place for a refusal: scored as the message's content.")
    function_call: FunctionCall | None = Field(None, description="OpenAI's older single tool call: a tool call.")
    annotations: list[dict[str, Any]] | None = Field(None, description="Citations of the content: ignored.")
    audio: dict[str, Any] | None = Field(None, description="Refused unless null: a text model cannot score audio.")

    _normalised: dict[str, Any] = PrivateAttr()

    @model_validator(mode="after")
    def _well_formed(self):
        try:
            self._normalised = as_message(self.model_dump(exclude_none=True), "message")
        except RowError as e:
            raise ValueError(str(e)) from None
        return self

    def as_dict(self) -> dict[str, Any]:
        """The message as training saw it (the same validation and normalisation: arguments as an object)."""
        return self._normalised


def _an_answer(message: Message) -> Message:
    if message.role != "assistant":
        raise ValueError(f"an answer is an assistant message, not a {message.role!r} one")
    return message


def _answer_kind(value: Any) -> str:
    return "<message>" if isinstance(value, (dict, Message)) else "<text>"


# Told apart by their JSON type, so that a bad answer's errors are those of the form it meant.
Answer = Annotated[
    Annotated[Text, Tag("<text>")] | Annotated[Message, AfterValidator(_an_answer), Tag("<message>")],
    Discriminator(_answer_kind),
    Field(description="The answer's text, or the assistant's message (one that calls tools, say)."),
]


class Conversation(_Strict):
    """The prompt every answer is judged against: a plain ``prompt`` (one user turn) or ``messages``, and
    the ``tools`` it offers."""

    prompt: Text | None = Field(None, description="A single user turn; the same as messages=[{role: user, ...}].")
    messages: Annotated[list[Message] | None, BeforeValidator(_at_most_listed)] = Field(
        None, min_length=1, description="The conversation before the answer; its last turn is a user (or tool) message.")
    tools: Annotated[list[dict[str, Any]] | str | None, BeforeValidator(_tools_at_most_listed)] = Field(
        None, description="Tool schemas the conversation offers (as apply_chat_template's tools), or a JSON string "
                          "of that list, as in the training data.")

    _prompt: list[dict[str, Any]] = PrivateAttr()
    _tools: list[dict[str, Any]] | None = PrivateAttr()

    @model_validator(mode="after")
    def _one_well_formed_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' (a string) or 'messages' (a list of messages)")
        # Normalised once here, as training normalises them: every answer of the request shares them.
        self._prompt = [{"role": "user", "content": self.prompt}] if self.prompt is not None else \
            [m.as_dict() for m in self.messages]
        try:
            check_conversation(self.conversation("an answer"), "messages")
            self._tools = as_tools(self.tools)
        except RowError as e:
            raise ValueError(str(e)) from None
        return self

    def prompt_and_tools(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        return self._prompt, self._tools

    def offered_tools(self) -> list[dict[str, Any]] | None:
        """The tools as training passes them to the chat template (checked as plain JSON; [] is none)."""
        return self._tools

    def conversation(self, answer: str | Message) -> list[dict[str, Any]]:
        """The prompt followed by ``answer`` as the assistant's reply: what the model scores."""
        return self._prompt + [answer.as_dict() if isinstance(answer, Message) else {"role": "assistant", "content": answer}]


class ComparePair(Conversation):
    id: Annotated[str, AfterValidator(_unicode)] | None = Field(
        None, description="Echoed back, to match results to pairs.")
    chosen: Answer
    rejected: Answer


class CompareBatch(_Strict):
    pairs: Annotated[list[ComparePair], BeforeValidator(_at_most_listed)] = Field(min_length=1)


def _compare_kind(body: Any) -> str:
    return "<batch>" if isinstance(body, dict) and "pairs" in body else "<pair>"


# One pair, or {"pairs": [...]}: told apart by the "pairs" key, so a bad request's errors name the
# fields of the form it meant, not those of both forms.
CompareRequest = Annotated[
    Annotated[ComparePair, Tag("<pair>")] | Annotated[CompareBatch, Tag("<batch>")], Discriminator(_compare_kind)
]


class ScoreRequest(Conversation):
    id: Annotated[str, AfterValidator(_unicode)] | None = Field(
        None, description="Echoed back, to match results to requests.")
    candidates: Annotated[list[Answer], BeforeValidator(_at_most_listed)] = Field(
        min_length=1, description="Answers to the prompt, scored independently.")


class Truncation(BaseModel):
    truncated: bool = Field(description="The prompt was cut from the left to fit max_length (the manifest's "
                                        "truncate_prompt policy); answers are never cut.")
    truncated_prompt_tokens: int


class PairResult(Truncation):
    id: str | None = None
    reward_chosen: float
    reward_rejected: float
    margin: float = Field(description="reward_chosen - reward_rejected")
    p_chosen_better: float = Field(description="sigmoid(margin): the Bradley-Terry probability that chosen is better")


class BatchResult(BaseModel):
    results: list[PairResult]


class ScoreResult(Truncation):
    id: str | None = None
    rewards: list[float] = Field(description="One reward per candidate, in request order.")
    ranking: list[int] = Field(description="Candidate indices, best first (ties keep request order).")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Info(BaseModel):
    model_path: str
    base_model: str | None
    version: str = Field(description="btrm version of this service")
    max_length: int
    overlong: str
    reward_token: str
    device: str
    dtype: str
    limits: dict[str, int]
    manifest: dict[str, Any] = Field(description="The model's btrm.json: tokenization, eval statistics, training.")


# ----------------------------------------------------------------------------------------------
# The HTTP application


def _chars(value: Any, tools_indent: int | None = None) -> int:
    """Characters of ``value`` (text, a message, or the prompt and tools) as JSON: about what a template renders.
    ``tools_indent``: the template's (:func:`tools_indent`): indented, every value of the tools is on its own
    line at its depth, many times their compact JSON for a deep schema."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Message):
        return len(json.dumps(value.as_dict(), ensure_ascii=False))
    prompt, tools = value
    return len(json.dumps(prompt, ensure_ascii=False)) + len(json.dumps(tools, ensure_ascii=False, indent=tools_indent))


def tools_indent(chat_template: Any) -> int | None:
    """The indent a chat template renders JSON with (Llama 3's `tools | tojson(indent=4)`), or None: compact."""
    indents = [int(n) for n in re.findall(r"tojson\(\s*(?:indent\s*=\s*)?(\d+)", str(chat_template))]
    return max(indents) if indents else None


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)  # no overflow for very negative margins
    return z / (1.0 + z)


# FastAPI's own answer to a body that its JSON parser fails on with other than a JSON syntax error (that is a 422).
class Refusal(BaseModel):
    detail: str = Field(description="What is wrong, where, and how to fix it.")


def _refusal(description: str) -> dict[str, Any]:
    return {"description": description, "model": Refusal}


def _unparsable(cause: BaseException | None) -> str | None:
    """What is wrong with a body FastAPI's JSON parsing failed on with other than a syntax error (its 400 says
    only "There was an error parsing the body"), from the parser's error; None for an error this does not know."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"the body is not UTF-8: byte {cause.object[cause.start]:#04x} at offset {cause.start} ({cause.reason}); "
                "send JSON encoded as UTF-8")
    if isinstance(cause, RecursionError):
        return ("the body's JSON nests arrays or objects too deep to parse; no request to this service nests more than "
                "a few levels")
    if isinstance(cause, ValueError) and (digits := re.search(r"value has (\d+) digits", str(cause))):
        return (f"the body's JSON holds an integer of {digits[1]} digits, more than Python converts "
                f"({sys.get_int_max_str_digits()}); no field of a request is such a number")
    return None


_UNAVAILABLE = _refusal("No model replica can score now: its GPU failed (a CUDA error) or ran out of memory, it "
                        "died, all are at their queue limit, or the model deployment failed to start; Serve "
                        "replaces failed replicas: retry after Retry-After seconds")

# What both scoring routes may answer besides 200 and 422 (every 422 has FastAPI's list of errors).
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _refusal("The body could not be parsed at all (not UTF-8, a number over 4300 digits, nested too deep)"),
    500: _refusal("The model failed: a reward that is not finite (has its training diverged?)"),
    503: _UNAVAILABLE,
}

ScoreGroups = Callable[[list[SharedPromptIds], str], Awaitable[list[list[float]]]]  # (groups, export_id)
ModelState = Callable[[], Awaitable[dict[str, Any]]]
MODEL_STATE_TIMEOUT_S = 5.0  # /health and /info wait this long for a model replica to answer
# A scoring request answered this recently shows that a model replica answers: /health says so at once rather
# than queue its own call behind the requests a busy replica holds (a readiness probe timing out at peak load
# would take every HTTP replica out of rotation).
RECENTLY_SCORED_S = 5.0


class GPUFailed(RuntimeError):
    """A CUDA error in this replica's forward (a device-side assert, an illegal memory access). CUDA errors
    stick to the process: every later forward here would fail too, so none is tried; the replica fails
    Serve's health check and Serve replaces it."""


class ForwardHung(RuntimeError):
    """A forward pass that outlasted forward_timeout_s (a GPU that hangs): the replica fails Serve's health check,
    and Serve replaces it; the requests it held get a 503 that says to retry."""


class ReplicaOutOfMemory(RuntimeError):
    """The GPU ran out of memory on a request scored alone: the replica's memory is short, not the request bad
    (the GPU stays usable)."""


class OtherExport(RuntimeError):
    """The model replica holds another export than the one the HTTP replica tokenized the request for: during a
    rollout, Serve's handles reach replicas of the old version and the new; and a model directory replaced in
    place reaches replicas started after it. Its rewards would be for other token ids than it expects."""


def export_id(manifest: dict[str, Any]) -> str:
    """What tells two exports apart: their manifests (tokenization, training figures and options) differ."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _cause(error: BaseException) -> BaseException:
    """The exception a model replica raised, out of the RayTaskError that carried it to this replica."""
    return getattr(error, "cause", None) or error


def _message(error: BaseException) -> str:
    """The model replica's own message (a RayTaskError's str is the whole remote traceback)."""
    cause = _cause(error)
    return str(cause.args[0]) if len(cause.args) == 1 else str(cause)


# Serve's errors for a model replica this request cannot reach now: a 503 with Retry-After, as Serve's proxy
# answers them, not a 500 that reads as the model's failure on this request.
MODEL_UNREACHABLE = (RayActorError, BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError)


def _unavailable(error: BaseException) -> str:
    if isinstance(error, BackPressureError):
        return "every model replica is at its queue limit (max_queued_requests): retry, or add replicas"
    if isinstance(error, DeploymentUnavailableError):
        return ("the model deployment is unavailable (its replicas failed to start, or it is being removed: "
                "`serve status` says why): retry")
    return (f"the model replica serving this request died or cannot be reached ({type(error).__name__}); Serve "
            "is replacing it: retry")


def build_api(encoder, options: ServiceOptions, token: str | None, score_groups: ScoreGroups,
              model_state: ModelState) -> FastAPI:
    """The FastAPI app of an HTTP replica. ``encoder`` tokenizes (a :class:`btrm.scoring.ConversationEncoder`);
    ``score_groups`` turns tokenized groups (a prompt and its answers) into each answer's reward (a model
    replica's batching queue, told which export the ids are for); ``model_state`` says a model replica's device,
    dtype and GPU failure, if any."""
    spec = encoder.spec
    export = export_id(encoder.manifest)
    last_scored = -math.inf  # time.monotonic() of the last request a model replica scored
    # Templating and tokenizing take a millisecond an answer, seconds for the largest request the limits allow:
    # on a thread, so that the event loop goes on answering /health and passing other requests to the model.
    # One thread: a fast tokenizer must not be used by two at once (it sets its truncation on every call).
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="btrm-tokenize")
    api = FastAPI(
        title="btrm reward model", version=btrm.__version__,
        description=f"Bradley-Terry reward model `{encoder.manifest.get('base_model')}`, max_length {spec.max_length}."
                    + (" Every route but /health needs `Authorization: Bearer <token>`." if token else ""),
    )

    indent = tools_indent(encoder.tokenizer.tokenizer.chat_template)

    def check_size(groups: list[tuple[Conversation, list[str | Message]]]) -> None:
        # Every answer is templated with its whole prompt (the exact ids training saw): a long prompt with many
        # candidates multiplies, and would hold the replica's event loop for minutes.
        chars = sum(len(answers) * _chars(request.prompt_and_tools(), indent) + sum(_chars(a) for a in answers)
                    for request, answers in groups)
        if chars > options.max_request_chars:
            raise HTTPException(413, f"{chars} characters to template (the prompt once per answer); the limit is "
                                     f"max_request_chars={options.max_request_chars}: send fewer answers per request "
                                     "or a shorter prompt")
        for request, answers in groups:  # (one conversation's names: the check that grows with them is per conversation)
            names = max((tool_names(request.conversation(a), request.offered_tools()) for a in answers), key=len)
            if len(names) > options.max_tools:
                raise HTTPException(413, f"{len(names)} tool names offered or called in one conversation; the limit is "
                                         f"max_tools={options.max_tools}")

    def encode(request: Conversation, answers: list[str | Message], loc: list[str | int],
               names: list[str]) -> SharedPromptIds:
        """``loc``: where the conversation is in the request, for the 422 of a template that refuses it;
        ``names``: its answers', for the 413 of one too long."""
        try:
            return encoder.encode_group([request.conversation(a) for a in answers], request.offered_tools())
        except AnswersTooLong as e:
            raise HTTPException(413, f"{', '.join(names[k] for k in e.answers)}: too long for the model's "
                                     f"max_length={spec.max_length} tokens (overlong policy {spec.overlong!r}): "
                                     f"{e.detail}") from None
        except UnrenderedToolUse as e:  # (what training says, "give a --chat_template", is no client's to do)
            raise HTTPException(422, [{"type": "chat_template", "loc": loc,
                                       "msg": f"the model's chat template does not render the tools or tool calls "
                                              f"{e.names}: it would score the answers without seeing them. Send the "
                                              "conversation in a form its template renders (or without them), or "
                                              "score it with a model whose template renders them"}]) from None
        except TEMPLATE_ERRORS as e:  # (a 422 like every other: a list of errors, each with its loc)
            raise HTTPException(422, [{"type": "chat_template", "loc": loc,
                                       "msg": f"the model's chat template rejects this conversation: {e}"}]) from None
        except TokensPastEmbedding as e:
            raise HTTPException(422, [{"type": "unknown_token", "loc": loc, "msg": str(e)}]) from None

    async def rewards_of(encoded: list[SharedPromptIds], names: list[list[str]]) -> list[list[float]]:
        """Each group's rewards; ``names``: each group's answers', for the error of a reward not finite."""
        nonlocal last_scored
        try:
            rewards = await score_groups(encoded, export)
        except GPUFailed as e:
            last_scored = -math.inf
            raise HTTPException(503, _message(e), headers={"Retry-After": "15"}) from None
        except (ReplicaOutOfMemory, OtherExport) as e:
            raise HTTPException(503, _message(e), headers={"Retry-After": "5"}) from None
        except MODEL_UNREACHABLE as e:
            if not isinstance(e, BackPressureError):  # (a full queue: replicas busy, not gone)
                last_scored = -math.inf
            raise HTTPException(503, _unavailable(e), headers={"Retry-After": "5"}) from None
        except Exception as e:  # the model's own failure on this request
            raise HTTPException(500, f"the model failed to score this request: {type(_cause(e)).__name__}: "
                                     f"{_message(e)} (the model replica's log has the traceback; requests batched "
                                     "with it were scored without it)") from None
        last_scored = time.monotonic()
        broken = [name for group, group_names in zip(rewards, names) for r, name in zip(group, group_names)
                  if not math.isfinite(r)]
        if broken:  # JSON has no NaN: without this, a bare "Internal Server Error" that says nothing
            raise HTTPException(500, f"the model's rewards are not finite for {', '.join(broken)}: has its training "
                                     f"diverged? Check the model at {options.model_path} (its training log's "
                                     "train/loss and eval/accuracy)")
        return rewards

    def too_many(field: str, count: int) -> HTTPException:
        option = LISTED_LIMITS[field]
        return HTTPException(413, f"{count} {field} in one request; the limit is {option}={getattr(options, option)}")

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 400 and (detail := _unparsable(exc.__cause__)):
            exc = StarletteHTTPException(400, detail)
        return await http_exception_handler(request, exc)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # Each error's loc as the path into the JSON the client sent: pydantic adds the tag of each union the
        # value went through ("<pair>", "<message>", ...), which names no field of the request.
        exc = RequestValidationError([{**e, "loc": tuple(part for part in e["loc"] if not _union_tag(part))}
                                      for e in exc.errors()], body=exc.body)
        for e in exc.errors():  # a list past MAX_LISTED: a 413 (pairs or candidates: the one their option gives)
            if e["type"] == "too_many":
                field, count = e["loc"][-1], e["ctx"]["count"]
                error = too_many(field, count) if e["loc"] == ("body", field) and field in LISTED_LIMITS else \
                    HTTPException(413, f"{count} {field} at {'.'.join(map(str, e['loc'][1:]))}; the limit is {MAX_LISTED}")
                return JSONResponse({"detail": error.detail}, status_code=error.status_code)
        try:
            return await request_validation_exception_handler(request, exc)
        except (ValueError, RecursionError):
            # FastAPI's 422 echoes each bad value, and Python's JSON parser accepts some that cannot be sent back:
            # NaN and Infinity, lone surrogates (\ud800), arrays nested ~1000 deep. Those get the 422 without the echo.
            errors = [{"type": e["type"], "loc": [_printable(part) for part in e["loc"]], "msg": _printable(e["msg"])}
                      for e in exc.errors()]
            return JSONResponse({"detail": errors}, status_code=422)

    async def current_model_state() -> dict[str, Any]:
        try:
            state = await asyncio.wait_for(model_state(), MODEL_STATE_TIMEOUT_S)
        except MODEL_UNREACHABLE as e:
            raise HTTPException(503, _unavailable(e), headers={"Retry-After": "5"}) from None
        except asyncio.TimeoutError:  # (TimeoutError itself from Python 3.11 on; another class on 3.10)
            raise HTTPException(503, f"no model replica answered within {MODEL_STATE_TIMEOUT_S:g} s (starting, being "
                                     "replaced, or busy): retry", headers={"Retry-After": "5"}) from None
        if state["gpu_failure"]:
            raise HTTPException(503, state["gpu_failure"], headers={"Retry-After": "15"})
        return state

    @api.get("/health", response_model=Health, responses={503: _UNAVAILABLE})
    async def health() -> Health:
        if time.monotonic() - last_scored > RECENTLY_SCORED_S:
            await current_model_state()
        return Health()

    # Load balancers and uptime monitors often probe with HEAD (the schema lists GET alone: one operation to fuzz)
    api.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @api.get("/info", response_model=Info, responses={503: _UNAVAILABLE})
    async def info() -> Info:
        state = await current_model_state()
        return Info(model_path=str(options.model_path), base_model=encoder.manifest.get("base_model"),
                    version=btrm.__version__, max_length=spec.max_length, overlong=spec.overlong,
                    reward_token=spec.reward_token, device=state["device"], dtype=state["dtype"],
                    limits=options.limits(), manifest=encoder.manifest)

    json_values_allowed = JSON_VALUES_PER_ITEM * (max(options.max_pairs, options.max_candidates) + 1)

    def within_json_values(field: str) -> Callable[[Request], Awaitable[None]]:
        """The JSON values a body holds in all, counted before any is validated. Past the budget, a body whose list
        of pairs or candidates (``field``) is over its option is told that, the more useful (a body under the budget
        is validated first: a malformed item is a 422, as invalid data anywhere)."""

        async def check(request: Request) -> None:
            try:
                body = await request.json()  # (parsed already, for the body's validation: Starlette keeps it)
            except (ValueError, RecursionError):
                return  # not JSON: the body's validation says so
            if json_values_past(body, json_values_allowed) <= json_values_allowed:
                return
            listed = body.get(field) if isinstance(body, dict) else None
            if isinstance(listed, list) and len(listed) > getattr(options, LISTED_LIMITS[field]):
                raise too_many(field, len(listed))
            raise HTTPException(413, f"the request holds more than {json_values_allowed} JSON values (objects, lists "
                                     "and what they hold): send fewer pairs or candidates per request")

        return check

    @api.post("/compare", response_model=PairResult | BatchResult,
              dependencies=[Depends(within_json_values("pairs"))],
              responses={**_ERRORS, 413: _refusal("Too many pairs, or a pair too long for the model")})
    async def compare(request: CompareRequest) -> PairResult | BatchResult:
        pairs = request.pairs if isinstance(request, CompareBatch) else [request]
        if len(pairs) > options.max_pairs:
            raise too_many("pairs", len(pairs))
        batch = isinstance(request, CompareBatch)
        names = [[f"{what}'s chosen answer", f"{what}'s rejected answer"]
                 for what in ([f"pair {i}" for i in range(len(pairs))] if batch else ["the pair"])]

        def tokenized() -> list[SharedPromptIds]:
            check_size([(p, [p.chosen, p.rejected]) for p in pairs])
            return [encode(p, [p.chosen, p.rejected], ["body", "pairs", i] if batch else ["body"], pair_names)
                    for i, (p, pair_names) in enumerate(zip(pairs, names))]

        encoded = await asyncio.get_running_loop().run_in_executor(tokenizing, tokenized)
        rewards = await rewards_of(encoded, names)
        results = []
        for pair, e, (chosen, rejected) in zip(pairs, encoded, rewards):
            results.append(PairResult(id=pair.id, reward_chosen=chosen, reward_rejected=rejected,
                                      margin=chosen - rejected, p_chosen_better=sigmoid(chosen - rejected),
                                      truncated=e.truncated > 0, truncated_prompt_tokens=e.truncated))
        return BatchResult(results=results) if isinstance(request, CompareBatch) else results[0]

    @api.post("/score", response_model=ScoreResult,
              dependencies=[Depends(within_json_values("candidates"))],
              responses={**_ERRORS, 413: _refusal("Too many candidates, or a candidate too long for the model")})
    async def score(request: ScoreRequest) -> ScoreResult:
        if len(request.candidates) > options.max_candidates:
            raise too_many("candidates", len(request.candidates))
        names = [f"candidate {k}" for k in range(len(request.candidates))]

        def tokenized() -> SharedPromptIds:
            check_size([(request, request.candidates)])
            return encode(request, request.candidates, ["body"], names)

        encoded = await asyncio.get_running_loop().run_in_executor(tokenizing, tokenized)
        [rewards] = await rewards_of([encoded], [names])
        ranking = sorted(range(len(rewards)), key=lambda k: -rewards[k])
        return ScoreResult(id=request.id, rewards=rewards, ranking=ranking, truncated=encoded.truncated > 0,
                           truncated_prompt_tokens=encoded.truncated)

    # The last middleware added runs first: the token is checked before anything else.
    api.add_middleware(BodySizeLimit, max_body_bytes=options.max_body_bytes)
    if token:
        _document_bearer_auth(api)
        api.add_middleware(BearerTokenGuard, token=token)
    return api


class BearerTokenGuard:
    """Refuses every request but those to UNGUARDED_PATHS without ``Authorization: Bearer <token>``.

    ASGI middleware rather than a route dependency so that it also covers /docs and /openapi.json."""

    def __init__(self, app, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and _route_path(scope) not in UNGUARDED_PATHS:
            scheme, _, given = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not given:
                reason = "missing bearer token: send the header 'Authorization: Bearer <token>'"
            elif not hmac.compare_digest(given.strip().encode(), self.token):
                reason = "wrong bearer token"
            else:
                reason = None
            if reason:
                response = JSONResponse({"detail": reason}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimit:
    """413, naming the limit, for a request body over ``max_body_bytes``: refused on its declared
    Content-Length before it is read, else counted while it is read (chunked, or a false length) and
    handed to the app whole. (FastAPI's own ``max_body_size`` answers a bare "Content Too Large".)"""

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._refuse(f"{declared} bytes", scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await self._refuse(f"over {self.max_body_bytes} bytes", scope, receive, send)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, size: str, scope, receive, send):
        response = JSONResponse({"detail": f"request body of {size}; the limit is max_body_bytes={self.max_body_bytes}"},
                                status_code=413)
        await response(scope, receive, send)


def _printable(value: Any) -> Any:
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


def _route_path(scope) -> str:
    # Under a Serve route_prefix the path still carries the prefix, which is also the root_path.
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


# What BearerTokenGuard answers, so that a client (and a schema-driven test) knows a 401 is part of the API.
_UNAUTHORIZED_RESPONSE = {
    "description": "Missing or wrong bearer token",
    "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
    "content": {"application/json": {"schema": {
        "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}},
}


def _document_bearer_auth(api: FastAPI) -> None:
    """Declares the bearer token in the OpenAPI schema (the guard itself is middleware, which FastAPI cannot see)."""

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            schema = get_openapi(title=api.title, version=api.version, description=api.description, routes=api.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                if path not in UNGUARDED_PATHS:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
                        operation.setdefault("responses", {})["401"] = _UNAUTHORIZED_RESPONSE
            api.openapi_schema = schema
        return api.openapi_schema

    api.openapi = openapi


# ----------------------------------------------------------------------------------------------
# The Serve deployment


class ForwardQueue:
    """Continuous batching: requests wait here while the model computes, and each time it is free, everything
    waiting (up to ``max_answers`` answers) goes into its next forward. ``score_batch`` maps the requests of a
    batch to each one's result, or to the exception for that request.

    Not ``@serve.batch``: in Ray 2.60 it forms the next batch as soon as its wait ends, even while a batch is
    still running, and queues it behind that one; under load a slow forward then got batches of one or two
    requests while dozens waited behind it (README: Scoring service)."""

    def __init__(self, score_batch: Callable[[list[Any]], Awaitable[list[Any]]], size: Callable[[Any], int],
                 max_answers: int, wait_s: float):
        self.score_batch, self.size, self.max_answers, self.wait_s = score_batch, size, max_answers, wait_s
        self.waiting: deque[tuple[Any, asyncio.Future]] = deque()
        self.arrived = asyncio.Event()
        self.worker: asyncio.Task | None = None

    async def submit(self, request: Any) -> Any:
        # No request outweighs a batch: ServiceOptions.validate keeps max_batch_sequences >= the largest request.
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future))
        self.arrived.set()
        if self.worker is None or self.worker.done():  # started in the loop that serves the requests
            self.worker = asyncio.create_task(self._run())
        return await future

    def _take(self) -> list[tuple[Any, asyncio.Future]]:
        batch, answers = [], 0
        while self.waiting and (not batch or answers + self.size(self.waiting[0][0]) <= self.max_answers):
            request, future = self.waiting.popleft()
            if not future.done():  # a request whose client went away is not scored
                batch.append((request, future))
                answers += self.size(request)
        return batch

    async def _run(self) -> None:
        while True:
            if not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
                await asyncio.sleep(self.wait_s)  # an idle model's first request waits for others to join
            batch = self._take()
            if not batch:
                continue
            try:
                results = await self.score_batch([request for request, _ in batch])
            except Exception as e:  # score_batch answers per request; this is a bug of its own: tell everyone
                results = [e] * len(batch)
            for (_, future), result in zip(batch, results, strict=True):
                if future.done():
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


def _answer_count(request: list[SharedPromptIds]) -> int:
    return sum(len(group.tails) for group in request)


# max_ongoing_requests: enough requests of pairs to fill a batch of max_batch_sequences (a Serve config
# may change both). health_check_period_s: a failed replica is noticed, and replaced, within seconds.
# Beyond max_queued_requests waiting for a replica, a 503 at once (Ray's default, no limit, turns overload into
# ever longer waits and 408s). A Serve config's deployments may set these anew.
@serve.deployment(name="RewardModel", max_ongoing_requests=128, max_queued_requests=1024, health_check_period_s=5)
class RewardModelDeployment:
    """A model replica: the exported model and the batching queue that scores concurrent requests together.
    Reached through RewardAPI's handle: token ids in, rewards out. It does no request handling of its own:
    its forward's kernel launching holds the Python interpreter for tens of milliseconds per batch, and
    requests taken in meanwhile would wait for it (README: Scoring service)."""

    def __init__(self, options: ServiceOptions):
        from btrm.scoring import actor_scorer

        self.options = options
        self.gpu_failure: str | None = None  # how this replica's GPU failed (a CUDA error), once it has
        self.forward_started: float | None = None  # time.monotonic() when the forward under way began
        self.scorer = actor_scorer(options.model_path, dtype=options.dtype)
        self.export = export_id(self.scorer.manifest)  # the manifest read with the weights, not read again
        # A /score request with 64 candidates weighs 64: batches are counted in answers, not requests.
        self.queue = ForwardQueue(self.rewards_of_batch, _answer_count, options.max_batch_sequences,
                                  options.batch_wait_timeout_s)

    async def score_groups(self, groups: list[SharedPromptIds], export: str) -> list[list[float]]:
        """One request's tokenized groups, for the export ``export`` (its :func:`export_id`) → their rewards,
        scored in one batch with concurrent requests'."""
        if export != self.export:
            raise OtherExport(f"this model replica holds another export of {self.options.model_path} ({self.export}) "
                              f"than the request was tokenized for ({export}): a rollout is under way (retry), or the "
                              "directory was replaced while the service ran (deploy the service again)")
        return await self.queue.submit(groups)

    async def state(self) -> dict[str, Any]:
        """For /health and /info: where this replica scores, in what, and how its GPU failed, if it has."""
        return {"device": str(self.scorer.device), "dtype": str(self.scorer.dtype).removeprefix("torch."),
                "gpu_failure": self.gpu_failure}

    def check_health(self) -> None:
        """Serve's health check, every health_check_period_s: a replica that fails it is replaced."""
        if self.gpu_failure:
            raise GPUFailed(self.gpu_failure)
        # A forward runs in a thread (this check on the event loop still answers): one that hangs there would keep
        # the replica healthy, and every request sent to it waiting, for ever. A batch is many forwards (of at most
        # max_batch_tokens each): each is timed from its own start.
        timeout, started = self.options.forward_timeout_s, self.forward_started
        if timeout and started is not None:
            began = max(started, self.scorer.forward_began)
            if time.monotonic() - began > timeout:
                raise ForwardHung(f"a forward pass has run for {time.monotonic() - began:.0f} s, past "
                                  f"forward_timeout_s={timeout}: Serve replaces this replica")

    async def _rewards(self, groups: list[SharedPromptIds]) -> list[list[float]]:
        if self.gpu_failure:
            raise GPUFailed(self.gpu_failure)
        self.forward_started = time.monotonic()  # (the queue runs one forward at a time)
        try:
            # In a thread: the event loop keeps taking in the next requests meanwhile.
            return await asyncio.to_thread(self.scorer.group_rewards, groups, self.options.max_batch_tokens)
        except Exception as e:
            import torch  # (here, not at the top: HTTP replicas import this module and never a model)

            from btrm.scoring import is_cuda_error

            logger.exception("btrm: scoring %d groups of answers failed", len(groups))
            if isinstance(e, torch.OutOfMemoryError):
                raise ReplicaOutOfMemory(f"the model replica ran out of GPU memory scoring this request: retry; if "
                                         f"it persists, lower max_batch_tokens ({self.options.max_batch_tokens}) or "
                                         "give each replica a larger GPU") from None
            if not is_cuda_error(e):
                raise
            self.gpu_failure = f"this replica's GPU failed ({type(e).__name__}: {e}); Serve is replacing the replica: retry"
            raise GPUFailed(self.gpu_failure) from None
        finally:
            self.forward_started = None

    async def rewards_of_batch(self, requests: list[list[SharedPromptIds]]) -> list[list[list[float]] | Exception]:
        """The tokenized groups of many concurrent requests → each request's rewards, group by group
        (packed together where the model allows it, else padded by length: RewardScorer.group_rewards),
        or the error of a request the model fails on."""
        try:
            rewards = await self._rewards([group for request in requests for group in request])
        except Exception:
            if len(requests) == 1:
                raise
            # One request can fail the forward of every request batched with it (an input the model cannot
            # take, a batch too big for the GPU's memory): each is scored again alone, and only one that
            # fails alone hears of it.
            return [await self._alone(request) for request in requests]
        per_request, start = [], 0
        for request in requests:
            per_request.append(rewards[start : start + len(request)])
            start += len(request)
        return per_request

    async def _alone(self, request: list[SharedPromptIds]) -> list[list[float]] | Exception:
        try:
            return await self._rewards(request)
        except Exception as e:
            return e


# max_ongoing_requests: an HTTP replica mostly awaits the model; it must hold enough requests to fill the
# model replicas' batches. max_queued_requests: past it the proxy answers 503 at once, with Retry-After as the
# service's own 503s (without a limit it holds every request, its body included, in memory until a replica is
# free). One CPU: it tokenizes, and runs Serve's and FastAPI's request handling.
@serve.deployment(name="RewardAPI", max_ongoing_requests=256, max_queued_requests=1024,
                  backpressure_config=BackpressureConfig(retry_after_s=5), ray_actor_options={"num_cpus": 1})
@serve.ingress()
class RewardAPIDeployment:
    """An HTTP replica: the FastAPI app (built at replica start around this replica's tokenization and token)
    that validates and tokenizes requests and has RewardModel score their token ids."""

    def __init__(self, options: ServiceOptions, token: str | None, model: DeploymentHandle):
        from btrm.scoring import ConversationEncoder

        self.options = options
        self.token = token
        self.model = model
        self.encoder = ConversationEncoder(options.model_path)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.encoder, self.options, self.token, self.model.score_groups.remote,
                         self.model.state.remote)


def _replica_gpus(setting: str) -> float:
    if setting != "auto":
        return float(setting)
    import ray

    if ray.is_initialized():
        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    import torch  # `serve run module:app` builds before it connects to Ray: judge by this machine

    return 1.0 if torch.cuda.is_available() else 0.0


def build_app(options: ServiceOptions, num_replicas: int | None = None, api_replicas: int | None = None,
              model_deployment: serve.Deployment = RewardModelDeployment) -> serve.Application:
    """The Serve application for ``options`` (validated here; the token is read here): ``api_replicas`` HTTP
    replicas in front of ``num_replicas`` model replicas (None: the deployments' defaults, or a Serve
    config's). ``model_deployment``: the model replicas' (a benchmark's stand-in for a GPU replaces it)."""
    options.validate()
    from btrm.model import check_trained_weights  # (here: HTTP replicas import this module and never torch)

    read_manifest(options.model_path)  # fail now, not in every replica, when the directory or the model is wrong
    check_trained_weights(options.model_path)
    token = read_token(options)
    # Enough requests in flight to fill a batch of max_batch_sequences with pairs, past the deployments' defaults
    # (a Serve config's deployment settings still win).
    model_options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": options.replica_cpus, "num_gpus": _replica_gpus(options.replica_gpus)},
        "max_ongoing_requests": max(RewardModelDeployment.max_ongoing_requests, -(-options.max_batch_sequences // 2)),
    }
    api_options: dict[str, Any] = {
        "max_ongoing_requests": max(RewardAPIDeployment.max_ongoing_requests, options.max_batch_sequences),
    }
    if num_replicas is not None:
        model_options["num_replicas"] = num_replicas
    if api_replicas is not None:
        api_options["num_replicas"] = api_replicas
    model = model_deployment.options(**model_options).bind(options)
    return RewardAPIDeployment.options(**api_options).bind(options, token, model)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve configs: ``import_path: btrm.serving:app_builder`` with ``args``
    named like the fields of :class:`ServiceOptions` (model_path, token_env, max_candidates, ...)."""
    try:  # `serve run ... key=value` gives text, YAML may give 5e-3 as text: read each as its field's type
        options = ServiceOptions(**typed_values(ServiceOptions, args))
    except ValueError as e:
        raise ValueError(f"application args: {e}") from None
    if read_token(options) is None:
        # Read where the application is built (on the cluster for `serve deploy`, not in the deploying shell),
        # and the config's host may face a network.
        logger.warning(
            f"btrm: no bearer token (${options.token_env} is not set where the application is built, and no "
            "token_file): every route of the service is open")
    return build_app(options)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    """``btrm serve --model_path DIR``: the service on this machine, until Ctrl-C. On a cluster's Ray
    (``--ray_address``) it adds its application beside the others there and removes only its own at exit."""
    import ray

    command = parse_config(ServeCommand, summary("serve"), argv)
    # Replicas start in Ray's working directory, not this shell's.
    command.model_path = str(Path(command.model_path).resolve())
    service = ServiceOptions(**{f.name: getattr(command, f.name) for f in dataclasses.fields(ServiceOptions)})
    from btrm.model import check_trained_weights

    try:  # before Ray: a wrong path, model or token file stops here, touching nothing on a cluster
        read_manifest(command.model_path)
        check_trained_weights(command.model_path)
        guarded = read_token(service) is not None
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"btrm serve: {e}") from None
    local = command.ray_address == "local"
    if local:
        # Ray's CPUs are reservations, not cores: on a machine with fewer cores than the replicas reserve (a
        # laptop, a small VM) they share the cores, where Ray's default (one CPU a core) would leave a replica
        # unscheduled and this command waiting forever.
        reserved = command.api_replicas + math.ceil(command.num_replicas * command.replica_cpus)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, reserved), include_dashboard=False)
        gpus, per_replica = ray.cluster_resources().get("GPU", 0), _replica_gpus(command.replica_gpus)
        if command.num_replicas * per_replica > gpus:  # (else Serve waits for GPUs this machine lacks, for ever)
            ray.shutdown()
            raise SystemExit(f"btrm serve: --num_replicas {command.num_replicas} x {per_replica:g} GPU each needs more "
                             f"GPUs than this machine has ({gpus:g}): fewer replicas, or --replica_gpus 0.5 to share")
    else:
        ray.init(address=command.ray_address)
    # A service manager's stop (docker stop, systemd, a pod's termination) is SIGTERM: shut down as on Ctrl-C,
    # from start-up on (this replaces the handler ray.init installed, which dumps a stack trace and exits).
    signal.signal(signal.SIGTERM, _interrupt)
    deployed = False
    try:
        running = serve.status()
        if APP_NAME in running.applications:
            raise SystemExit(f"btrm serve: the cluster at {command.ray_address} already serves an application named "
                             f"{APP_NAME!r}; it is left as it is. Stop it first (`serve delete {APP_NAME}`), or update "
                             "it with `serve deploy` and a Serve config (serve/config.yaml)")
        if running.proxies:  # serve.start's HTTP options apply only to a Serve it starts
            print("[btrm] Serve already runs on this cluster: its own HTTP host, port and request timeout apply, not "
                  "--host, --port and --request_timeout_s", flush=True)
        serve.start(http_options={"host": command.host, "port": command.port,
                                  "request_timeout_s": command.request_timeout_s})
        deployed = True  # (from here on, a half-made application of ours is ours to remove)
        serve.run(build_app(service, num_replicas=command.num_replicas, api_replicas=command.api_replicas),
                  name=APP_NAME, route_prefix="/")
        print(f"[btrm] serving {command.model_path} at http://{command.host}:{command.port} "
              f"(API docs: /docs{', with the token' if guarded else ''}); bearer token {'required' if guarded else 'not set: every route is open'}; "
              "Ctrl-C stops", flush=True)
        if not guarded and command.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"[btrm] WARNING: listening on {command.host} without a token: set ${command.token_env} or "
                  "--token_file", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[btrm] shutting down", flush=True)
    finally:
        if local:
            serve.shutdown()
        elif deployed:  # a cluster's Serve and its other applications are not this command's to stop
            serve.delete(APP_NAME)
        ray.shutdown()
