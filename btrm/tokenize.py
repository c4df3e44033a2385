"""Conversations → token ids: the one tokenization that training, evaluation and serving share.

A group of conversations that share a prompt (a pair, or a prompt with N candidate answers) is
templated with the model's chat template and tokenized exactly as ``apply_chat_template`` does. The
token ids all members share (their longest common prefix: the prompt, in token space) are kept once as
``prompt_ids`` and each member's remainder as its ``tail``; ``prompt_ids + tail`` is that member's full
sequence. Over-long groups follow an explicit policy: cut the shared prompt from the left (every member
keeps the *same* prompt and its whole answer) or drop the group. Answers are never truncated.

The reward is read at one token per sequence, recorded in the manifest as ``reward_token``:
``"last"`` (decoder models: the last token of the templated conversation) or ``"first"`` (encoders
such as BERT, whose classification head pools the first token). Truncation never removes it.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import jinja2

from btrm.export import model_on_this_node
from btrm.processors.base import RowDropped

OVERLONG_POLICIES = ("truncate_prompt", "drop")
# What a chat template raises when it refuses a conversation: its own exception (raise_exception, an undefined
# attribute), or a TypeError from an expression over values of the wrong type (a tool schema it did not expect).
TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError)
REWARD_TOKENS = ("last", "first")
# The day btrm's exports render where a template stamps one: the date Llama 3.1's template falls back to.
TEMPLATE_DATE = "26 Jul 2024"


@dataclass(frozen=True)
class TokenizationSpec:
    """Everything that decides the token ids of a conversation; written into the export manifest."""

    max_length: int
    overlong: str = "truncate_prompt"
    reward_token: str = "last"
    chat_template: str | None = None  # None: the tokenizer's own
    # The day a template that stamps one renders (Llama 3.x's "Today Date: ..."), fixed: left to the template it is
    # the day of each run, and a service would tokenize otherwise than the training it serves. None: the
    # template's own (manifests from before btrm fixed it).
    date_string: str | None = None

    def __post_init__(self):
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"overlong policy must be one of {OVERLONG_POLICIES}, got {self.overlong!r}")
        if self.reward_token not in REWARD_TOKENS:
            raise ValueError(f"reward_token must be one of {REWARD_TOKENS}, got {self.reward_token!r}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SharedPromptIds:
    prompt_ids: list[int]
    tails: list[list[int]]
    truncated: int  # prompt tokens cut off the left

    def sequence(self, k: int) -> list[int]:
        return self.prompt_ids + self.tails[k]


SHIPPED_TEMPLATES = {p.stem: p for p in (Path(__file__).parent / "templates").glob("*.jinja")}


def read_chat_template(name_or_path: str | Path | None) -> str | None:
    """A Jinja chat template from a file, or one btrm ships by name (``plain``)."""
    if name_or_path is None:
        return None
    path = SHIPPED_TEMPLATES.get(str(name_or_path)) or Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"--chat_template {name_or_path}: neither a Jinja template file nor a shipped "
                                f"template ({sorted(SHIPPED_TEMPLATES)})")
    return path.read_text()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_on_this_node(path))
    # transformers warns, once, of a text longer than the tokenizer's model_max_length that "will result in
    # indexing errors": btrm tokenizes whole conversations and then fits them to --max_length itself.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def prepare_tokenizer(tokenizer, chat_template: str | None = None):
    """Installs ``chat_template`` if given and makes sure there is a pad token.

    A tokenizer without a pad token borrows an existing special token (no new embedding row, so the
    model is not resized); the one chosen is never the reward token of a templated conversation, so
    "last non-pad token" pooling in plain transformers still finds the reward token.
    """
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.chat_template is None:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template: pass --chat_template FILE "
            "or --chat_template plain (shipped with btrm, for encoders such as BERT and base decoders)"
        )
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:  # (here, where a job starts: in a data task it would be a jinja traceback on every batch)
        probe_ids = _template_ids(tokenizer, [probe])[0]
    except jinja2.TemplateError as e:
        which = "--chat_template: the template" if chat_template is not None else "the tokenizer's own chat template"
        raise ValueError(f"{which} cannot render a user/assistant exchange ({type(e).__name__}: {e})"
                         + ("" if chat_template is not None else ": pass --chat_template FILE to replace it")) from e
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == probe_ids[-1]:
        candidates = [tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token, *tokenizer.all_special_tokens]
        for token in candidates:
            if token is not None and tokenizer.convert_tokens_to_ids(token) != probe_ids[-1]:
                tokenizer.pad_token = token
                break
        else:
            raise ValueError("the tokenizer has no special token that can serve as padding")
    return tokenizer


Tools = Optional[list[dict]]  # the tool schemas a conversation offers (None: none), as apply_chat_template takes them


class UnrenderedToolUse(jinja2.TemplateError):
    """The chat template left out offered tools or tool calls (a template without tool support): the
    model would judge answers without seeing what they answer or do. ``names``: those left out."""

    def __init__(self, names: list[str]):
        super().__init__(f"it leaves out the tools or tool calls {names} (a template without tool support): give a "
                         "--chat_template that renders them")
        self.names = names

    def __reduce__(self):  # (pickled as it was made: Ray carries exceptions between processes)
        return type(self), (self.names,)


def tool_names(conversation: Sequence[dict], tools: Tools) -> set[str]:
    """The names of the tools a conversation offers and of the functions it calls."""
    offered = {tool.get("function", tool).get("name") for tool in tools or () if isinstance(tool.get("function", tool), dict)}
    called = {call["function"]["name"] for message in conversation for call in message.get("tool_calls", ())}
    return {name for name in offered | called if isinstance(name, str) and name}


def _renamed(conversation: Sequence[dict], tools: Tools, alias: dict[str, str]) -> tuple[list[dict], Tools]:
    """The conversation and tools with every offered tool and called function renamed by ``alias``."""
    def renamed(function: dict) -> dict:
        name = function.get("name")
        return {**function, "name": alias[name]} if isinstance(name, str) and name in alias else function

    messages = [{**m, "tool_calls": [{**c, "function": renamed(c["function"])} for c in m["tool_calls"]]}
                if "tool_calls" in m else m for m in conversation]
    offered = None if tools is None else [
        {**tool, "function": renamed(tool["function"])} if isinstance(tool.get("function"), dict) else renamed(tool)
        for tool in tools]
    return messages, offered


def _unrendered_tool_names(tokenizer, conversation: Sequence[dict], tools: Tools, text: str,
                           add_generation_prompt: bool, variables: dict[str, Any]) -> list[str]:
    """The offered tools and called functions whose names the template left out of ``text``."""
    names = tool_names(conversation, tools)
    if not names:  # most conversations: nothing to look for
        return []
    # (tojson escapes quotes and backslashes in a name: either spelling counts as rendered)
    missing = {name for name in names if name not in text and json.dumps(name)[1:-1] not in text}
    # A name the conversation says elsewhere (an answer's "let me search", a tool reply's name, a longer
    # name) proves nothing of the template: those names are given aliases in the tools and calls and the
    # conversation is rendered again, where the aliases must show.
    alias = {name: f"btrm_tool_alias_{i}" for i, name in enumerate(sorted(names - missing))}
    messages, offered = _renamed(conversation, tools, alias)
    elsewhere = json.dumps([messages, offered], ensure_ascii=False)
    # (inside a longer name: found in all names joined, more than once; one C-speed scan per name, where a pairwise
    # comparison in Python took seconds for a few thousand names)
    joined = "\x00".join(names)
    said = {name for name in alias if name in elsewhere or joined.count(name) > 1}
    if said:
        again = tokenizer.apply_chat_template(messages, tools=offered, tokenize=False,
                                              add_generation_prompt=add_generation_prompt, **variables)
        missing |= {name for name in said if alias[name] not in again}
    return sorted(missing)


def _template_ids(tokenizer, conversations: Sequence[Sequence[dict]], tools: Tools = None,
                  add_generation_prompt: bool = False, variables: dict[str, Any] | None = None) -> list[list[int]]:
    # Equivalent to apply_chat_template(tokenize=True), but one batched call to the Rust tokenizer. ``variables``:
    # more the template may read (date_string).
    variables = variables or {}
    texts = tokenizer.apply_chat_template(list(conversations), tools=tools, tokenize=False,
                                          add_generation_prompt=add_generation_prompt, **variables)
    for conversation, text in zip(conversations, texts):
        missing = _unrendered_tool_names(tokenizer, conversation, tools, text, add_generation_prompt, variables)
        if missing:
            raise UnrenderedToolUse(missing)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


class PairTokenizer:
    """Tokenizes conversations under a :class:`TokenizationSpec`."""

    def __init__(self, tokenizer, spec: TokenizationSpec):
        self.tokenizer = prepare_tokenizer(tokenizer, spec.chat_template)
        self.spec = spec
        self.template_variables: dict[str, Any] = {}
        if spec.date_string is not None:
            # Templates that stamp the day read date_string (Llama 3.x) or call strftime_now themselves (SmolLM3,
            # Granite, Mistral Small): both give the spec's day.
            self.template_variables["date_string"] = spec.date_string
            dated = _template_dated(self.tokenizer.chat_template, spec.date_string)
            if dated is not None:
                self.template_variables["chat_template"] = dated  # (apply_chat_template's own argument)

    def encode_conversations(self, conversations: Sequence[Sequence[dict]], tools: Tools = None) -> list[list[int]]:
        return _template_ids(self.tokenizer, conversations, tools, variables=self.template_variables)

    def encode_group(self, conversations: Sequence[Sequence[dict]], tools: Tools = None) -> SharedPromptIds:
        """Tokenizes conversations that share a prompt (and the ``tools`` it offers). Raises
        RowDropped('overlong') when they cannot fit, one of TEMPLATE_ERRORS when the chat template refuses them."""
        return self._share_prompt(conversations, self.encode_conversations(conversations, tools), tools)

    def encode_groups(self, groups: Sequence[Sequence[Sequence[dict]]],
                      tools: Sequence[Tools] | None = None) -> list[SharedPromptIds | Exception]:
        """Many groups (with ``tools[k]``, the tools group k offers) in one batched call to the tokenizer. A
        group that cannot be encoded gets, in its place, the reason (RowDropped: overlong; TEMPLATE_ERRORS:
        the chat template refuses it, e.g. a system turn or two user turns in a row); the others are unaffected."""
        tools = list(tools) if tools is not None else [None] * len(groups)
        kinds = {_tools_key(t): [] for t in tools}
        if len(kinds) > 1:  # a template call takes one set of tools: one call per distinct set
            for k, t in enumerate(tools):
                kinds[_tools_key(t)].append(k)
            results: list[SharedPromptIds | Exception] = [None] * len(groups)  # type: ignore[list-item]
            for members in kinds.values():
                encoded = self.encode_groups([groups[k] for k in members], [tools[k] for k in members])
                for k, result in zip(members, encoded):
                    results[k] = result
            return results
        offered = tools[0] if tools else None
        try:
            ids = self.encode_conversations([conversation for group in groups for conversation in group], offered)
        except TEMPLATE_ERRORS as e:
            if len(groups) == 1:
                return [e]
            return [result for group in groups for result in self.encode_groups([group], [offered])]
        results = []
        start = 0
        for group in groups:
            try:
                results.append(self._share_prompt(group, ids[start : start + len(group)], offered))
            except (RowDropped, *TEMPLATE_ERRORS) as e:  # templating the prompt alone can fail too
                results.append(e)
            start += len(group)
        return results

    def _prompt_length(self, conversation: Sequence[dict], sequence: list[int], tools: Tools,
                       answer_opening: bool = True) -> int:
        """How many leading tokens of ``sequence`` are the conversation before its answer: what the prompt
        alone templates to, with the answer's turn opening (``<|im_start|>assistant\n``) or without."""
        prompt = _template_ids(self.tokenizer, [conversation[:-1]], tools, add_generation_prompt=answer_opening,
                               variables=self.template_variables)[0]
        return _common_prefix_length([sequence, prompt])

    def _share_prompt(self, conversations: Sequence[Sequence[dict]], sequences: list[list[int]],
                      tools: Tools) -> SharedPromptIds:
        # A lone answer shares nothing with a second one: its prompt is what the prompt alone templates to.
        prompt_length = self._prompt_length(conversations[0], sequences[0], tools) if len(sequences) == 1 else None
        shared = _common_prefix_length(sequences) if prompt_length is None else prompt_length
        # Every member keeps at least one token of its own: its reward token ("last") sits there.
        shared = min(shared, min(len(s) for s in sequences) - 1)
        prompt, tails = sequences[0][:shared], [s[shared:] for s in sequences]
        longest = max(len(t) for t in tails)
        excess = len(prompt) + longest - self.spec.max_length
        if excess <= 0:
            return SharedPromptIds(prompt, tails, 0)
        if self.spec.overlong == "drop" or tools:
            # Offered tools are defined where chat templates render them, at the conversation's start: a cut from
            # the left would take them first, and leave calls to tools the model never sees defined.
            why = " (the prompt offers tools, defined at its start: it is never cut)" if tools else ""
            raise AnswersTooLong(self._too_long(tails, len(prompt)),
                                 f"the prompt's {len(prompt)} tokens and the longest answer's {longest} are "
                                 f"{len(prompt) + longest} > max_length {self.spec.max_length}{why}")
        # Only the conversation before the answers is cut, from its left: what the answers share at their
        # start (their turn's opening, a common first sentence) belongs to them. The sequence's opening token
        # stays, and the cut starts right after it, where it is an encoder's reward token or the BOS a template
        # opens with (Llama's: a decoder given text without it reads it out of distribution).
        bos = self.tokenizer.bos_token_id
        head = 1 if self.spec.reward_token == "first" or (bos is not None and prompt[:1] == [bos]) else 0
        cuttable = min(shared, self._prompt_length(conversations[0], sequences[0], tools, answer_opening=False)) - head
        if excess > cuttable:
            raise AnswersTooLong(self._too_long(tails, len(prompt) - cuttable),
                                 f"the answers with their shared opening take {len(prompt) - cuttable + longest} "
                                 f"tokens, max_length is {self.spec.max_length}, and answers are never truncated")
        return SharedPromptIds(prompt[:head] + prompt[head + excess :], tails, excess)

    def _too_long(self, tails: list[list[int]], least_prompt: int) -> list[int]:
        return [k for k, tail in enumerate(tails) if least_prompt + len(tail) > self.spec.max_length]


# A template's call of strftime_now with a literal format.
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\)""")


def _template_dated(template: Any, day: str) -> str | None:
    """``template`` with its ``strftime_now("format")`` calls giving ``day`` (a date_string, as TEMPLATE_DATE writes
    one) instead of today: a macro of that name, defined first, shadows transformers' function (which no template
    variable can: apply_chat_template renders a callable it is given as text). None where there is nothing to
    change, or a call's format is no literal (that template keeps its own clock)."""
    if not isinstance(template, str) or "strftime_now(" not in template:
        return None
    calls = _STRFTIME_CALL.findall(template)
    if template.count("strftime_now(") != len(calls):
        return None
    date = datetime.strptime(day, "%d %b %Y")
    dates = {a or b: date.strftime(a or b) for a, b in calls}
    # (the closing {{ "" }}: a block tag last would take the template's first newline with it, trim_blocks)
    return ("{% set btrm_dates = " + json.dumps(dates) + " %}{% macro strftime_now(format) %}{{ btrm_dates[format] }}"
            "{% endmacro %}{{ \"\" }}" + template)


class AnswersTooLong(RowDropped):
    """A group that cannot fit max_length with the least of its prompt it may keep; ``answers``: the
    positions of the answers too long (a service names them to its client)."""

    def __init__(self, answers: list[int], detail: str):
        super().__init__("overlong", detail)
        self.answers = answers


class TokensPastEmbedding(ValueError):
    """Token ids the model's embedding has no row for: on a GPU the lookup fails as a device-side assert,
    which leaves the process's CUDA context unusable, so they are refused before any forward meets them."""


def tokens_past_embedding(tokenizer, encoded: SharedPromptIds, rows: int | None) -> TokensPastEmbedding | None:
    """The error for ``encoded``'s ids at or past ``rows`` (the model's embedding rows), or None."""
    parts = (encoded.prompt_ids, *encoded.tails)
    # Per pair on the data path: max() in C first; the Python scan only for the rare pair that has some.
    if rows is None or max(max(ids, default=0) for ids in parts) < rows:
        return None
    beyond = sorted({i for ids in parts for i in ids if i >= rows})
    tokens = ", ".join(f"{tokenizer.convert_ids_to_tokens(i)!r} (id {i})" for i in beyond[:5])
    return TokensPastEmbedding(f"the text holds tokens the model has no embedding for: {tokens}; its embedding has "
                               f"{rows} rows (a tokenizer extended after the model was trained, or a special token "
                               "such as an image placeholder written into the text)")


def _tools_key(tools: Tools) -> str:
    # Keys in their own order: a template's tojson keeps it, so the same schemas in another order render otherwise.
    return json.dumps(tools) if tools else ""


def _common_prefix_length(sequences: list[list[int]]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        token = first[i]
        if any(s[i] != token for s in sequences[1:]):
            return i
    return n
