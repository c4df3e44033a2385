"""Processors: each source layout → the standard format; malformed rows name their field."""

from __future__ import annotations

import gzip
import json
import math
import textwrap

import pytest

from btrm.processors import (BUILTIN, BaseBradleyTerryTrainDataset, ProcessorError, RowDropped, RowError, load_processor,
                             validate_pair)
from btrm.processors.hh_rlhf import parse_transcript

PROMPT = [{"role": "user", "content": "How do I boil an egg?"}]
GOOD = {"role": "assistant", "content": "Put it in boiling water for 8 minutes."}
BAD = {"role": "assistant", "content": "Eggs are birds."}


def test_standard_passes_valid_pairs_through_and_accepts_json_strings():
    pair = load_processor("standard").pairs({"chosen": json.dumps(PROMPT + [GOOD]), "rejected": PROMPT + [BAD],
                                             "id": 7, "subset": "cooking"})
    assert pair == [{"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": None, "margin": None, "id": "7",
                     "source": "cooking"}]
    # Shards of one source may differ in columns: a null `source` (a column another shard has) is no source.
    [pair] = load_processor("standard").pairs({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD],
                                               "source": None, "subset": "cooking"})
    assert pair["source"] == "cooking"
    # ... nor is NaN, pandas' missing value: `json.dumps(df.to_dict("records"))` of subsets concatenated writes it.
    [pair] = load_processor("standard").pairs(json.loads(json.dumps(
        {"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "margin": math.nan, "tools": math.nan, "id": math.nan,
         "source": math.nan, "subset": "cooking"})))
    assert (pair["margin"], pair["tools"], pair["id"], pair["source"]) == (None, None, None, "cooking")


WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = {"role": "user", "content": "Is it raining in Paris?"}


def weather_call(arguments, **layout):
    return {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "get_weather", "arguments": arguments}}], **layout}


@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "Hi", "response_rejected": "x"}, "chosen", "missing (the row has ['prompt', 'response_rejected'])"),
    ({"chosen": "not json", "rejected": PROMPT + [BAD]}, "chosen", "not a JSON list"),
    ({"chosen": PROMPT + [{"role": "robot", "content": "x"}], "rejected": PROMPT + [BAD]}, "chosen[1].role", "unknown role"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": "  "}], "rejected": PROMPT + [BAD]}, "chosen[1].content", "empty"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": 3}], "rejected": PROMPT + [BAD]}, "chosen[1].content", "string"),
    ({"chosen": PROMPT, "rejected": PROMPT + [BAD]}, "chosen", "prompt and an answer"),
    ({"chosen": PROMPT + [GOOD, PROMPT[0]], "rejected": PROMPT + [BAD]}, "chosen[2].role", "end with an assistant"),
    ({"chosen": [{"role": "user", "content": "Other question?"}, GOOD], "rejected": PROMPT + [BAD]}, "rejected[0]",
     "share the same prompt"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "margin": -1}, "margin", ">= 0"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "margin": float("inf")}, "margin", "finite"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "margin": 1e39}, "margin", "float32"),  # (inf there)
    ({"chosen": [GOOD, GOOD], "rejected": [GOOD, BAD]}, "chosen", "no user message"),
    ({"chosen": PROMPT + [{"role": "assistant", "content": None}], "rejected": PROMPT + [BAD]}, "chosen[1].content", "string"),
    ({"chosen": [{**PROMPT[0], "tool_calls": [{"function": {"name": "f"}}]}, GOOD], "rejected": PROMPT + [BAD]},
     "chosen[0].tool_calls", "only an assistant"),
    ({"chosen": PROMPT + [{"role": "assistant", "tool_calls": [{"function": {"arguments": {}}}]}], "rejected": PROMPT + [BAD]},
     "chosen[1].tool_calls[0]", "'name'"),
    ({"chosen": PROMPT + [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{city"}}]}],
      "rejected": PROMPT + [BAD]}, "chosen[1].tool_calls[0].function.arguments", "not JSON"),
    ({"chosen": PROMPT + [{"role": "assistant", "tool_calls": []}], "rejected": PROMPT + [BAD]}, "chosen[1].content", "string"),
    ({"chosen": PROMPT + [weather_call('{"city": ' * 2000)], "rejected": PROMPT + [BAD]},
     "chosen[1].tool_calls[0].function.arguments", "not JSON"),
    ({"chosen": PROMPT + [weather_call('{"days": ' + "9" * 5000 + "}")], "rejected": PROMPT + [BAD]},
     "chosen[1].tool_calls[0].function.arguments", "not JSON"),
    ({"chosen": PROMPT + [weather_call({"city": "\ud800"})], "rejected": PROMPT + [BAD]},
     "chosen[1].tool_calls[0].function.arguments.city", "lone surrogate"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": [{"a": {"b": __import__("datetime").date(2026, 1, 1)}}]},
     "tools[0].a.b", "not JSON"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": [{1: "x"}]}, "tools[0]", "key that is not valid Unicode text"),
    ({"chosen": PROMPT + [weather_call({"\ud800": 1})], "rejected": PROMPT + [BAD]},
     "chosen[1].tool_calls[0].function.arguments", "key that is not valid Unicode text"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": [json.loads("[" * 40 + "]" * 40)]}, "tools", "nested deeper"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": "get_weather"}, "tools", "not a JSON list"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": [3]}, "tools[0]", "JSON schema object"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": [{"type": "function", "function": {"name": ["f"]}}]},
     "tools[0].function.name", "non-empty string"),
    ({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [BAD], "tools": [{"name": {"x": 1}}]}, "tools[0].name", "non-empty string"),
    ({"chosen": PROMPT + [dict(GOOD, audio={"id": "a1", "transcript": "Paris."})], "rejected": PROMPT + [BAD]},
     "chosen[1].audio", "transcript as content"),
    ({"chosen": PROMPT + [dict(GOOD, refusal="I can't say.")], "rejected": PROMPT + [BAD]}, "chosen[1].refusal", "not both"),
    ({"chosen": PROMPT + [dict(GOOD, content=[{"type": "image_url", "image_url": {"url": "x"}}])],
      "rejected": PROMPT + [BAD]}, "chosen[1].content[0]", "a part of type 'image_url' cannot be read by a text model: give text parts only"),
    ({"chosen": PROMPT + [dict(GOOD, content=[{"type": "text", "text": None}])], "rejected": PROMPT + [BAD]},
     "chosen[1].content[0].text", "string"),
    ({"chosen": [{"role": "user", "content": ""}, GOOD], "rejected": [{"role": "user", "content": ""}, BAD]},
     "chosen[0].content", "empty"),
    ({"chosen": PROMPT + [weather_call({}, function_call={"name": "get_weather", "arguments": "{}"})],
      "rejected": PROMPT + [BAD]}, "chosen[1].function_call", "not both"),
])
def test_standard_rejects_malformed_rows_naming_the_field(row, field, words):
    with pytest.raises(RowError) as error:
        load_processor("standard").pairs(row)
    assert error.value.field == field and words in str(error.value)


def test_a_tool_reply_may_be_empty_and_the_older_function_reply_is_one():
    """OpenAI's older API answers a function_call with a {"role": "function"} message; a tool may return nothing."""
    legacy_call = {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    legacy_reply = {"role": "function", "name": "get_weather", "content": "Rain, 12 C"}
    pair = validate_pair({"chosen": [ASK, legacy_call, legacy_reply, GOOD], "rejected": [ASK, legacy_call, legacy_reply, BAD]})
    assert pair["chosen"][1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert pair["chosen"][2] == {"role": "tool", "content": "Rain, 12 C", "name": "get_weather"}
    silent = {"role": "tool", "content": None, "tool_call_id": "call_1"}
    pair = validate_pair({"chosen": [ASK, weather_call({}), silent, GOOD], "rejected": [ASK, weather_call({}), silent, BAD]})
    assert pair["chosen"][2] == {"role": "tool", "content": "", "tool_call_id": "call_1"}


def test_text_content_parts_and_an_empty_system_prompt_are_read_as_chat_templates_render_them():
    """OpenAI's list of content parts (text only) is the text, joined by newlines; an empty system prompt, common
    in exports, is kept as it was given (a user or assistant turn must say something)."""
    system = {"role": "system", "content": ""}
    parts = {"role": "user", "content": [{"type": "text", "text": "How do I boil"}, {"type": "text", "text": "an egg?"}]}
    pair = validate_pair({"chosen": [system, parts, GOOD], "rejected": [system, parts, BAD]})
    assert pair["chosen"][:2] == [system, {"role": "user", "content": "How do I boil\nan egg?"}]


def test_identical_answers_are_dropped_not_invalid():
    with pytest.raises(RowDropped) as dropped:
        validate_pair({"chosen": PROMPT + [GOOD], "rejected": PROMPT + [dict(GOOD)]})
    assert dropped.value.reason == "identical"


def test_tool_use_is_normalised_to_what_chat_templates_expect():
    """OpenAI's layout (a null content, arguments as a JSON string, every key of a parquet struct present
    with nulls) becomes Hugging Face's: content "", arguments a mapping; tools parse from a JSON string."""
    openai_call = weather_call('{"city": "Paris"}', content=None, tool_call_id=None, name=None)
    tool_reply = {"role": "tool", "content": "Rain, 12 C", "tool_call_id": "call_1", "name": "get_weather", "tool_calls": None}
    row = {"chosen": [ASK, openai_call, tool_reply, {"role": "assistant", "content": "Yes: rain, 12 C."}],
           "rejected": [ASK, openai_call, tool_reply, {"role": "assistant", "content": "No idea."}],
           "tools": json.dumps(WEATHER)}
    [pair] = load_processor("standard").pairs(row)
    call = weather_call({"city": "Paris"}, content="")
    assert pair["chosen"][:3] == pair["rejected"][:3] == [
        ASK, call, {"role": "tool", "content": "Rain, 12 C", "tool_call_id": "call_1", "name": "get_weather"}]
    assert pair["tools"] == WEATHER
    # A tool call can be the answer judged; two calls differ by their arguments, not by their (empty) text.
    pair = validate_pair({"chosen": [ASK, call], "rejected": [ASK, weather_call({"city": "Lyon"})], "tools": WEATHER})
    assert pair["chosen"][-1] == call and pair["rejected"][-1]["tool_calls"][0]["function"]["arguments"] == {"city": "Lyon"}
    with pytest.raises(RowDropped, match="identical"):  # the same call, whatever its layout and random id
        validate_pair({"chosen": [ASK, call], "rejected": [ASK, dict(openai_call, tool_calls=[
            dict(openai_call["tool_calls"][0], id="call_9")])]})
    # "No tool calls" and "no tools", as exports write them; numpy arrays from a custom processor are plain JSON.
    for none in ("", "null"):  # (json.dumps(None) in a column of JSON strings)
        pair = validate_pair({"chosen": [ASK, dict(GOOD, tool_calls="null")], "rejected": [ASK, BAD], "tools": none})
        assert pair["chosen"][-1] == GOOD and pair["tools"] is None
    import numpy as np
    schema = {"type": "object", "required": np.array(["city"]), "properties": {"city": {"type": "string"}}}
    pair = validate_pair({"chosen": [ASK, GOOD], "rejected": [ASK, BAD], "tools": np.array([{"type": "function", "function": {
        "name": "get_weather", "parameters": schema}}])})
    assert pair["tools"][0]["function"]["parameters"]["required"] == ["city"]


def test_tools_and_arguments_read_alike_from_parquet_structs_and_json_lines(tmp_path):
    """A parquet struct column holds every key of any row: this row's schemas and arguments come back with the other
    row's properties and arguments as nulls, which a template's tojson would render (trained on, never served)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from btrm.sources import Fragment, read_fragment

    search = {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}}}}
    call = {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                  "function": {"name": "search", "arguments": {"query": "rain"}}}]}
    rows = [{"chosen": [ASK, weather_call({"city": "Paris"})], "rejected": [ASK, BAD], "tools": WEATHER},
            {"chosen": [ASK, call], "rejected": [ASK, BAD], "tools": [search]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "tools.parquet")
    [(_, read)] = read_fragment(Fragment(str(tmp_path / "tools.parquet"), "parquet", row_groups=(0,), num_rows=2), 10)
    assert read[1]["tools"][0]["function"]["parameters"]["properties"]["city"] is None  # (what Arrow gives)
    standard = load_processor("standard")
    assert [standard.pairs(row) for row in read] == [standard.pairs(row) for row in rows]


def test_openai_response_messages_train_as_they_came():
    """A message as OpenAI's API returns it (every key present, most null): a refusal is the content, the
    older function_call a tool call, annotations change nothing."""
    def response(**keys):
        return {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
                "function_call": None, "tool_calls": None, **keys}

    pair = validate_pair({"chosen": [ASK, response(content="Yes, light rain.", annotations=[{"type": "url_citation"}])],
                          "rejected": [ASK, response(refusal="I can't check the weather.")]})
    assert pair["chosen"][-1] == {"role": "assistant", "content": "Yes, light rain."}
    assert pair["rejected"][-1] == {"role": "assistant", "content": "I can't check the weather."}
    legacy = response(function_call={"name": "get_weather", "arguments": '{"city": "Paris"}'})
    with pytest.raises(RowDropped, match="identical"):  # the same call as tool_calls makes
        validate_pair({"chosen": [ASK, legacy], "rejected": [ASK, weather_call({"city": "Paris"})]})


def rm_gallery_row(chosen_first=True, labels=(True, False)):
    """RM-Gallery's DataSample as it serialises: each DataOutput's answer is a Step, which holds the label."""
    outputs = [{"answer": {**answer, "label": {"is_preferred": label}, "reward": None}, "steps": None}
               for answer, label in zip((GOOD, BAD), labels)]
    return {"input": PROMPT, "output": outputs if chosen_first else outputs[::-1], "id": "r1"}


def test_helpsteer3_rm_gallery_layout():
    helpsteer3 = load_processor("helpsteer3")
    for chosen_first in (True, False):
        [pair] = helpsteer3.pairs(rm_gallery_row(chosen_first))
        assert pair["chosen"] == PROMPT + [GOOD] and pair["rejected"] == PROMPT + [BAD] and pair["id"] == "r1"
    # The label beside the answer, and input and output as JSON strings (RM-Gallery's loader takes both).
    beside = {"input": PROMPT, "output": [{"answer": BAD, "label": {"is_preferred": False}},
                                          {"answer": GOOD, "label": {"is_preferred": True}}]}
    # (an RM-Gallery Step dumped with its default label, {}, does not hide the one beside it)
    beside_an_empty_one = {"input": PROMPT, "output": [{"answer": {**BAD, "label": {}}, "label": {"is_preferred": False}},
                                                       {"answer": {**GOOD, "label": {}}, "label": {"is_preferred": True}}]}
    as_strings = {key: json.dumps(value) for key, value in rm_gallery_row(False).items()}
    for row in (beside, beside_an_empty_one, as_strings):
        [pair] = helpsteer3.pairs(row)
        assert pair["chosen"] == PROMPT + [GOOD] and pair["rejected"] == PROMPT + [BAD]
    with pytest.raises(RowDropped, match="tie"):
        helpsteer3.pairs(rm_gallery_row(labels=(True, True)))
    with pytest.raises(RowDropped, match="tie"):
        helpsteer3.pairs(rm_gallery_row(labels=(False, False)))
    with pytest.raises(RowDropped, match="missing_label"):
        helpsteer3.pairs(rm_gallery_row(labels=(True, None)))
    with pytest.raises(RowError, match="must be true or false, got 'false'") as error:  # not read as preferred
        helpsteer3.pairs(rm_gallery_row(labels=("false", "true")))
    assert error.value.field == "output[0].answer.label.is_preferred"
    with pytest.raises(RowError, match=r"missing \(output\[1\] has \['answr', 'label'\]\)") as error:
        helpsteer3.pairs({"input": PROMPT, "output": [beside["output"][0], {"answr": GOOD, "label": {"is_preferred": True}}]})
    assert error.value.field == "output[1].answer"
    assert helpsteer3.pairs({**rm_gallery_row(), "id": None, "unique_id": "u1"})[0]["id"] == "u1"
    # A prompt ending on an assistant turn is named where the row holds it, not as the pair's chosen[N].
    with pytest.raises(RowError, match="it must end with a user or tool turn, not 'assistant'") as error:
        helpsteer3.pairs({**rm_gallery_row(), "input": PROMPT + [GOOD]})
    assert error.value.field == f"input[{len(PROMPT)}].role"
    with pytest.raises(RowError, match="holds no message") as error:
        helpsteer3.pairs({**rm_gallery_row(), "input": []})
    assert error.value.field == "input"
    # A file holding both layouts' columns (null where a row has none): a row's missing field is named by its own
    # layout, told by what it does have.
    native_columns = dict.fromkeys(("context", "response1", "response2", "overall_preference"))
    with pytest.raises(RowError, match="missing") as error:
        helpsteer3.pairs({**rm_gallery_row(), **native_columns, "output": None})
    assert error.value.field == "output"
    # NaN, pandas' missing value, as JSON written from a DataFrame of both layouts holds it: not the row's layout.
    native = {"input": float("nan"), "output": float("nan"), "context": PROMPT, "response1": GOOD["content"],
              "response2": BAD["content"], "overall_preference": -2}
    [pair] = helpsteer3.pairs(native)
    assert pair["chosen"] == PROMPT + [GOOD] and pair["margin"] == 2


def test_helpsteer3_rows_of_several_answers():
    """Every preferred answer against every other one; a malformed answer costs the pairs it is in, not the row's
    others; a tie is a row whose answers are all preferred or all not."""
    helpsteer3 = load_processor("helpsteer3")
    third = {"role": "assistant", "content": "Nine."}

    def row(*answers):
        return {"input": PROMPT, "id": "r1", "output": [{"answer": {**answer, "label": {"is_preferred": preferred}}}
                                                         for answer, preferred in answers]}

    pairs = helpsteer3.pairs(row((GOOD, True), (BAD, False), (third, False)))
    assert [(p["chosen"][-1], p["rejected"][-1], p["id"]) for p in pairs] == [(GOOD, BAD, "r1/0"), (GOOD, third, "r1/1")]
    # Two preferred over one: two real preferences, not a tie (which is not counted against --max_drop_fraction).
    pairs = helpsteer3.pairs(row((GOOD, True), (third, True), (BAD, False)))
    assert [(p["chosen"][-1], p["rejected"][-1]) for p in pairs] == [(GOOD, BAD), (third, BAD)]
    for blank in ({"role": "assistant", "content": ""}, {"role": "assistant", "content": None}):
        good, broken = helpsteer3.pairs(row((GOOD, True), (BAD, False), (blank, False)))
        assert (good["chosen"][-1], good["rejected"][-1]) == (GOOD, BAD)
        assert isinstance(broken, RowError) and broken.field == "output[2].answer.content"
    with pytest.raises(RowError) as error:  # the row's only pair
        helpsteer3.pairs(row((GOOD, True), ({"role": "assistant", "content": ""}, False)))
    assert error.value.field == "output[1].answer.content"


def test_helpsteer3_native_layout_direction_margin_ties():
    helpsteer3 = load_processor("helpsteer3")
    row = {"context": PROMPT, "response1": GOOD["content"], "response2": BAD["content"], "domain": "general"}
    [pair] = helpsteer3.pairs({**row, "overall_preference": -2})  # negative: response1 is better
    assert pair["chosen"][-1] == GOOD and pair["rejected"][-1] == BAD and pair["margin"] == 2 and pair["source"] == "general"
    [pair] = helpsteer3.pairs({**row, "overall_preference": 3})
    assert pair["chosen"][-1] == BAD and pair["margin"] == 3
    with pytest.raises(RowDropped, match="tie"):
        helpsteer3.pairs({**row, "overall_preference": 0})
    for missing in (None, float("nan")):  # NaN: pandas' missing value
        with pytest.raises(RowDropped, match="missing_label"):
            helpsteer3.pairs({**row, "overall_preference": missing})
    # A bad response is named as the row names it, whichever side the preference puts it on.
    for preference, fields in ((-1, ("response1", "response2")), (1, ("response2", "response1"))):
        for field, value, words in ((fields[0], "", "empty"), (fields[1], 3, "must be a string")):
            with pytest.raises(RowError, match=words) as error:
                helpsteer3.pairs({**row, "overall_preference": preference, field: value})
            assert error.value.field == f"{field}.content"
    with pytest.raises(RowError, match="-3..3"):
        helpsteer3.pairs({**row, "overall_preference": 5})
    assert helpsteer3.pairs({**row, "overall_preference": 2.0})[0]["margin"] == 2  # parquet may store them as floats
    with pytest.raises(RowError, match="must end with a user or tool turn") as error:
        helpsteer3.pairs({**row, "overall_preference": 1, "context": PROMPT + [BAD]})
    assert error.value.field == f"context[{len(PROMPT)}].role"
    for fraction in (-0.5, 1.7, "1", True):  # no silent tie, no silent rounding
        with pytest.raises(RowError, match="must be an integer in -3..3"):
            helpsteer3.pairs({**row, "overall_preference": fraction})


def test_hh_rlhf_transcripts_become_messages(shared_data):
    with gzip.open(shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as f:
        rows = [json.loads(next(f)) for _ in range(50)]
    hh = load_processor("hh_rlhf")
    converted = 0
    for row in rows:
        try:
            [pair] = hh.pairs(row)
        except RowDropped:
            continue
        converted += 1
        assert pair["chosen"][:-1] == pair["rejected"][:-1]
        assert [m["role"] for m in pair["chosen"]][:2] == ["user", "assistant"]
        assert pair["chosen"][-1]["role"] == "assistant"
        assert row["chosen"].rstrip().endswith(pair["chosen"][-1]["content"])
    assert converted >= 45
    assert parse_transcript("\n\nHuman: hi\n\nAssistant: hello", "chosen") == [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with pytest.raises(RowError, match="must start with"):
        parse_transcript("Assistant: hello", "chosen")
    # A marker followed by a line break, not a space, still starts a turn (else the answer joins the user's turn).
    assert parse_transcript("\n\nHuman: hi\n\nAssistant:\nHello!\n\nHuman: thanks\n\nAssistant: Welcome.",
                            "chosen") == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                                          {"role": "user", "content": "thanks"},
                                          {"role": "assistant", "content": "Welcome."}]


def test_custom_processor_from_file(tmp_path):
    path = tmp_path / "my_data.py"
    path.write_text(textwrap.dedent('''
        from btrm.processors import BaseBradleyTerryTrainDataset

        class Helper:
            pass

        class QAPairs(BaseBradleyTerryTrainDataset):
            def convert(self, row):
                prompt = [{"role": "user", "content": row["q"]}]
                return {"chosen": prompt + [{"role": "assistant", "content": row["good"]}],
                        "rejected": prompt + [{"role": "assistant", "content": row["bad"]}]}
    '''))
    processor = load_processor("QAPairs", str(path))
    assert isinstance(processor, BaseBradleyTerryTrainDataset)
    assert processor.pairs({"q": "2+2?", "good": "4", "bad": "5"})[0]["chosen"][-1]["content"] == "4"
    with pytest.raises(ProcessorError, match=r"defines no such class; it defines \['Helper', 'QAPairs'\]"):
        load_processor("Missing", str(path))
    with pytest.raises(ProcessorError, match=r"must subclass .*subclasses defined there: \['QAPairs'\]"):
        load_processor("Helper", str(path))
    with pytest.raises(ProcessorError, match="no such file"):
        load_processor("QAPairs", str(tmp_path / "absent.py"))
    broken = tmp_path / "broken.py"
    broken.write_text("import not_a_module_anywhere\n")
    with pytest.raises(ProcessorError, match="importing it failed: ModuleNotFoundError"):
        load_processor("X", str(broken))
    with pytest.raises(ProcessorError, match="unknown dataset processor"):
        load_processor("nope")
    assert set(BUILTIN) == {"standard", "helpsteer3", "hh_rlhf"}
