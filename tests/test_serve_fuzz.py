"""The scoring service under abuse, over real HTTP to a real Serve app on 127.0.0.1:

- a schemathesis fuzz of its OpenAPI schema (explicit examples, boundary/negative coverage cases and
  random cases, valid and invalid): no 5xx, and every answer is one the schema documents;
- cases of the same kinds with no token or a wrong one: a 401 on every guarded route, whatever the body;
- well-formed requests full of odd text (control characters, the chat template's own markers, any script):
  scored (200) or refused as too long for the model (413), never anything else;
- the abuse cases tests/test_serve.py does not cover: bodies that are not JSON, JSON Python accepts but
  JSON cannot carry back (NaN, lone surrogates, deep nesting), thousands of candidates or pairs, wrong
  types, odd Authorization headers.

The last test prints what was sent (requests per run, a status-code histogram), also without ``-s``."""

from __future__ import annotations

import itertools
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import pytest

pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra: ./setup.sh dev")

import requests  # noqa: E402  (schemathesis's transport)
import schemathesis  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.config import SchemathesisConfig  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    ignored_auth,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from conftest import scoring_service

TOKEN = "fuzz-token-5b1e"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP = "btrm-fuzz"
LIMITS = dict(max_candidates=8, max_pairs=32, max_batch_sequences=64, max_body_bytes=1024 * 1024)
GUARDED = ("/compare", "/score", "/info", "/openapi.json", "/docs")
REQUEST_TIMEOUT_S = 30

# Checked on every answer of the fuzz with the token. Left out, deliberately:
# - positive_data_acceptance: the schema cannot say all a valid request needs (text that is not only
#   whitespace, exactly one of prompt/messages, turns in an order the chat template takes), so many
#   schema-valid bodies get a 422 by design; test_well_formed_requests_with_odd_text_* sends valid ones.
# - max_response_time: timings on a shared 2-core CI machine would make it flaky.
# - use_after_free, ensure_resource_availability: no resources are created, no links to follow.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection, ignored_auth, unsupported_method,
          missing_required_header]

# Bounded for CI: 50 generated cases per operation on top of the explicit and coverage ones; no shrinking
# (a failure prints its curl reproduction), no example database in the tree. Derandomized: every run sends
# the same cases (a case found by chance would fail one CI run and pass the next), and no deadline per case
# (a loaded machine is slow, not wrong; the client's timeout still catches a hang).
FUZZ_SETTINGS = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                         phases=[Phase.explicit, Phase.generate],
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

WRONG_AUTHORIZATION = [None, "Bearer wrong-token", f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", f"Basic {TOKEN}",
                       f"Token {TOKEN}", "Bearer ", "Bearer", f"Bearer{TOKEN}", "Bearer " + "x" * 4096]
_next_wrong = itertools.count()


# ----------------------------------------------------------------------------------------------
# The service and what was sent to it


@dataclass
class Traffic:
    """Every answer the tests got, by run: (method, path, status) → count."""

    runs: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    def record(self, run: str, method: str, url: str, status: int) -> None:
        self.runs[run][(method, urlparse(str(url)).path, status)] += 1

    def requests_session(self, run: str) -> requests.Session:
        session = requests.Session()
        session.hooks["response"].append(
            lambda r, *args, **kwargs: self.record(run, r.request.method, r.request.url, r.status_code))
        return session

    def httpx_client(self, run: str, url: str, headers: dict | None = AUTH) -> httpx.Client:
        hook = lambda r: self.record(run, r.request.method, r.request.url, r.status_code)  # noqa: E731
        return httpx.Client(base_url=url, headers=headers or {}, timeout=REQUEST_TIMEOUT_S,
                            event_hooks={"response": [hook]})

    def report(self) -> str:
        total = sum(sum(counts.values()) for counts in self.runs.values())
        lines = [f"[fuzz] {total} requests sent to the scoring service; status codes by run, then by path"]
        for run, counts in self.runs.items():
            by_path: dict[str, Counter] = defaultdict(Counter)
            for (_, path, status), n in counts.items():
                by_path["all"][status] += n
                by_path[path][status] += n
            lines.append(f"  {run}: {sum(counts.values())} requests {dict(sorted(by_path.pop('all').items()))}")
            lines += [f"      {path:14} {dict(sorted(statuses.items()))}" for path, statuses in sorted(by_path.items())]
        return "\n".join(lines)

    def server_errors(self) -> dict:
        return {(run, *key): n for run, counts in self.runs.items() for key, n in counts.items() if key[2] >= 500}


@pytest.fixture(scope="module")
def service(ray_session, trained_model_dir, tmp_path_factory):
    """Its own Serve app (not test_serve.py's), with the same small limits."""
    with scoring_service(trained_model_dir, tmp_path_factory.mktemp("fuzz-secrets"), TOKEN, APP, **LIMITS) as running:
        yield running


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return Traffic()


@pytest.fixture(scope="module")
def api_schema(service):
    """The schema as the running service serves it (behind the token)."""
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json", headers=AUTH, timeout=REQUEST_TIMEOUT_S)


@pytest.fixture(scope="module")
def api_schema_random_cases_only(service):
    """The same schema without the coverage phase's boundary cases (about 1,900 requests, each a body a token
    would let in): without a valid token every guarded route answers 401 before it reads the body."""
    config = SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": False}}})
    return schemathesis.openapi.from_url(f"{service.url}/openapi.json", config=config, headers=AUTH,
                                         timeout=REQUEST_TIMEOUT_S)


schema = schemathesis.pytest.from_fixture("api_schema")
unauthorized_schema = schemathesis.pytest.from_fixture("api_schema_random_cases_only")


@pytest.fixture(autouse=True)
def _schemathesis_node_id(request):
    """schemathesis 4.32.5's from_fixture() reads ``request.node._nodeid``, which pytest 9 no longer has
    (AttributeError); it only uses it to name the subtest of each operation. Remove once schemathesis
    reads ``nodeid``."""
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


# ----------------------------------------------------------------------------------------------
# Schema-driven fuzz


@schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_with_token(case, traffic):
    """Valid and invalid requests from the schema: never a 5xx, and every answer is documented there."""
    case.call_and_validate(session=traffic.requests_session("fuzz with token"), headers=AUTH, checks=CHECKS,
                           timeout=REQUEST_TIMEOUT_S)


@unauthorized_schema.parametrize()
@FUZZ_SETTINGS
def test_fuzz_without_a_valid_token(case, traffic):
    """Requests of the same kinds (the explicit and random cases, valid and invalid) with no token or a wrong
    one: 401 on every guarded route, before the body is even read; /health answers anyway."""
    session = traffic.requests_session("fuzz without token")
    authorization = WRONG_AUTHORIZATION[next(_next_wrong) % len(WRONG_AUTHORIZATION)]
    headers = {"Authorization": authorization} if authorization is not None else None
    response = case.call(session=session, headers=headers, timeout=REQUEST_TIMEOUT_S)
    case.validate_response(response, checks=[not_a_server_error], headers=headers)
    path = urlparse(response.request.url).path
    if path in GUARDED:
        assert response.status_code == 401, (authorization, case.as_curl_command(), response.text)
        assert response.headers.get("www-authenticate") == ["Bearer"], response.headers
    else:
        assert response.status_code != 401, (case.as_curl_command(), response.text)


# ----------------------------------------------------------------------------------------------
# Well-formed requests, odd text

# Text that a tokenizer or a chat template might trip on, mixed into arbitrary Unicode (any script,
# control characters, NUL; hypothesis leaves out lone surrogates, which JSON text cannot carry).
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "{{", "}}",
           "{% if %}", "\x00", "\u200b", "\ufeff", "\u202e", "\r\n", "\t", "🤖", "ﷺ", "\U0010ffff", "a" * 200,
           "many words " * 150]  # the last: ~300 tokens, over max_length (256) as an answer, cut as a prompt
odd_text = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SPECIAL)), min_size=1, max_size=6).map(
    "".join).filter(lambda s: s.strip())


@st.composite
def prompts(draw) -> dict:
    if draw(st.booleans()):
        return {"prompt": draw(odd_text)}
    messages = [{"role": "system", "content": draw(odd_text)}] if draw(st.booleans()) else []
    messages.append({"role": "user", "content": draw(odd_text)})
    for _ in range(draw(st.integers(0, 2))):
        messages.append({"role": "assistant", "content": draw(odd_text)})
        messages.append({"role": draw(st.sampled_from(["user", "tool"])), "content": draw(odd_text)})
    return {"messages": messages}


compare_pair = st.builds(lambda p, c, r, i: {**p, "chosen": c, "rejected": r, **i}, prompts(), odd_text, odd_text,
                         st.one_of(st.just({}), st.fixed_dictionaries({"id": st.text(max_size=20)})))
WELL_FORMED = {
    "/compare": st.one_of(compare_pair, st.lists(compare_pair, min_size=1, max_size=4).map(lambda p: {"pairs": p})),
    "/score": st.builds(lambda p, c: {**p, "candidates": c}, prompts(), st.lists(odd_text, min_size=1, max_size=8)),
}


@pytest.mark.parametrize("path", WELL_FORMED)
def test_well_formed_requests_with_odd_text_are_scored_or_too_long(service, traffic, path):
    with traffic.httpx_client("well-formed, odd text", service.url) as client:

        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
        @given(WELL_FORMED[path])
        def scored_or_too_long(body):
            response = client.post(path, json=body)
            if response.status_code == 413:
                assert "max_length" in response.json()["detail"], response.text
                return
            assert response.status_code == 200, (path, body, response.text)
            result = response.json()
            if path == "/score":
                rewards = result["rewards"]
                assert len(rewards) == len(body["candidates"]) and all(math.isfinite(r) for r in rewards)
                assert sorted(result["ranking"]) == list(range(len(rewards)))
            else:
                for pair, r in zip(body.get("pairs", [body]), result.get("results", [result]), strict=True):
                    assert r["id"] == pair.get("id") and 0.0 <= r["p_chosen_better"] <= 1.0
                    assert math.isfinite(r["reward_chosen"]) and math.isfinite(r["reward_rejected"])

        scored_or_too_long()


# ----------------------------------------------------------------------------------------------
# Abuse cases test_serve.py lacks (it has: "{not json", a body over the limit declared and chunked,
# 9 candidates, a few wrong types, no token, a wrong token, Basic instead of Bearer)

JSON = {"content-type": "application/json"}
GOOD = b'{"prompt": "hi", "chosen": "hello", "rejected": "go away"}'


def _nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


NOT_JSON_BODIES = [
    # (id, path, raw body, headers, allowed statuses). 400: FastAPI could not parse the bytes at all.
    ("empty", "/compare", b"", JSON, {422}),
    ("truncated", "/compare", GOOD[:-9], JSON, {422}),
    ("trailing-garbage", "/compare", GOOD + b"}}", JSON, {422}),
    ("not-utf8", "/score", b'{"prompt": "\xc3\x28", "candidates": ["\xff"]}', JSON, {400, 422}),
    ("json-null", "/compare", b"null", JSON, {422}),
    ("json-string", "/score", b'"hi"', JSON, {422}),
    ("number-5000-digits", "/compare", b'{"prompt": 1' + b"0" * 5000 + b', "chosen": "a", "rejected": "b"}', JSON,
     {400, 422}),
    ("form-encoded", "/compare", b"prompt=hi&chosen=a&rejected=b", {"content-type": "application/x-www-form-urlencoded"},
     {422}),
    ("text-plain", "/compare", GOOD, {"content-type": "text/plain"}, {200, 415, 422}),
    # Python's JSON parser takes NaN and Infinity; FastAPI's 422 then echoed them, which JSON cannot carry: a 500.
    ("NaN", "/compare", b'{"prompt": NaN, "chosen": "a", "rejected": "b"}', JSON, {422}),
    ("Infinity", "/score", b'{"prompt": "hi", "candidates": [Infinity, -Infinity]}', JSON, {422}),
    ("bare-NaN", "/score", b"NaN", JSON, {422}),
    # A \ud800 escape is valid JSON but a lone surrogate: the tokenizer failed on it (500), as did echoing it.
    ("surrogate-prompt", "/compare", b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', JSON, {422}),
    ("surrogate-id", "/compare", b'{"prompt": "hi", "chosen": "a", "rejected": "b", "id": "\\udfff"}', JSON, {422}),
    ("surrogate-content", "/score", b'{"messages": [{"role": "user", "content": "x\\udc00"}], "candidates": ["a"]}',
     JSON, {422}),
    ("surrogate-candidate", "/score", b'{"prompt": "hi", "candidates": ["ok", "\\ud83d"]}', JSON, {422}),
    ("surrogate-key", "/compare", b'{"prompt": "hi", "chosen": "a", "rejected": "b", "\\ud800": 1}', JSON, {422}),
    ("surrogate-in-tools", "/compare", b'{"prompt": "hi", "chosen": "a", "rejected": "b", "tools": [{"x": ["\\ud800"]}]}',
     JSON, {422}),
    ("surrogate-in-arguments", "/score", b'{"prompt": "hi", "candidates": [{"role": "assistant", "tool_calls": '
     b'[{"function": {"name": "f", "arguments": "{\\"q\\": \\"\\\\ud800\\"}"}}]}]}', JSON, {422}),
    # A tool's name that is not text failed the service's size check before any validation: a 500.
    ("tool-name-list", "/score", b'{"prompt": "hi", "tools": [{"type": "function", "function": {"name": ["a"]}}], '
     b'"candidates": ["a"]}', JSON, {422}),
    ("tool-name-object", "/compare", b'{"prompt": "hi", "chosen": "a", "rejected": "b", "tools": [{"name": {"x": 1}}]}',
     JSON, {422}),
    # Nesting just under Python's recursion limit parsed, then the 422's echo of it overflowed: a 500.
    *[(f"nested-{d}", "/compare", _nested(d), JSON, {400, 422}) for d in (500, 900, 940, 950, 960, 980, 1000, 100_000)],
    *[(f"nested-{d}-in-prompt", "/compare", b'{"prompt": ' + _nested(d) + b', "chosen": "a", "rejected": "b"}', JSON,
       {400, 422}) for d in (900, 950, 960, 980)],
    *[(f"nested-{d}-in-tools", "/compare", b'{"prompt": "hi", "chosen": "a", "rejected": "b", "tools": [{"x": '
       + _nested(d) + b"}]}", JSON, {400, 422}) for d in (40, 900, 960)],
    ("nested-NaN", "/score", b'{"prompt": "hi", "candidates": ' + _nested(950, b"NaN") + b"}", JSON, {400, 422}),
    ("unclosed-100k", "/score", b"[" * 100_000, JSON, {400, 422}),
]


@pytest.mark.parametrize("path, body, headers, allowed", [b[1:] for b in NOT_JSON_BODIES],
                         ids=[b[0] for b in NOT_JSON_BODIES])
def test_bodies_that_are_not_plain_json_get_a_4xx(service, traffic, path, body, headers, allowed):
    with traffic.httpx_client("not plain JSON", service.url) as client:
        response = client.post(path, content=body, headers=headers)
    assert response.status_code in allowed, response.text[:1000]
    if response.status_code != 200:  # (not .json(): the 422 may echo nesting too deep for this stack to decode)
        assert response.text.startswith('{"detail":'), response.text[:1000]


WRONG_TYPES = [
    ("/score", {"prompt": "hi", "candidates": [1, 2]}, "candidates"),
    ("/score", {"prompt": "hi", "candidates": [None]}, "candidates"),
    ("/score", {"prompt": "hi", "candidates": [{"text": "a"}]}, "candidates"),
    ("/score", {"prompt": ["hi"], "candidates": ["a"]}, "prompt"),
    ("/score", {"messages": "hi", "candidates": ["a"]}, "messages"),
    ("/score", {"messages": [{"role": 1, "content": "hi"}], "candidates": ["a"]}, "role"),
    ("/score", {"messages": [{"role": "user", "content": None}], "candidates": ["a"]}, "content"),
    ("/score", {"messages": [["user", "hi"]], "candidates": ["a"]}, "messages"),
    ("/compare", {"pairs": {"prompt": "hi", "chosen": "a", "rejected": "b"}}, "pairs"),
    ("/compare", {"pairs": [1]}, "pairs"),
    ("/compare", {"pairs": []}, "pairs"),
    ("/compare", {"prompt": "hi", "chosen": "a", "rejected": "b", "id": 5}, "id"),
    ("/compare", {"prompt": True, "chosen": "a", "rejected": "b"}, "prompt"),
    ("/compare", {"prompt": "hi", "chosen": ["a"], "rejected": {"b": 1}}, "chosen"),
]


@pytest.mark.parametrize("path, body, field_name", WRONG_TYPES, ids=[f"{p}-{f}-{i}" for i, (p, _, f) in
                                                                     enumerate(WRONG_TYPES)])
def test_wrong_types_get_a_422_naming_the_field(service, traffic, path, body, field_name):
    with traffic.httpx_client("wrong types", service.url) as client:
        response = client.post(path, json=body)
    assert response.status_code == 422 and field_name in response.text, response.text


def test_thousands_of_candidates_or_pairs_are_refused_before_any_scoring(service, traffic):
    pair = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    started = time.monotonic()
    with traffic.httpx_client("thousands", service.url) as client:
        candidates = client.post("/score", json={"prompt": "hi", "candidates": ["an answer"] * 5000})
        tiny_candidates = client.post("/score", json={"prompt": "hi", "candidates": ["a"] * 150_000})  # ~750 KB
        pairs = client.post("/compare", json={"pairs": [pair] * 5000})
        one_huge_answer = client.post("/score", json={"prompt": "hi", "candidates": ["ok", "word " * 180_000]})  # ~900 KB
        turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2500 + [{"role": "user", "content": "c"}]
        messages = client.post("/compare", json={"pairs": [pair, {"messages": turns, "chosen": "d", "rejected": "e"}]})
        tools = client.post("/score", json={"prompt": "hi", "tools": [{"type": "function"}] * 5000, "candidates": ["a"]})
        still_fine = client.post("/score", json={"prompt": "hi", "candidates": ["a", "b"]})
    elapsed = time.monotonic() - started
    for response in (candidates, tiny_candidates):
        assert response.status_code == 413 and "max_candidates=8" in response.text, response.text[:300]
    assert pairs.status_code == 413 and "max_pairs=32" in pairs.text, pairs.text[:300]
    assert messages.status_code == 413 and "5001 messages at pairs.1.messages; the limit is 4096" in messages.text, \
        messages.text[:300]
    assert tools.status_code == 413 and "5000 tools at tools; the limit is 4096" in tools.text, tools.text[:300]
    assert one_huge_answer.status_code == 413 and "answers are never truncated" in one_huge_answer.text
    assert still_fine.status_code == 200, still_fine.text
    assert elapsed < 60, f"refusing oversized requests took {elapsed:.1f}s"


def test_health_is_answered_while_a_large_request_is_tokenized(service, traffic):
    """Templating and tokenizing run beside the HTTP replica's event loop (requests take turns on one thread):
    while a large request (a 900 KB prompt, cut to max_length) is tokenized, /health is answered at once."""
    from concurrent.futures import ThreadPoolExecutor

    def timed(client, method, path, **kwargs):
        started = time.monotonic()
        response = client.request(method, path, **kwargs)
        return response, time.monotonic() - started

    with traffic.httpx_client("beside a large request", service.url) as client, ThreadPoolExecutor(1) as background:
        large = background.submit(timed, client, "POST", "/score", json={"prompt": "word\n" * 150_000, "candidates": ["ok"]})
        time.sleep(0.3)
        health, health_s = timed(client, "GET", "/health")
        large, large_s = large.result()
    assert large.status_code == 200 and large.json()["truncated"], large.text[:300]
    assert health.status_code == 200 and health_s < large_s / 4, (health_s, large_s)


def test_one_overlong_candidate_is_refused_like_two(service, traffic):
    with traffic.httpx_client("thousands", service.url) as client:
        alone = client.post("/score", json={"prompt": "hi", "candidates": ["word " * 1000]})
    assert alone.status_code == 413 and "answers are never truncated" in alone.text, alone.text[:300]


AUTHORIZATION_HEADERS = [
    # (id, raw header value, status)
    ("lowercase-scheme", f"bearer {TOKEN}".encode(), 200),
    ("spaces-before-token", f"Bearer   {TOKEN}".encode(), 200),
    ("tab-separated", f"Bearer\t{TOKEN}".encode(), 401),
    ("prefix-of-token", f"Bearer {TOKEN[:4]}".encode(), 401),
    ("token-plus-one", f"Bearer {TOKEN}0".encode(), 401),
    ("scheme-only", b"Bearer", 401),
    ("no-space", f"Bearer{TOKEN}".encode(), 401),
    ("8k-token", b"Bearer " + b"t" * 8192, 401),
    ("latin1-bytes", b"Bearer t\xf6k\xe9n", 401),
    ("utf8-bytes", "Bearer tökén🔑".encode(), 401),
]


@pytest.mark.parametrize("value, status", [a[1:] for a in AUTHORIZATION_HEADERS],
                         ids=[a[0] for a in AUTHORIZATION_HEADERS])
def test_odd_authorization_headers(service, traffic, value, status):
    with traffic.httpx_client("odd Authorization", service.url, headers=None) as client:
        response = client.post("/compare", json={"prompt": "hi", "chosen": "a", "rejected": "b"},
                               headers=[(b"authorization", value)])
    assert response.status_code == status, response.text


def test_a_wrong_token_first_is_not_rescued_by_a_right_one_after(service, traffic):
    with traffic.httpx_client("odd Authorization", service.url, headers=None) as client:
        response = client.get("/info", headers=[("authorization", "Bearer wrong"), ("authorization", AUTH["Authorization"])])
        in_query = client.get("/info", params={"token": TOKEN, "access_token": TOKEN})
    assert response.status_code == 401 and in_query.status_code == 401


# ----------------------------------------------------------------------------------------------
# Last: what was sent


def test_traffic_summary(traffic, capsys):
    """Prints the counts (shown without -s) and checks the whole traffic: no 5xx anywhere, the fuzz
    reached the model, and the fuzz without a token got nothing but 401s from guarded routes."""
    if not traffic.runs:
        pytest.skip("no traffic recorded: this test reports on the tests above it in this module")
    report = traffic.report()
    with capsys.disabled():
        print("\n" + report, flush=True)
    assert not traffic.server_errors(), report
    with_token = traffic.runs.get("fuzz with token", Counter())
    assert sum(with_token.values()) >= 200, report
    assert any(status == 200 and path in ("/compare", "/score") for (_, path, status) in
               traffic.runs.get("well-formed, odd text", Counter())), report
    without = traffic.runs.get("fuzz without token", Counter())
    assert all(status == 401 for (_, path, status) in without if path in GUARDED), report
