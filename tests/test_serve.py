"""The scoring service: a real Serve application on 127.0.0.1 with a tiny Qwen3 reward model trained and
exported by the real training code, reached by real HTTP requests."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from btrm.config import typed_values
from btrm.scoring import length_buckets
from btrm.serving import ServeCommand, ServiceOptions, app_builder, build_app, read_token, sigmoid
from conftest import free_port, headless_export, scoring_service

REPO = Path(__file__).resolve().parents[1]
TOKEN = "test-token-7f3a"
APP = "btrm-test"
# Small limits, so that requests over them are cheap to build.
LIMITS = dict(max_candidates=8, max_pairs=32, max_batch_sequences=64, max_body_bytes=1024 * 1024,
              max_request_chars=64 * 1024, max_tools=4)


@pytest.fixture(scope="module")
def service(ray_session, trained_model_dir, tmp_path_factory):
    with scoring_service(trained_model_dir, tmp_path_factory.mktemp("secrets"), TOKEN, APP, **LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def eval_pairs(trained_model_dir, hh_helpful) -> list[tuple[dict, dict]]:
    """(pair, the rewards the trained engine gave it in training's final evaluation), for every eval pair."""
    pairs = {p["id"]: p for p in hh_helpful["test"]}
    rows = pq.read_table(trained_model_dir / "eval_rewards.parquet").to_pylist()
    return [(pairs[row["id"]], row) for row in rows]


def _compare_body(pair: dict) -> dict:
    return {"id": pair["id"], "messages": pair["chosen"][:-1], "chosen": pair["chosen"][-1]["content"],
            "rejected": pair["rejected"][-1]["content"]}


def _compare_all(client: httpx.Client, pairs: list[dict], per_request: int) -> list[dict]:
    results = []
    for start in range(0, len(pairs), per_request):
        response = client.post("/compare", json={"pairs": [_compare_body(p) for p in pairs[start : start + per_request]]})
        assert response.status_code == 200, response.text
        results.extend(response.json()["results"])
    return results


# ----------------------------------------------------------------------------------------------
# Scores


def test_scores_equal_the_trained_engine_and_the_scorer(service, eval_pairs, trained_model_dir):
    """Every eval pair: the service's rewards are those the training engine computed for it (exported in
    eval_rewards.parquet) and those of RewardScorer; P(chosen better) is the sigmoid of the margin."""
    from btrm.scoring import RewardScorer

    with service.client() as client:
        results = _compare_all(client, [pair for pair, _ in eval_pairs], service.options.max_pairs)
    scorer = RewardScorer(str(trained_model_dir), device="cpu")
    assert len(results) == len(eval_pairs) > 80
    assert any(r["truncated"] for r in results)  # pairs over max_length 256 follow the manifest's policy
    for result, (pair, engine) in zip(results, eval_pairs):
        assert result["id"] == pair["id"]
        assert result["reward_chosen"] == pytest.approx(engine["reward_chosen"], abs=1e-4)
        assert result["reward_rejected"] == pytest.approx(engine["reward_rejected"], abs=1e-4)
        assert result["margin"] == pytest.approx(result["reward_chosen"] - result["reward_rejected"], abs=1e-9)
        assert result["p_chosen_better"] == pytest.approx(1 / (1 + math.exp(-result["margin"])), abs=1e-12)
        (chosen, rejected), encoded = scorer.score_group([pair["chosen"], pair["rejected"]])
        assert [result["reward_chosen"], result["reward_rejected"]] == pytest.approx([chosen, rejected], abs=1e-4)
        assert result["truncated_prompt_tokens"] == encoded.truncated


def test_bfloat16_scoring_ranks_as_float32_does(trained_model_dir, eval_pairs):
    """--dtype bfloat16 (auto's choice on GPUs) loads bfloat16 weights and computes packed rewards close to
    float32's; auto stays float32 on CPUs."""
    import torch

    from btrm.scoring import RewardScorer

    full = RewardScorer(str(trained_model_dir), device="cpu")
    half = RewardScorer(str(trained_model_dir), device="cpu", dtype="bfloat16")
    assert full.dtype == next(full.model.parameters()).dtype == torch.float32
    assert half.dtype == next(half.model.parameters()).dtype == torch.bfloat16
    groups = [full.encoder.encode_group([pair["chosen"], pair["rejected"]]) for pair, _ in eval_pairs[:32]]
    exact, approx = full.group_rewards(groups), half.group_rewards(groups)
    assert [r for g in approx for r in g] == pytest.approx([r for g in exact for r in g], abs=0.1)
    margins = [(a - b, c - d) for (a, b), (c, d) in zip(exact, approx) if abs(a - b) > 0.1]
    assert margins and all((x > 0) == (y > 0) for x, y in margins)
    # The score head reads the bfloat16 hidden state in float32: rewards off bfloat16's coarse grid (2^-8 of
    # their size), where close answers would tie.
    assert half.model.score.weight.dtype == torch.float32
    off_grid = [r for g in approx for r in g if torch.tensor(r).bfloat16().item() != r]
    assert len(off_grid) > 0.9 * 2 * len(groups)


def test_the_head_scored_in_float32_is_the_output_layer_of_decoders_and_encoders(tiny_qwen_dir):
    """What bfloat16 scoring keeps in float32 (above): a decoder's `score`, and an encoder's own head too (the
    quickstart's MiniLM is a BERT: its rewards would sit on bfloat16's grid)."""
    from transformers import (AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification,
                              RobertaConfig, RobertaForSequenceClassification)

    from btrm.model import reward_head

    small = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                 num_labels=1)
    bert = BertForSequenceClassification(BertConfig(**small))
    roberta = RobertaForSequenceClassification(RobertaConfig(**small))
    qwen = AutoModelForSequenceClassification.from_pretrained(tiny_qwen_dir)
    assert (reward_head(bert), reward_head(roberta), reward_head(qwen)) == (bert.classifier, roberta.classifier.out_proj,
                                                                            qwen.score)


def test_identical_candidates_tie_exactly_and_keep_request_order(service):
    # A policy sampling N answers often repeats one; packed side by side, each copy would differ in the last bits.
    candidates = ["Paris.", "It is Lyon.", "Paris.", "Marseille, of course.", "Paris."]
    with service.client() as client:
        response = client.post("/score", json={"prompt": "What is the capital of France?", "candidates": candidates})
    assert response.status_code == 200, response.text
    rewards, ranking = response.json()["rewards"], response.json()["ranking"]
    assert rewards[0] == rewards[2] == rewards[4] and len(set(rewards)) == 3
    copies = [k for k in ranking if candidates[k] == "Paris."]
    assert copies == [0, 2, 4] and ranking.index(4) - ranking.index(0) == 2  # adjacent, in request order


def test_single_and_concurrent_requests_agree_with_batches(service, eval_pairs):
    """Requests sent one by one and 24 at once (batched together by the replica) get the batch's scores."""
    pairs = [pair for pair, _ in eval_pairs[:24]]
    with service.client() as client:
        batch = _compare_all(client, pairs, len(pairs))
        single = client.post("/compare", json=_compare_body(pairs[0]))
    assert single.status_code == 200, single.text
    assert single.json() == pytest.approx(batch[0], abs=1e-4)

    async def concurrently() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=60) as client:
            return await asyncio.gather(*(client.post("/compare", json=_compare_body(p)) for p in pairs))

    responses = asyncio.run(concurrently())
    assert [r.status_code for r in responses] == [200] * len(pairs)
    for response, expected in zip(responses, batch):
        assert response.json() == pytest.approx(expected, abs=1e-4)


def test_score_ranks_candidates_like_compare(service):
    prompt = "How do I keep basil fresh after buying it?"
    candidates = ["Trim the stems and keep it in a glass of water on the counter, loosely covered.",
                  "no idea", "Put it in the freezer in a plastic bag right away, leaves and all."]
    with service.client() as client:
        scored = client.post("/score", json={"prompt": prompt, "candidates": candidates})
        as_messages = client.post("/score", json={"messages": [{"role": "user", "content": prompt}],
                                                  "candidates": candidates, "id": "basil-7"})
        pair = client.post("/compare", json={"prompt": prompt, "chosen": candidates[0], "rejected": candidates[1]})
    assert scored.status_code == 200, scored.text
    body = scored.json()
    assert as_messages.json() == {**body, "id": "basil-7"}  # a prompt string is one user turn; the id echoed
    assert body["id"] is None
    rewards = body["rewards"]
    assert body["ranking"] == sorted(range(3), key=lambda k: -rewards[k]) and body["truncated"] is False
    assert [pair.json()["reward_chosen"], pair.json()["reward_rejected"]] == pytest.approx(rewards[:2], abs=1e-4)


SEARCH = [{"type": "function", "function": {"name": "search", "description": "Search the web", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]


def search_call(arguments, **layout) -> dict:
    return {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                 "function": {"name": "search", "arguments": arguments}}], **layout}


def test_tool_use_is_scored_as_training_tokenizes_it(service, trained_model_dir):
    """An agent's transcript in OpenAI's layout (null content, arguments as a JSON string) with the tools it
    offers: rewards equal the scorer's on the normalised conversations (the data path's), answers may be
    tool calls, and the same call in any layout (OpenAI's, Hugging Face's, flat) is the same answer."""
    from btrm.scoring import RewardScorer

    ask = {"role": "user", "content": "Who won the 1998 World Cup?"}
    messages = [ask, search_call('{"query": "1998 World Cup winner"}', content=None),
                {"role": "tool", "content": "France beat Brazil 3-0 in the final.", "tool_call_id": "call_1"}]
    answers = ["France won it, beating Brazil 3-0.", "Brazil won it."]
    followup = search_call({"query": "1998 World Cup final score"})
    flat = {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "name": "search",
                                                  "arguments": '{"query": "1998 World Cup final score"}'}]}
    candidates = [answers[0], followup, search_call('{"query": "1998 World Cup final score"}', content=None), flat]
    with service.client() as client:
        pair = client.post("/compare", json={"messages": messages, "tools": SEARCH, "chosen": answers[0], "rejected": answers[1]})
        scored = client.post("/score", json={"messages": messages, "tools": SEARCH, "candidates": candidates})
        untooled = client.post("/score", json={"messages": messages, "candidates": candidates})
    assert pair.status_code == scored.status_code == untooled.status_code == 200, (pair.text, scored.text, untooled.text)
    normalised = [ask, search_call({"query": "1998 World Cup winner"}, content=""), messages[2]]
    scorer = RewardScorer(str(trained_model_dir), device="cpu")
    expected, _ = scorer.score_group([normalised + [{"role": "assistant", "content": a}] for a in answers], SEARCH)
    assert [pair.json()["reward_chosen"], pair.json()["reward_rejected"]] == pytest.approx(expected, abs=1e-4)
    expected, _ = scorer.score_group([normalised + [{"role": "assistant", "content": answers[0]}],
                                      normalised + [dict(followup, content="")]], SEARCH)
    rewards = scored.json()["rewards"]
    assert rewards[:2] == pytest.approx(expected, abs=1e-4) and rewards[1] == rewards[2] == rewards[3]
    assert untooled.json()["rewards"] != pytest.approx(rewards, abs=1e-4)  # the offered tools are part of the prompt
    # max_tools (4 here) bounds one conversation's tool names, not all the candidates' together.
    calling = [{"role": "assistant", "tool_calls": [{"name": f"{who}{k}", "arguments": {}} for k in range(3)]}
               for who in "ab"]
    with service.client() as client:
        assert client.post("/score", json={"prompt": "hi", "candidates": calling}).status_code == 200


def test_messages_from_an_openai_response_score_as_they_came(service):
    """A chat completion's message posted as it came (refusal, annotations, audio, function_call keys, most
    null) and tools as a JSON string score as their plain forms do; the data path reads them alike."""
    def response(**keys):
        return {"role": "assistant", "content": None, "refusal": None, "annotations": [], "audio": None,
                "function_call": None, "tool_calls": None, **keys}

    ask = {"role": "user", "content": "Who won the 1998 World Cup?"}
    legacy_call = response(function_call={"name": "search", "arguments": '{"query": "1998 World Cup"}'})
    as_sent = [response(content="France."), response(refusal="I can't help with that."), legacy_call]
    plain = ["France.", "I can't help with that.", search_call({"query": "1998 World Cup"})]
    with service.client() as client:
        sent = client.post("/score", json={"messages": [ask], "tools": json.dumps(SEARCH), "candidates": as_sent})
        expected = client.post("/score", json={"messages": [ask], "tools": SEARCH, "candidates": plain})
        audio = client.post("/score", json={"messages": [ask], "candidates": [response(audio={"id": "a1"})]})
        # The legacy call's result, role "function" (training reads it as a tool message): scored as one.
        result = {"name": "search", "content": "France beat Brazil 3-0 in the final."}
        function, tool = (client.post("/score", json={"messages": [ask, legacy_call, {"role": role, **result}],
                                                      "candidates": ["France."]}) for role in ("function", "tool"))
        # Content as OpenAI's text parts is their text, joined by newlines (as training reads it).
        parts = {"role": "user", "content": [{"type": "text", "text": "Who won the"}, {"type": "text", "text": "1998 World Cup?"}]}
        as_parts, as_text = (client.post("/score", json={"messages": [message], "candidates": ["France."]})
                             for message in (parts, {"role": "user", "content": "Who won the\n1998 World Cup?"}))
        image = client.post("/score", json={"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}],
                                            "candidates": ["France."]})
    assert sent.status_code == expected.status_code == 200, (sent.text, expected.text)
    assert sent.json()["rewards"] == pytest.approx(expected.json()["rewards"], abs=1e-5)
    assert function.status_code == tool.status_code == 200, (function.text, tool.text)
    assert function.json()["rewards"] == pytest.approx(tool.json()["rewards"], abs=1e-5)
    assert audio.status_code == 422 and "transcript as content" in audio.text
    assert as_parts.status_code == as_text.status_code == 200, (as_parts.text, as_text.text)
    assert as_parts.json()["rewards"] == as_text.json()["rewards"]
    assert image.status_code == 422 and '"loc":["body","messages",0,"content",0,"type"]' in image.text, image.text


def test_overlong_prompt_is_cut_and_flagged(service, trained_model_dir):
    from btrm.scoring import RewardScorer

    messages = [{"role": "user", "content": "Tell me about the history of bread. " * 60}]
    with service.client() as client:
        response = client.post("/score", json={"messages": messages, "candidates": ["Bread is old.", "Yeast."]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["truncated"] is True and body["truncated_prompt_tokens"] > 100
    conversations = [messages + [{"role": "assistant", "content": a}] for a in ("Bread is old.", "Yeast.")]
    rewards, encoded = RewardScorer(str(trained_model_dir), device="cpu").score_group(conversations)
    assert body["rewards"] == pytest.approx(rewards, abs=1e-4)
    assert body["truncated_prompt_tokens"] == encoded.truncated


# ----------------------------------------------------------------------------------------------
# Bad requests: 4xx naming what is wrong, never a 500

GOOD_PAIR = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}


def _nested(levels: int, inner: Any) -> Any:
    return inner if levels == 0 else {"a": _nested(levels - 1, inner)}


# A deep tool schema: 1.4k characters of compact JSON, 49k as Llama 3's template renders it (`tojson(indent=4)`).
DEEP_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": _nested(24, [1] * 400)}}]

BAD_REQUESTS = [
    # (path, body, status, text the error must contain)
    ("/compare", {"prompt": "hi", "chosen": "hello"}, 422, '"loc":["body","rejected"]'),
    ("/compare", {**GOOD_PAIR, "messages": [{"role": "user", "content": "hi"}]}, 422, "exactly one of 'prompt'"),
    ("/compare", {"chosen": "a", "rejected": "b"}, 422, "exactly one of 'prompt'"),
    ("/compare", {**GOOD_PAIR, "chosen": "   "}, 422, "chosen"),
    ("/compare", {**GOOD_PAIR, "rejected": 7}, 422, "rejected"),
    ("/compare", {**GOOD_PAIR, "chosne": "typo"}, 422, "chosne"),
    ("/compare", {"messages": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}, 422, "role"),
    ("/compare", {"messages": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}, 422, "content"),
    ("/compare", {"messages": [], "chosen": "a", "rejected": "b"}, 422, "messages"),
    ("/compare", {"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}],
                  "chosen": "a", "rejected": "b"}, 422, "messages[1].role"),
    ("/compare", {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                  "chosen": "a", "rejected": "b"}, 422, "must follow a user or tool turn"),
    ("/compare", {"pairs": [GOOD_PAIR, {**GOOD_PAIR, "prompt": ""}]}, 422, '"pairs",1,"prompt"'),
    ("/compare", {"pairs": []}, 422, "pairs"),
    ("/compare", {"pairs": [GOOD_PAIR] * 33}, 413, "max_pairs=32"),
    ("/compare", {"prompt": "hi", "chosen": "word " * 300, "rejected": "b"}, 413,
     "the pair's chosen answer: too long for the model's max_length=256 tokens (overlong policy 'truncate_prompt'): "
     "the answers with their shared opening take"),
    ("/compare", {"pairs": [GOOD_PAIR, {**GOOD_PAIR, "rejected": "word " * 300}]}, 413, "pair 1's rejected answer: too long"),
    ("/score", {"prompt": "hi", "candidates": []}, 422, "candidates"),
    ("/score", {"prompt": "hi", "candidates": "one answer"}, 422, "candidates"),
    ("/score", {"prompt": "hi", "candidates": ["a"] * 9}, 413, "max_candidates=8"),
    ("/score", {"prompt": "hi", "candidates": ["a", "word " * 300, "b", "word " * 400]}, 413,
     "candidate 1, candidate 3: too long"),
    # A long prompt is templated once per answer: 11,000 characters x 8 candidates, x 4 pairs x 2 answers.
    ("/score", {"prompt": "many words " * 1000, "candidates": ["a"] * 8}, 413, "max_request_chars=65536"),
    ("/compare", {"pairs": [{**GOOD_PAIR, "prompt": "many words " * 1000}] * 4}, 413, "max_request_chars=65536"),
    ("/score", [1, 2], 422, "valid dictionary"),
    # Tool use
    ("/compare", {**GOOD_PAIR, "chosen": {"role": "user", "content": "hello"}}, 422, "an answer is an assistant message"),
    ("/compare", {**GOOD_PAIR, "rejected": {"role": "assistant", "content": " "}}, 422, "is empty"),
    ("/score", {"prompt": "hi", "candidates": [search_call("{query")]}, 422, "not JSON"),
    ("/score", {"prompt": "hi", "candidates": [search_call('{"query": ' + "[" * 3000)]}, 422, "not JSON"),
    ("/compare", {**GOOD_PAIR, "chosen": {"role": "assistant", "tool_calls": [{"function": {"name": ""}}]}}, 422,
     '"body","chosen","tool_calls",0,"function","name"'),
    ("/compare", {**GOOD_PAIR, "chosen": {"role": "assistant", "tool_calls": [{"name": "", "arguments": {}}]}}, 422,
     '"body","chosen","tool_calls",0,"name"'),
    ("/compare", {"pairs": [GOOD_PAIR, {**GOOD_PAIR, "chosen": {"role": "assistant", "tool_calls": [{"name": "s"}],
                                                                 "extra": 1}}]}, 422, '"body","pairs",1,"chosen","extra"'),
    ("/compare", {"messages": [{"role": "user", "content": "hi", "tool_calls": search_call({})["tool_calls"]}],
                  "chosen": "a", "rejected": "b"}, 422, "only an assistant message calls tools"),
    # Checking that the template renders every tool name grows with their square: a few thousand took minutes.
    ("/score", {"prompt": "hi", "tools": [{"type": "function", "function": {"name": f"t{i}"}} for i in range(5)],
                "candidates": ["a"]}, 413, "5 tool names offered or called in one conversation; the limit is max_tools=4"),
    ("/compare", {**GOOD_PAIR, "tools": SEARCH * 4, "chosen": {"role": "assistant", "tool_calls": [
        {"name": f"t{i}"} for i in range(4)]}}, 413, "max_tools=4"),
    ("/compare", {**GOOD_PAIR, "tools": ["search"]}, 422, '"loc":["body","tools",0]'),
    ("/compare", {**GOOD_PAIR, "rejected": {"role": "assistant", "tool_calls": [{"name": "s", "arguments": 5}]}}, 422,
     '"loc":["body","rejected","tool_calls",0,"arguments"]'),
    ("/compare", {**GOOD_PAIR, "tools": [{"deep": json.loads("[" * 40 + "]" * 40)}]}, 422, "nested deeper than 32"),
    ("/compare", {**GOOD_PAIR, "tools": '[{"\\ud800": 1}]'}, 422, "key that is not valid Unicode text"),
    ("/compare", {**GOOD_PAIR, "tools": "[" * 5000 + "]" * 5000}, 422, "field 'tools': is a string that is not a JSON"),
    # Misspelt fields named like the request's union tags stay in the loc.
    ("/score", {"prompt": "hi", "candidates": [{"role": "assistant", "text": "a"}]}, 422,
     '"loc":["body","candidates",0,"text"]'),
    ("/compare", {**GOOD_PAIR, "message": "hi"}, 422, '"loc":["body","message"]'),
    ("/compare", {"pairs": [{**GOOD_PAIR, "batch": 1}]}, 422, '"loc":["body","pairs",0,"batch"]'),
    # A content of the wrong type: each branch of its union named by the field alone.
    ("/score", {"messages": [{"role": "user", "content": 5}], "candidates": ["a"]}, 422,
     '"loc":["body","messages",0,"content"],"msg":"Input should be a valid string"'),
]


@pytest.mark.parametrize("path, body, status, expected", BAD_REQUESTS,
                         ids=[f"{path}-{status}-{i}" for i, (path, _, status, _) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_a_4xx_naming_the_problem(service, path, body, status, expected):
    with service.client() as client:
        response = client.post(path, json=body)
    assert response.status_code == status, response.text
    assert expected in response.text


def test_tools_count_toward_max_request_chars_as_the_template_renders_them(qwen_tokenizer_dir):
    """A template that indents the tools' JSON (Llama 3's `tojson(indent=4)`) renders a deep schema many times
    its compact size: counted so, or a small request would make the replica tokenize megabytes. A template
    that renders them compact (Qwen3's) is not charged for indentation it never renders."""
    from transformers import AutoTokenizer

    from btrm.serving import _chars, tools_indent

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    indenting = "{% for t in tools %}{{ t | tojson(indent=4) }}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    prompt = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(prompt, tools=DEEP_TOOLS, chat_template=indenting, tokenize=False)
    assert tools_indent(indenting) == 4 and tools_indent(tokenizer.chat_template) is None
    assert _chars((prompt, DEEP_TOOLS), tools_indent(indenting)) >= len(rendered) > 30 * len(json.dumps(DEEP_TOOLS))
    qwen_rendered = tokenizer.apply_chat_template(prompt, tools=DEEP_TOOLS, tokenize=False)
    assert _chars((prompt, DEEP_TOOLS)) < len(qwen_rendered)  # (the template's own text besides)


def test_malformed_and_oversized_bodies(service):
    limit = service.options.max_body_bytes
    with service.client() as client:
        not_json = client.post("/compare", content=b"{not json", headers={"content-type": "application/json"})
        declared = client.post("/score", content=b" " * (limit + 1), headers={"content-type": "application/json"})
        # A chunked body declares no length: it is counted as it arrives.
        chunked = client.post("/score", content=iter([b" " * 65536] * (limit // 65536 + 1)),
                              headers={"content-type": "application/json"})
    assert not_json.status_code == 422 and "JSON" in not_json.text
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert f"max_body_bytes={limit}" in response.json()["detail"]
    # Under every list's limit and the body's, but ~48k JSON values for validation to walk, one by one, on the
    # HTTP replica's event loop (~10 us each; /health waits): refused by their count before any is validated.
    calls = {"role": "assistant", "content": "", "tool_calls": [{"name": "f"}] * 3000}
    with service.client() as client:
        crowded = client.post("/score", json={"prompt": "hi", "candidates": [calls] * 8})
    assert crowded.status_code == 413 and "JSON values" in crowded.json()["detail"], crowded.text
    # So are the values of JSON held in a string: validation parses tools and tool calls' arguments, and walks them.
    arguments = {"role": "assistant", "tool_calls": [{"name": "f", "arguments": json.dumps({"k": [{}] * 70000})}]}
    with service.client() as client:
        crowded = client.post("/score", json={"prompt": "hi", "candidates": [arguments]})
    assert crowded.status_code == 413 and "JSON values" in crowded.json()["detail"], crowded.text


# ----------------------------------------------------------------------------------------------
# Access


def test_token_guards_every_route_but_health(service):
    with service.client(token=None) as anonymous:
        assert anonymous.get("/health").json() == {"status": "ok"}
        assert anonymous.head("/health").status_code == 200  # (load balancers and uptime monitors probe with HEAD)
        for method, path in (("GET", "/info"), ("POST", "/compare"), ("POST", "/score"), ("GET", "/openapi.json"),
                             ("GET", "/docs")):
            response = anonymous.request(method, path, json=GOOD_PAIR if method == "POST" else None)
            assert response.status_code == 401 and "missing bearer token" in response.text, (path, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
        assert anonymous.get("/info", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    with service.client(token="wrong-token") as intruder:
        response = intruder.post("/compare", json=GOOD_PAIR)
        assert response.status_code == 401 and "wrong bearer token" in response.text
    with service.client() as client:
        assert client.post("/compare", json=GOOD_PAIR).status_code == 200


def test_info_and_openapi_schema(service, trained_model_dir):
    import json

    with service.client() as client:
        info = client.get("/info").json()
        schema = client.get("/openapi.json").json()
    assert info["manifest"] == json.loads((trained_model_dir / "btrm.json").read_text())
    assert (info["max_length"], info["overlong"], info["reward_token"]) == (256, "truncate_prompt", "last")
    assert info["limits"]["max_candidates"] == 8 and info["version"] and (info["device"], info["dtype"]) == ("cpu", "float32")
    assert set(schema["paths"]) == {"/compare", "/score", "/health", "/info"}
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert "security" not in schema["paths"]["/health"]["get"]
    assert schema["paths"]["/compare"]["post"]["security"] == [{"bearer": []}]
    for model in ("ComparePair", "CompareBatch", "ScoreRequest", "PairResult", "ScoreResult"):
        assert model in schema["components"]["schemas"]


# ----------------------------------------------------------------------------------------------
# Options, config file, helpers (no Serve needed)


def test_serve_config_file_builds_this_application(trained_model_dir, tmp_path, monkeypatch, caplog):
    from ray.serve.schema import ServeDeploySchema

    from btrm.serving import RewardAPIDeployment, RewardModelDeployment

    config = ServeDeploySchema.model_validate(yaml.safe_load((REPO / "serve" / "config.yaml").read_text()))
    assert config.http_options.host == "127.0.0.1"
    (application,) = config.applications
    assert application.import_path == "serve.app:app_builder"
    assert [d.name for d in application.deployments] == [RewardAPIDeployment.name, RewardModelDeployment.name]
    options = ServiceOptions(**application.args)
    options.model_path = "somewhere"
    options.validate()
    with pytest.raises(ValueError, match="--dtype 'float16': expected one of"):
        ServiceOptions(model_path="somewhere", dtype="float16").validate()
    for bad, words in ((dict(port=70000), r"--port must be in \[1, 65535\]"),
                       (dict(request_timeout_s=0), "--request_timeout_s must be above 0"),
                       (dict(forward_timeout_s=float("nan")), "--forward_timeout_s must be >= 0, and finite")):
        with pytest.raises(ValueError, match=words):
            ServeCommand(model_path="somewhere", **bad).validate()
    # A batch larger than the deployments' defaults can fill gets the requests in flight to fill it with pairs.
    api = build_app(ServiceOptions(model_path=str(trained_model_dir), max_batch_sequences=600))._bound_deployment
    assert (api.max_ongoing_requests, api.init_args[2]._bound_deployment.max_ongoing_requests) == (600, 300)
    with pytest.raises(ValueError, match=r"headless: the model's files lack weight\(s\) \['score.weight'\]"):
        build_app(ServiceOptions(model_path=str(headless_export(trained_model_dir, tmp_path / "headless"))))
    with pytest.raises(ValueError, match=r"application args: unknown option\(s\) \['max_candidate'\] \(did you mean "
                                         r"max_candidates\?\)"):
        app_builder({"model_path": "x", "max_candidate": 3})
    # `serve deploy` reads the token on the cluster: an application built there without one says so.
    monkeypatch.delenv("BTRM_API_TOKEN", raising=False)
    app_builder({"model_path": str(trained_model_dir)})
    monkeypatch.setenv("BTRM_API_TOKEN", "secret")
    app_builder({"model_path": str(trained_model_dir)})
    assert [r.getMessage() for r in caplog.records].count(
        "btrm: no bearer token ($BTRM_API_TOKEN is not set where the application is built, and no token_file): "
        "every route of the service is open") == 1
    # `serve run serve.app:app_builder key=value` passes text, and PyYAML reads 5e-3 as text: each is read as
    # its option's type (the text reached the options as it was: validate's `"8" < 1` raised a TypeError).
    text_args = {"model_path": str(trained_model_dir), "max_pairs": "8", "batch_wait_timeout_s": "5e-3",
                 "replica_cpus": "2", "replica_gpus": 0, "require_token": "false"}
    assert typed_values(ServiceOptions, text_args) == {**text_args, "max_pairs": 8, "batch_wait_timeout_s": 0.005,
                                                       "replica_cpus": 2.0, "replica_gpus": "0", "require_token": False}
    app_builder(text_args)
    with pytest.raises(ValueError, match="application args: max_pairs: expected an integer, got 'eight'"):
        app_builder({"model_path": str(trained_model_dir), "max_pairs": "eight"})
    # Where it must not come up open (the builder may run on any node of a cluster), it does not come up.
    monkeypatch.delenv("BTRM_API_TOKEN")
    with pytest.raises(ValueError, match=r"--require_token: \$BTRM_API_TOKEN is not set where the application is built"):
        app_builder({"model_path": str(trained_model_dir), "require_token": True})


def test_options_and_token_sources(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="model_path is required"):
        ServiceOptions().validate()
    with pytest.raises(ValueError, match="max_batch_sequences"):
        ServiceOptions(model_path="m", max_pairs=100).validate()
    with pytest.raises(ValueError, match="replica_gpus"):
        ServiceOptions(model_path="m", replica_gpus="some").validate()
    with pytest.raises(ValueError, match="--max_pairs must be at most 4096"):
        ServiceOptions(model_path="m", max_pairs=5000, max_batch_sequences=10_000).validate()
    assert ServeCommand(model_path="m").host == "127.0.0.1"

    monkeypatch.delenv("BTRM_API_TOKEN", raising=False)
    assert read_token(ServiceOptions()) is None
    monkeypatch.setenv("BTRM_API_TOKEN", " from-env ")
    assert read_token(ServiceOptions()) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert read_token(ServiceOptions(token_file=str(tmp_path / "token"))) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_token(ServiceOptions(token_file=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError):
        read_token(ServiceOptions(token_file=str(tmp_path / "absent")))
    monkeypatch.setenv("BTRM_API_TOKEN", "pässwörd")  # headers are Latin-1 bytes: it could never match
    with pytest.raises(ValueError, match="BTRM_API_TOKEN: the bearer token must be printable ASCII"):
        read_token(ServiceOptions())


def test_a_list_past_max_listed_is_refused_by_its_length_before_any_item_is_read():
    """Validation stops at the length of a list of more than MAX_LISTED pairs or candidates: an 8 MiB body holds
    ~200k tiny pairs, seconds of the HTTP replica's event loop to check one by one before max_pairs refuses them
    (the service answers it with max_pairs' 413: tests/test_serve_fuzz.py). Here every pair is malformed, and
    the only error is the length."""
    from pydantic import TypeAdapter, ValidationError

    from btrm.serving import MAX_LISTED, CompareRequest, ScoreRequest

    with pytest.raises(ValidationError) as refused:
        TypeAdapter(CompareRequest).validate_python({"pairs": [{"chosen": 1}] * (MAX_LISTED + 1)})
    assert [(e["type"], e["loc"]) for e in refused.value.errors()] == [("too_many", ("<batch>", "pairs"))]
    with pytest.raises(ValidationError) as refused:
        TypeAdapter(ScoreRequest).validate_python({"prompt": "hi", "candidates": [7] * (MAX_LISTED + 1)})
    assert [(e["type"], e["loc"]) for e in refused.value.errors()] == [("too_many", ("candidates",))]
    # So are the lists inside a message (150k tool calls in one answer took 3.8 s), and tools sent as a JSON string.
    too_many = [7] * (MAX_LISTED + 1)
    for answer, loc in [({"role": "assistant", "tool_calls": too_many}, ("candidates", 0, "<message>", "tool_calls")),
                        ({"role": "assistant", "content": too_many}, ("candidates", 0, "<message>", "content"))]:
        with pytest.raises(ValidationError) as refused:
            TypeAdapter(ScoreRequest).validate_python({"prompt": "hi", "candidates": [answer]})
        assert [(e["type"], e["loc"]) for e in refused.value.errors()] == [("too_many", loc)]
    with pytest.raises(ValidationError) as refused:
        TypeAdapter(ScoreRequest).validate_python({"prompt": "hi", "tools": json.dumps(too_many), "candidates": ["a"]})
    assert [(e["type"], e["loc"]) for e in refused.value.errors()] == [("too_many", ("tools",))]


def test_a_flat_tool_call_is_validated_and_dumped_without_a_warning():
    """Each warning's text held the call's id, so Python kept every one (a registry that grew with each request)
    and printed each into the replica's log."""
    from pydantic import TypeAdapter

    from btrm.serving import ScoreRequest

    answer = {"role": "assistant", "tool_calls": [{"name": "lookup", "arguments": "{}", "id": "call_1"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        request = TypeAdapter(ScoreRequest).validate_python({"prompt": "hi", "candidates": [answer]})
    assert request.conversation(request.candidates[0])[-1]["tool_calls"][0]["function"]["name"] == "lookup"


def test_length_buckets_and_sigmoid():
    lengths = [10, 400, 12, 19, 900, 21, 250]
    buckets = length_buckets(lengths)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        assert max(lengths[i] for i in bucket) <= 2 * min(lengths[i] for i in bucket)
    assert buckets[0] == [0, 2, 3]
    assert sigmoid(0.0) == 0.5 and sigmoid(-1000.0) == 0.0 and sigmoid(1000.0) == 1.0
    assert sigmoid(-2.0) == pytest.approx(1 - sigmoid(2.0), abs=1e-15)


def test_what_the_model_refuses_or_fails_at_is_said_as_json(service, trained_model_dir, tmp_path):
    """A model whose chat template refuses a system turn (as Gemma's does) and whose training diverged (it
    scores NaN): the client hears which, and where, as JSON: a 422 like every other (a list of errors with
    their loc), a 500 naming the answers, not a bare "Internal Server Error" (JSON has no NaN to send)."""
    import shutil

    import torch
    from ray import serve
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(trained_model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    head = next(name for name in weights if name.startswith("score."))
    weights[head] = torch.full_like(weights[head], float("nan"))
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    manifest = json.loads((broken / "btrm.json").read_text())
    manifest["tokenization"]["chat_template"] = ("{%- if messages[0].role == 'system' %}{{ raise_exception('System "
                                                 "role not supported') }}{%- endif %}"
                                                 + manifest["tokenization"]["chat_template"])
    (broken / "btrm.json").write_text(json.dumps(manifest))
    # A second application on the running Serve, beside the test service.
    serve.run(app_builder(dict(model_path=str(broken))), name="broken", route_prefix="/broken")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    try:
        with service.client(token=None) as client:
            compared = client.post("/broken/compare", json={"pairs": [GOOD_PAIR, GOOD_PAIR]})
            scored = client.post("/broken/score", json={"prompt": "hi", "candidates": ["a", "b"]})
            refused = client.post("/broken/compare", json={"pairs": [GOOD_PAIR, {**GOOD_PAIR, "prompt": None,
                                                                                  "messages": system}]})
    finally:
        serve.delete("broken")
    assert compared.status_code == scored.status_code == 500, (compared.text, scored.text)
    assert "pair 1's rejected answer" in compared.json()["detail"] and "training diverged" in compared.json()["detail"]
    assert "candidate 0, candidate 1" in scored.json()["detail"]
    assert refused.status_code == 422, refused.text
    [error] = refused.json()["detail"]
    assert error["loc"] == ["body", "pairs", 1] and "System role not supported" in error["msg"]


def _served_copy(name: str, trained_model_dir: Path, tmp_path: Path, change) -> str:
    """A copy of the trained export, changed by ``change(directory)``, served under /``name`` (the first
    request of a batch waits a second for others: concurrent requests share one batch)."""
    import shutil

    from ray import serve

    directory = tmp_path / name
    shutil.copytree(trained_model_dir, directory)
    change(directory)
    serve.run(app_builder(dict(model_path=str(directory), batch_wait_timeout_s=1.0)), name=name, route_prefix=f"/{name}")
    return name


def _concurrently(url: str, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post(path, json=body) for body in bodies))

    return asyncio.run(send())


def test_text_holding_a_token_the_model_has_no_embedding_for_is_a_422(service, tmp_path, trained_model_dir):
    """A tokenizer that knows a token the model's embedding lacks (extended, never resized; or a special
    token such as Gemma 3's image placeholder sent as text): refused before the forward, which on a GPU
    would end in a device-side assert that leaves the replica unable to score anything."""
    from ray import serve
    from transformers import AutoTokenizer

    def extend(directory: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.add_tokens(["<unseen>"])
        tokenizer.save_pretrained(directory)

    name = _served_copy("extended", trained_model_dir, tmp_path, extend)
    good = [{"prompt": f"question {i}", "candidates": ["yes", f"no, {i}"]} for i in range(2)]
    bad = {"prompt": "question", "candidates": ["<unseen> yes", "no"]}
    try:
        batched = _concurrently(service.url, f"/{name}/score", [good[0], bad, good[1]])
    finally:
        serve.delete(name)
    with service.client() as client:
        expected = [client.post("/score", json=body).json()["rewards"] for body in good]
    for response, rewards in zip([batched[0], batched[2]], expected, strict=True):
        assert response.status_code == 200, response.text
        assert response.json()["rewards"] == pytest.approx(rewards, abs=1e-4)
    assert batched[1].status_code == 422, batched[1].text
    [error] = batched[1].json()["detail"]
    assert error["type"] == "unknown_token" and error["loc"] == ["body"]
    assert "'<unseen>' (id 151669)" in error["msg"] and "embedding has 151669 rows" in error["msg"], error


def test_a_request_the_model_fails_on_fails_alone_not_the_requests_batched_with_it(service, tmp_path,
                                                                                    trained_model_dir):
    """A model whose position table (64) is shorter than its manifest's max_length (256): the forward fails
    on a request longer than 64 tokens. The requests batched with it are scored as they are alone; it gets
    a JSON 500 that names the failure, batched or alone."""
    import torch
    from ray import serve
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    def short_positions(directory: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64, num_labels=1,
                            pad_token_id=tokenizer.pad_token_id)
        torch.manual_seed(0)
        BertForSequenceClassification(config).save_pretrained(directory)

    name = _served_copy("short", trained_model_dir, tmp_path, short_positions)
    good = [{"prompt": f"question {i}", "candidates": ["yes", f"no, {i}"]} for i in range(3)]
    bad = {"prompt": "a question that goes on " * 20, "candidates": ["yes", "no"]}
    try:
        batched = _concurrently(service.url, f"/{name}/score", [good[0], bad, *good[1:]])
        with service.client(token=None) as client:
            alone = [client.post(f"/{name}/score", json=body) for body in [*good, bad]]
    finally:
        serve.delete(name)
    for response, by_itself in zip([batched[0], *batched[2:]], alone[:3], strict=True):
        assert response.status_code == 200 and by_itself.status_code == 200, response.text + by_itself.text
        assert response.json()["rewards"] == pytest.approx(by_itself.json()["rewards"], abs=1e-4)
    for response in (batched[1], alone[3]):
        assert response.status_code == 500
        assert "the model failed to score this request: " in response.json()["detail"], response.text
        assert "Traceback" not in response.json()["detail"], response.text  # the model replica's message, not its stack


def test_requests_that_arrive_during_a_forward_all_go_into_the_next_one(trained_model_dir):
    """Continuous batching in the real model replica class (in this process): while a slow forward runs (a GPU's
    forward of a big batch), 40 requests arrive; the next forward takes them all, not one or two (what
    @serve.batch of Ray 2.60 did: it formed batches while one ran and queued them behind it); batches never
    exceed max_batch_sequences answers."""
    import threading

    from btrm.serving import RewardModelDeployment

    forwards, started = [], threading.Event()

    async def scenario():
        replica = RewardModelDeployment.func_or_class(ServiceOptions(
            model_path=str(trained_model_dir), max_pairs=16, max_candidates=32, max_batch_sequences=64))
        score = replica.scorer.group_rewards

        def slow_forward(groups, max_batch_tokens):
            forwards.append(sum(len(g.tails) for g in groups))
            started.set()
            deadline = time.monotonic() + 30
            while len(forwards) == 1 and len(replica.queue.waiting) < 40 and time.monotonic() < deadline:
                time.sleep(0.01)  # the first forward lasts until all 40 have arrived, however slow the machine
            return score(groups, max_batch_tokens)

        replica.scorer.group_rewards = slow_forward
        pair = replica.scorer.encoder.encode_group([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": a}]
                                            for a in ("hello", "go away")])
        first = asyncio.create_task(replica.score_groups([pair], replica.export))
        await asyncio.to_thread(started.wait)
        later = [asyncio.create_task(replica.score_groups([pair], replica.export)) for _ in range(40)]
        return await asyncio.gather(first, *later)

    results = asyncio.run(scenario())
    assert forwards == [2, 64, 16]  # 40 pairs waited: 32 fill the next batch, the other 8 the one after
    assert len(results[0][0]) == 2 and all(r[0] == pytest.approx(results[0][0], abs=1e-4) for r in results)


def _in_process_api(model_dir, score_groups, model_state) -> httpx.AsyncClient:
    """A client of the real FastAPI app of an HTTP replica, in this process, whose model side is
    ``score_groups`` and ``model_state`` (a model replica's methods, or what a Serve handle would raise)."""
    from btrm.scoring import ConversationEncoder
    from btrm.serving import build_api

    api = build_api(ConversationEncoder(str(model_dir)), ServiceOptions(model_path=str(model_dir)), None,
                    score_groups, model_state)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://replica")


def test_tools_a_models_template_cannot_render_are_a_422_for_the_client(trained_model_dir, tmp_path):
    """A model trained with a template without tool support cannot see a request's tools: the 422 says so in the
    client's terms (training's advice, --chat_template, is the operator's). The real FastAPI app in this process."""
    import pickle
    import shutil

    from btrm.tokenize import UnrenderedToolUse

    toolless = tmp_path / "toolless"
    shutil.copytree(trained_model_dir, toolless)
    manifest = json.loads((toolless / "btrm.json").read_text())
    manifest["tokenization"]["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                                                 "<|im_end|>\n{% endfor %}")
    (toolless / "btrm.json").write_text(json.dumps(manifest))

    async def scenario():
        async with _in_process_api(toolless, None, None) as client:
            return await client.post("/score", json={"prompt": "hi", "tools": SEARCH, "candidates": ["a"]})

    response = asyncio.run(scenario())
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body"] and error["msg"].startswith("the model's chat template does not render the tools "
                                                                "or tool calls ['search']: it would score"), error
    assert "--chat_template" not in error["msg"]
    again = pickle.loads(pickle.dumps(UnrenderedToolUse(["search"])))
    assert again.names == ["search"] and str(again) == str(UnrenderedToolUse(["search"]))


def test_a_body_that_cannot_be_parsed_at_all_is_a_400_that_says_why_and_where(trained_model_dir):
    """Bytes that are not UTF-8, JSON nested past what the parser takes, an integer of more digits than Python
    converts: FastAPI's 400 said only "There was an error parsing the body". The real FastAPI app in this process."""
    bodies = [b'{"prompt": "caf\xc3\x28", "candidates": ["a"]}', b"[" * 100_000,
              b'{"prompt": 1' + b"0" * 5000 + b', "candidates": ["a"]}']

    async def scenario():
        async with _in_process_api(trained_model_dir, None, None) as client:
            return [await client.post("/score", content=body, headers={"content-type": "application/json"})
                    for body in bodies]

    not_utf8, too_deep, too_long = asyncio.run(scenario())
    assert [r.status_code for r in (not_utf8, too_deep, too_long)] == [400] * 3
    assert not_utf8.json() == {"detail": "the body is not UTF-8: byte 0xc3 at offset 15 (invalid continuation byte); "
                                         "send JSON encoded as UTF-8"}
    assert too_deep.json() == {"detail": "the body's JSON nests arrays or objects too deep to parse; no request to this "
                                         "service nests more than a few levels"}
    assert too_long.json() == {"detail": "the body's JSON holds an integer of 5001 digits, more than Python converts "
                                         "(4300); no field of a request is such a number"}


def test_a_cuda_error_answers_503_at_once_and_fails_the_health_check_so_serve_replaces_the_replica(trained_model_dir):
    """CUDA errors stick to a process (a device-side assert, an illegal memory access): after one, every forward
    on that GPU fails. This machine has no GPU, so the forward raises torch's CUDA error by hand; the rest is the
    real model replica class and the real FastAPI app in this process, over HTTP; the app calls the model
    replica's methods directly instead of through a Serve handle. The failing request and every later one get a
    503 that says to retry, no later forward is tried, and the model replica fails Serve's health check."""
    import torch

    from btrm.serving import GPUFailed, RewardModelDeployment

    async def scenario(error):
        forwards = []

        def broken_gpu(groups, max_batch_tokens):
            forwards.append(len(groups))
            raise error

        replica = RewardModelDeployment.func_or_class(ServiceOptions(model_path=str(trained_model_dir)))
        replica.check_health()
        replica.scorer.group_rewards = broken_gpu
        async with _in_process_api(trained_model_dir, replica.score_groups, replica.state) as client:
            healthy = await client.get("/health")
            responses = [await client.post("/compare", json=GOOD_PAIR),
                         await client.post("/score", json={"prompt": "hi", "candidates": ["a", "b"]})]
            health = await client.get("/health")
        return replica, forwards, healthy, responses, health

    # torch's own, and a compiled kernel's launch (Triton's: FlexAttention's kernels), which is a plain RuntimeError.
    for error in (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
                  RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered")):
        replica, forwards, healthy, responses, health = asyncio.run(scenario(error))
        assert healthy.status_code == 200
        assert forwards == [1]
        for response in [*responses, health]:
            assert response.status_code == 503 and response.headers["retry-after"] == "15", response.text
            assert "illegal memory access" in response.json()["detail"] and "retry" in response.json()["detail"]
        with pytest.raises(GPUFailed, match="Serve is replacing the replica"):
            replica.check_health()


def test_a_forward_that_hangs_fails_the_health_check_so_serve_replaces_the_replica(trained_model_dir):
    """A GPU that hangs (a stuck collective, a driver fault) leaves a forward running for ever in its thread, while
    the replica's event loop still answers Serve's health checks. Past forward_timeout_s the check fails, and Serve
    replaces the replica; a batch of many forwards, each within the limit, does not. The hang is made by hand (no
    GPU here): a forward that waits; the replica class is real."""
    import threading

    from btrm.serving import ForwardHung, RewardModelDeployment

    release = threading.Event()

    def hung_gpu(groups, max_batch_tokens):
        release.wait(30)
        return [[0.0] * len(group.tails) for group in groups]

    async def scenario():
        replica = RewardModelDeployment.func_or_class(ServiceOptions(model_path=str(trained_model_dir),
                                                                     forward_timeout_s=1.0))
        encoded = replica.scorer.encoder.encode_group([[{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": answer}]
                                                       for answer in ("a", "b")])
        replica.scorer.group_rewards = hung_gpu
        scoring = asyncio.create_task(replica.score_groups([encoded], replica.export))
        # (Margins of most of a second either side of the limit: a loaded machine's sleeps overrun.)
        await asyncio.sleep(0.2)
        replica.check_health()  # a forward under way, within the limit: healthy
        await asyncio.sleep(1.1)
        with pytest.raises(ForwardHung, match=r"a forward pass has run for \d+ s, past forward_timeout_s=1.0: Serve "
                                              "replaces this replica"):
            replica.check_health()
        release.set()
        assert await scoring == [[0.0, 0.0]]
        replica.check_health()  # (a slow forward that ends is no failure)

        # A batch of many forwards, each within the limit, longer than it in all: healthy throughout.
        def many_forwards(groups, max_batch_tokens):
            for _ in range(8):  # 1.6 s in all
                replica.scorer.forward_began = time.monotonic()
                time.sleep(0.2)
            return [[1.0] * len(group.tails) for group in groups]

        replica.scorer.group_rewards = many_forwards
        scoring = asyncio.create_task(replica.score_groups([encoded], replica.export))
        while not scoring.done():
            replica.check_health()
            await asyncio.sleep(0.1)
        assert await scoring == [[1.0, 1.0]]

    asyncio.run(scenario())


def test_a_model_replica_out_of_reach_or_out_of_memory_is_a_503_that_says_so(trained_model_dir):
    """Serve's errors for a model deployment this request cannot reach (its replicas failed to start, a replica
    gone), and a GPU out of memory on a request scored alone, answer 503 with Retry-After, as Serve's own proxy
    answers them: not a 500 that reads as the model failing on this request. The real FastAPI app in this
    process, its model side raising Serve's errors as a handle would, or the real model replica class whose
    forward runs out of memory (raised by hand: no GPU here)."""
    import torch
    from ray.serve._private.common import DeploymentID
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    from btrm.serving import RewardModelDeployment

    forwards = []

    def out_of_memory(groups, max_batch_tokens):
        forwards.append(len(groups))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    async def scenario(error):
        if error is None:  # the model replica itself, its GPU short of memory
            replica = RewardModelDeployment.func_or_class(ServiceOptions(model_path=str(trained_model_dir)))
            replica.scorer.group_rewards = out_of_memory
            score_groups, state = replica.score_groups, replica.state
        else:
            async def score_groups(*args):
                raise error

            state = score_groups
        async with _in_process_api(trained_model_dir, score_groups, state) as client:
            return [await client.post("/compare", json=GOOD_PAIR), await client.get("/health")]

    errors = {"deployment": DeploymentUnavailableError(DeploymentID(name="RewardModel", app_name=APP)),
              "replica": ReplicaUnavailableError("RewardModel#abc"), "memory": None}
    for name, error in errors.items():
        scored, health = asyncio.run(scenario(error))
        words = {"deployment": "model deployment is unavailable", "replica": "cannot be reached",
                 "memory": "ran out of GPU memory scoring this request: retry; if it persists, lower max_batch_tokens"}[name]
        assert scored.status_code == 503 and scored.headers["retry-after"] == "5", (name, scored.text)
        assert words in scored.json()["detail"] and "retry" in scored.json()["detail"], (name, scored.text)
        if name == "memory":
            assert health.status_code == 200, health.text  # (the GPU stays usable)
        else:
            assert health.status_code == 503 and words in health.json()["detail"], (name, health.text)
    assert forwards == [1]


def test_a_model_replica_holding_another_export_refuses_ids_tokenized_for_this_one(trained_model_dir, tmp_path):
    """During a rollout Serve's handles reach model replicas of the old version and the new, and a model directory
    replaced in place reaches replicas started after it: a model replica whose export is not the one the HTTP
    replica tokenized for answers a 503 to retry, not rewards for other ids. The real model replica class and
    the real FastAPI app in this process; the replica loads a copy of the export trained further (its manifest
    says so)."""
    import shutil

    from btrm.serving import RewardModelDeployment

    retrained = shutil.copytree(trained_model_dir, tmp_path / "model")
    manifest = json.loads((retrained / "btrm.json").read_text())
    manifest["training"]["steps"] += 1
    (retrained / "btrm.json").write_text(json.dumps(manifest))

    async def scenario(model_dir):
        replica = RewardModelDeployment.func_or_class(ServiceOptions(model_path=str(model_dir)))
        async with _in_process_api(trained_model_dir, replica.score_groups, replica.state) as client:
            return await client.post("/compare", json=GOOD_PAIR)

    assert asyncio.run(scenario(trained_model_dir)).status_code == 200
    refused = asyncio.run(scenario(retrained))
    assert refused.status_code == 503 and refused.headers["retry-after"] == "5", refused.text
    assert f"holds another export of {retrained}" in refused.json()["detail"], refused.text
    assert "a rollout is under way (retry)" in refused.json()["detail"], refused.text


def test_health_answers_at_once_while_requests_are_being_scored(trained_model_dir, monkeypatch):
    """Under load a model replica's slots are taken by scoring requests, and /health's own call to it would wait
    behind them (503 after MODEL_STATE_TIMEOUT_S: a readiness probe would take the service out at its peak).
    A request scored within RECENTLY_SCORED_S shows a model replica answers: /health is 200 without asking, a
    request refused for a full queue (replicas busy) included. Once scoring fails for want of a replica, or
    nothing was scored lately, /health asks again."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    import btrm.serving as serving

    monkeypatch.setattr(serving, "MODEL_STATE_TIMEOUT_S", 0.2)
    monkeypatch.setattr(serving, "RECENTLY_SCORED_S", 1.0)
    failure = None

    async def score_groups(groups, export):
        if failure:
            raise failure
        return [[0.5, -0.5] for _ in groups]

    async def busy_replica_state():  # every slot taken: the call waits
        await asyncio.sleep(3600)

    async def scenario():
        nonlocal failure
        async with _in_process_api(trained_model_dir, score_groups, busy_replica_state) as client:
            statuses = [(await client.get("/health")).status_code]
            statuses += [(await client.post("/compare", json=GOOD_PAIR)).status_code,
                         (await client.get("/health")).status_code]
            await asyncio.sleep(1.2)
            statuses.append((await client.get("/health")).status_code)
            statuses += [(await client.post("/compare", json=GOOD_PAIR)).status_code,
                         (await client.get("/health")).status_code]
            failure = BackPressureError(num_queued_requests=1024, max_queued_requests=1024)
            statuses += [(await client.post("/compare", json=GOOD_PAIR)).status_code,
                         (await client.get("/health")).status_code]
            failure = RayActorError()
            statuses += [(await client.post("/compare", json=GOOD_PAIR)).status_code,
                         (await client.get("/health")).status_code]
        return statuses

    assert asyncio.run(scenario()) == [503, 200, 200, 503, 200, 200, 503, 200, 503, 503]


# ----------------------------------------------------------------------------------------------
# Last: it replaces the replica


def test_dead_model_replica_fails_requests_in_flight_fast_and_is_replaced(service, eval_pairs):
    import ray

    pairs = [pair for pair, _ in eval_pairs[:32]]
    body = {"pairs": [_compare_body(p) for p in pairs]}
    with service.client() as client:
        before = client.post("/compare", json=body).json()["results"]

    async def kill_while_busy() -> list:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        (name,) = [(a["name"], a["namespace"]) for a in ray.util.list_named_actors(all_namespaces=True)
                   if a["name"].startswith(f"SERVE_REPLICA::{APP}#RewardModel#")]
        replica = ray.get_actor(*name)
        # Requests not yet handed to the model replica wait for its replacement (Serve retries them): up to a
        # replica's start on a loaded machine.
        async with httpx.AsyncClient(base_url=service.url, headers=headers, timeout=120) as client:
            in_flight = [asyncio.create_task(client.post("/compare", json=body)) for _ in range(12)]
            deadline = time.monotonic() + 30
            while await replica.get_num_ongoing_requests.remote() == 0:  # killed while it scores, not before
                assert time.monotonic() < deadline, "no request reached the model replica"
                await asyncio.sleep(0.05)
            # A request the replica counts may not be handed over yet: its acceptance is a message on its way back
            # to the HTTP replica's router, and one killed before it arrives is retried on the replacement (a 200;
            # CI saw all twelve so). Half a second on, the first have been handed over and the rest wait their turn
            # (each request of 32 pairs is a forward of its own: max_batch_sequences is 64).
            await asyncio.sleep(0.5)
            assert await replica.get_num_ongoing_requests.remote() > 0, "the replica scored every request within 0.5 s"
            ray.kill(replica, no_restart=True)
            return await asyncio.gather(*in_flight, return_exceptions=True)

    responses = asyncio.run(kill_while_busy())
    # No hang (the client would time out): each request either finished or failed, those the replica held
    # with a 503 that says to retry (one that waited for the replacement past request_timeout_s: a 408).
    assert all(isinstance(r, httpx.Response) and r.status_code in (200, 408, 503) for r in responses), responses
    failed = [r for r in responses if r.status_code == 503]
    assert failed and all("model replica" in r.json()["detail"] and "retry" in r.json()["detail"]
                          and r.headers["retry-after"] == "5" for r in failed), [r.text for r in failed]

    with service.client() as client:
        deadline = time.monotonic() + 90
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "Serve did not replace the replica"
            time.sleep(1)
        after = client.post("/compare", json=body)
    assert after.status_code == 200
    for result, expected in zip(after.json()["results"], before, strict=True):
        assert result == pytest.approx(expected, abs=1e-4)


# ----------------------------------------------------------------------------------------------
# `btrm serve`: the one-command service, as a user starts and stops it


def test_btrm_serve_refuses_more_gpus_than_the_machine_has(trained_model_dir):
    """A replica asking for a GPU this machine lacks would leave the command waiting for ever: refused, saying so."""
    command = [str(Path(sys.executable).parent / "btrm"), "serve", "--model_path", str(trained_model_dir),
               "--port", str(free_port()), "--replica_gpus", "1"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    assert run.returncode != 0 and ("--num_replicas 1 x 1 GPU each needs more GPUs than this machine has (0)"
                                    in run.stderr), run.stdout[-2000:] + run.stderr[-2000:]


def test_btrm_serve_answers_on_loopback_and_stops_cleanly_on_sigterm(trained_model_dir):
    """The console command on its own private Ray: it answers on 127.0.0.1, and a service manager's stop
    (SIGTERM) shuts Serve and Ray down and exits 0, as Ctrl-C does. Its replicas reserve more CPUs than the
    machine has cores (a laptop, a small VM): it serves anyway, slower, rather than wait for CPUs forever."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "btrm"), "serve", "--model_path", str(trained_model_dir),
               "--port", str(port), "--replica_cpus", str(os.cpu_count() + 1)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 180
        while not any("[btrm] serving" in line for line in lines):
            assert process.poll() is None, f"btrm serve exited with {process.returncode}:\n{''.join(lines)}"
            assert time.time() < deadline, f"btrm serve did not start within 180 s:\n{''.join(lines)}"
            time.sleep(1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            assert client.get("/health").status_code == 200
            response = client.post("/compare", json={"prompt": "What is 2+2?", "chosen": "4", "rejected": "5"})
            assert response.status_code == 200, response.text
            result = response.json()
            assert result["p_chosen_better"] == pytest.approx(sigmoid(result["margin"]))
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)
        reader.join(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = "".join(lines)
    assert process.returncode == 0, output
    assert f"serving {trained_model_dir} at http://127.0.0.1:{port}" in output
    assert "[btrm] shutting down" in output and "SIGTERM received" not in output, output


def test_the_json_value_count_opens_tools_and_arguments_strings_and_no_answer_text():
    """Validation parses and walks a tools or arguments string; an answer whose text happens to be JSON is text."""
    from btrm.serving import json_values_past

    as_text = {"role": "assistant", "content": json.dumps([0] * 100)}
    as_arguments = {"role": "assistant", "tool_calls": [{"name": "f", "arguments": json.dumps([0] * 100)}]}
    assert json_values_past(as_text, 10**6) == 3
    assert json_values_past(as_arguments, 10**6) == 6 + 100
    assert json_values_past({"tools": json.dumps([{}] * 10)}, 10**6) == 2 + 10
    assert json_values_past({"tools": "[" * 5000 + "]" * 5000}, 10**6) == 2  # (past the stack: validation says so)
