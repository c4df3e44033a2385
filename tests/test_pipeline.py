"""The Ray Data pipeline on local Ray over real parquet shards, for every built-in processor and a
custom one; the output is checked against apply_chat_template directly."""

from __future__ import annotations

import gzip
import json
import os
import random
import textwrap

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from btrm.data import DataError
from btrm.processors import RowDropped, load_processor
from conftest import run_pipeline, write_parquet_shards

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def qwen(qwen_tokenizer_dir):
    return AutoTokenizer.from_pretrained(qwen_tokenizer_dir)


def assert_matches_template(row, pair, tokenizer, max_length=None):
    """Token ids of both sides equal apply_chat_template's (the prompt cut from the left if truncated)."""
    chosen = tokenizer.apply_chat_template(pair["chosen"], tokenize=True)["input_ids"]
    rejected = tokenizer.apply_chat_template(pair["rejected"], tokenize=True)["input_ids"]
    prompt, tail_c, tail_r = list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"])
    assert chosen[len(chosen) - len(tail_c):] == tail_c and rejected[len(rejected) - len(tail_r):] == tail_r
    if row["truncated"] == 0:
        assert prompt + tail_c == chosen and prompt + tail_r == rejected
    else:
        assert prompt == chosen[: len(chosen) - len(tail_c)][-len(prompt):]
        assert max(len(prompt) + len(tail_c), len(prompt) + len(tail_r)) == max_length
    assert tail_c[-1] == chosen[-1] and tail_c[-1] != tokenizer.pad_token_id  # the reward token


def test_standard_shards_match_apply_chat_template(hh_helpful, qwen, qwen_tokenizer_dir, tmp_path):
    pairs = hh_helpful["train"][:300]
    write_parquet_shards(pairs, tmp_path / "shards", shards=3, row_group_size=40)
    rows, ledger = run_pipeline(tmp_path / "shards", qwen_tokenizer_dir, max_length=256)
    identical = sum(p["chosen"] == p["rejected"] for p in pairs)
    assert ledger["rows_read"] == 300 and ledger["files"] == 3
    overlong = ledger["dropped"]["overlong"]  # answers that with their turn's opening alone exceed 256 tokens
    assert ledger["dropped"]["identical"] == identical and ledger["pairs"] == 300 - identical - overlong == len(rows)
    assert {reason for reason, count in ledger["dropped"].items() if count} <= {"identical", "overlong"}
    assert ledger["truncated"] > 0
    by_id = {p["id"]: p for p in pairs}
    for row in rows:
        pair = by_id[row["id"]]
        shard = int(row["file"].rsplit("part-", 1)[1].split(".")[0])
        assert pairs[shard * 100 + row["row"]] is pair  # the file and row point back at the source row
        assert_matches_template(row, pair, qwen, max_length=256)
    assert {r["truncated"] > 0 for r in rows} == {True, False}


def test_tool_use_pairs_from_parquet_match_apply_chat_template_with_their_tools(hh_helpful, qwen, qwen_tokenizer_dir,
                                                                               tmp_path):
    """Agent transcripts in OpenAI's layout (tool calls, tool replies, offered tools as a JSON string), stored as
    parquet struct columns beside plain pairs: each pair is templated with its own tools, and a malformed tool
    call costs only its row."""
    tools = [{"type": "function", "function": {"name": "search", "description": "Search the web",
              "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]
    rows, expected = [], []
    for k, pair in enumerate(hh_helpful["test"][:24]):
        question = pair["chosen"][-2]["content"]
        if k % 3:  # a plain pair, no tools
            rows.append(dict(pair, tools=None))
            expected.append((pair["chosen"], pair["rejected"], None))
            continue
        arguments = {"query": question[:60]}
        call = {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{k}", "type": "function", "function": {"name": "search", "arguments": json.dumps(arguments)}}]}
        reply = {"role": "tool", "content": f"Result {k}: {pair['chosen'][-1]['content'][:80]}", "tool_call_id": f"call_{k}"}
        prompt = pair["chosen"][:-1] + [call, reply]
        rows.append({"chosen": prompt + [pair["chosen"][-1]], "rejected": prompt + [pair["rejected"][-1]],
                     "tools": json.dumps(tools), "id": f"tool-{k}"})
        as_hf = [dict(m, content=m["content"] or "") for m in prompt]
        as_hf[-2]["tool_calls"] = [dict(c, function=dict(c["function"], arguments=arguments)) for c in call["tool_calls"]]
        expected.append((as_hf + [pair["chosen"][-1]], as_hf + [pair["rejected"][-1]], tools))
    broken = json.loads(json.dumps(rows[0]))
    broken["chosen"][-3]["tool_calls"][0]["function"]["arguments"] = "{query"
    broken["rejected"] = broken["chosen"][:-1] + [rows[0]["rejected"][-1]]
    write_parquet_shards(rows + [broken], tmp_path / "agents")
    out, ledger = run_pipeline(tmp_path / "agents", qwen_tokenizer_dir, max_length=4096)
    assert len(out) == ledger["pairs"] == len(rows) - sum(p["chosen"] == p["rejected"] for p in hh_helpful["test"][:24])
    [example] = ledger["examples"]
    assert (example["row"], example["field"]) == (len(rows), "chosen[{}].tool_calls[0].function.arguments".format(
        len(broken["chosen"]) - 3))
    for row in out:
        chosen, rejected, offered = expected[row["row"]]
        for side, conversation in (("chosen_ids", chosen), ("rejected_ids", rejected)):
            ids = qwen.apply_chat_template(conversation, tools=offered, tokenize=True)["input_ids"]
            assert list(row["prompt_ids"]) + list(row[side]) == ids
    assert sum("<tool_call>" in qwen.decode(row["prompt_ids"]) for row in out) == 8


def test_every_build_of_the_same_data_trains_in_the_same_order(hh_helpful, qwen_tokenizer_dir, tmp_path):
    """The training set as the driver builds it (pipeline, held-out split, seeded shuffle), built again as
    --resume builds it: the same pairs in the same order, so a resumed run skips exactly the steps it had
    trained. (Without preserve_order, the actors' finishing order leaked into the shuffle: about half of
    the rebuilds differed.)"""
    from btrm.config import TrainConfig
    from btrm.tokenize import TokenizationSpec
    from btrm.train import materialized_pairs, planned_pairs

    write_parquet_shards(hh_helpful["train"][:480], tmp_path / "shards", shards=3, row_group_size=40)
    config = TrainConfig(train_set_path=str(tmp_path / "shards"), num_data_workers=2, data_worker_cpus=0.5)
    builds = []
    for _ in range(4):
        planned = planned_pairs("train", config.train_set_path, qwen_tokenizer_dir, TokenizationSpec(max_length=256),
                                config, rows=None)
        train, _, held_out = materialized_pairs(*planned, config, hold_out=0.2, shuffle=True)
        builds.append(([row["id"] for row in train.iter_rows()], [row["id"] for row in held_out.iter_rows()]))
    assert len(builds[0][0]) > 300 and len(builds[0][1]) > 40
    assert all(build == builds[0] for build in builds[1:])


def test_glob_and_jsonl_read_the_same_pairs(hh_helpful, qwen_tokenizer_dir, tmp_path, monkeypatch):
    """The JSON lines in byte-range pieces, as a large file is read (here pieces of 16 KiB: five tasks' work)."""
    import btrm.sources

    pairs = hh_helpful["test"][:60]
    write_parquet_shards(pairs, tmp_path / "a", shards=2)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs) + "\n")
    monkeypatch.setattr(btrm.sources, "JSON_BYTES_PER_FRAGMENT", 16 << 10)
    assert len(btrm.sources.plan_fragments(str(tmp_path / "pairs.jsonl"))) >= 4
    from_glob, _ = run_pipeline(str(tmp_path / "a" / "part-*.parquet"), qwen_tokenizer_dir)
    from_jsonl, ledger = run_pipeline(tmp_path / "pairs.jsonl", qwen_tokenizer_dir)
    strip = lambda rows: sorted((r["id"], tuple(r["prompt_ids"]), tuple(r["chosen_ids"])) for r in rows)
    assert strip(from_glob) == strip(from_jsonl) and len(from_glob) > 50
    line = {pair["id"]: k for k, pair in enumerate(pairs)}
    assert all(row["row"] == line[row["id"]] for row in from_jsonl) and ledger["rows_read"] == 60


def test_a_cloud_source_opens_every_file_with_the_credentials_and_options_of_its_uri(qwen_tokenizer_dir, hh_helpful,
                                                                                      s3_server):
    """An S3 server on 127.0.0.1 (moto): the source URI names the endpoint, scheme and region as options and
    carries credentials. The readers of each file (Ray Data tasks) must open it with them too, not reach
    for AWS, and no path, error or ledger shows the secret."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from btrm.sources import SourceError, plan_fragments

    s3, options, secret = s3_server.filesystem, s3_server.options, s3_server.credentials.split(":")[1]
    s3.create_dir("pairs")
    pairs = hh_helpful["train"][:30]
    pq.write_table(pa.Table.from_pylist(pairs[:20]), "pairs/hh/part-0.parquet", filesystem=s3)
    with s3.open_output_stream("pairs/hh/part-1.jsonl") as f:
        f.write("".join(json.dumps(pair) + "\n" for pair in pairs[20:]).encode())
    # A glob names the data: the parquet and the JSON lines both.
    rows, ledger = run_pipeline(f"s3://{s3_server.credentials}@pairs/hh/part-*?{options}", qwen_tokenizer_dir)
    with pytest.raises(SourceError) as missing:
        plan_fragments(f"s3://{s3_server.credentials}@pairs/elsewhere?{options}")
    assert ledger["rows_read"] == 30 and len(rows) == ledger["pairs"] > 25
    assert {row["file"] for row in rows} == {"s3://pairs/hh/part-0.parquet", "s3://pairs/hh/part-1.jsonl"}
    assert str(missing.value).startswith("s3://pairs/elsewhere: no such file or directory")
    assert secret not in str(missing.value) + json.dumps(ledger, default=str)


def test_directories_and_globs_leave_out_hidden_files_and_wildcards_stay_in_their_folder(tmp_path, capsys):
    from btrm.sources import SourceError, list_data_files

    for name in ("train.jsonl", "sub/more.jsonl", ".ipynb_checkpoints/train-checkpoint.jsonl",
                 "_temporary/0/part-0.jsonl", ".hidden.jsonl", "sub/_partial.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    found = lambda source: [os.path.relpath(f.path, tmp_path) for f in list_data_files(str(source))]  # noqa: E731
    assert found(tmp_path) == ["sub/more.jsonl", "train.jsonl"]
    assert found(tmp_path / "*.jsonl") == ["train.jsonl"]  # not the same names one folder down
    assert found(tmp_path / "**" / "*.jsonl") == ["sub/more.jsonl", "train.jsonl"]
    assert found(tmp_path / ".ipynb_checkpoints" / "*.jsonl") == [".ipynb_checkpoints/train-checkpoint.jsonl"]
    assert found(tmp_path / "*" / "_*.jsonl") == ["sub/_partial.jsonl"]  # named, a hidden name is read
    # Parquet shards with a JSON file beside them (metadata, most likely): which is data is asked, not guessed.
    shards = tmp_path / "shards"
    for name in ("part-0.parquet", "part-1.parquet", "dataset_info.json"):
        (shards / name).parent.mkdir(exist_ok=True)
        (shards / name).write_text("{}\n")
    with pytest.raises(SourceError, match=r"mixes 2 parquet and 1 JSON file\(s\) \(.*dataset_info.json\); name the data "
                                          r"with a glob, e.g. .*shards/\*\*/\*.parquet"):
        list_data_files(str(shards))
    assert found(shards / "**" / "*.parquet") == ["shards/part-0.parquet", "shards/part-1.parquet"]
    # What symbolic links lead to is read once: a folder linked beside itself, a link to a folder above (a loop).
    linked = tmp_path / "linked"
    (linked / "v3").mkdir(parents=True)
    (linked / "v3" / "part-0.jsonl").write_text("{}\n")
    (linked / "latest").symlink_to("v3")
    (linked / "v3" / "up").symlink_to("..")
    capsys.readouterr()
    assert found(linked) == found(linked / "**" / "*.jsonl") == ["linked/latest/part-0.jsonl"]
    assert f"{linked}: 2 folder(s) or file(s) lead where an earlier one did (symbolic links), not read again: " \
           f"{linked}/v3, " in capsys.readouterr().out
    # A file linked beside itself too (its pairs would train twice); a broken link that is no data file (a README
    # copied without its target) does not stop the folder, one that is data does (tests/test_bad_input.py).
    files = tmp_path / "files"
    files.mkdir()
    (files / "train.jsonl").write_text("{}\n")
    (files / "latest.jsonl").symlink_to("train.jsonl")
    (files / "README.md").symlink_to("../docs/README.md")
    assert found(files) == found(files / "*.jsonl") == ["files/latest.jsonl"]
    assert f"1 folder(s) or file(s) lead where an earlier one did (symbolic links), not read again: {files}/train.jsonl" \
        in capsys.readouterr().out
    # A name holding a wildcard's characters is read as written where it exists, a pattern elsewhere.
    (tmp_path / "pairs[v2]").mkdir()
    (tmp_path / "pairs[v2]" / "a.jsonl").write_text("{}\n")
    assert found(tmp_path / "pairs[v2]") == found(tmp_path / "pairs[[]v2]" / "*.jsonl") == ["pairs[v2]/a.jsonl"]
    # A folder the pattern names is read as a directory: Spark writes `train.parquet` as a folder of parts.
    for name in ("spark/train.parquet/part-0.parquet", "spark/train.parquet/_SUCCESS", "spark/train.parquet/.part-0.crc",
                 "spark/test.parquet/part-0.parquet", "spark/notes.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    assert found(tmp_path / "spark" / "*.parquet") == ["spark/test.parquet/part-0.parquet", "spark/train.parquet/part-0.parquet"]
    assert found(tmp_path / "spark" / "t*") == ["spark/test.parquet/part-0.parquet", "spark/train.parquet/part-0.parquet"]


def test_uri_sources_show_their_files_as_given_and_open_them_where_they_are(tmp_path, capsys):
    """A URI source (file:// here: the path s3://, gs://, hdfs:// and abfs:// sources take) names each file under
    the URI the user gave, and its readers open it in that URI's filesystem; a directory says which files it
    does not read. A URI's user part is a secret only with a password in it: abfs's container and hdfs's user
    say where the data is."""
    from btrm.sources import Fragment, _opened, list_data_files, plan_fragments, read_fragment, without_credentials

    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "sub" / "a.JSONL").write_text('{"n": 1}\n')
    (tmp_path / "data" / "sub" / "c d.JSONL.GZ").write_bytes(gzip.compress(b'{"n": 3}\n'))
    (tmp_path / "data" / "b.jsonl.zst").write_bytes(pa.Codec("zstd").compress(b'{"n": 2}\n', asbytes=True))
    (tmp_path / "data" / "notes.md").write_text("how the pairs were made")
    uri = f"file://{tmp_path}/data"
    assert [f.path for f in list_data_files(uri)] == [f"{uri}/b.jsonl.zst", f"{uri}/sub/a.JSONL", f"{uri}/sub/c d.JSONL.GZ"]
    assert f"{uri}: 1 file(s) neither parquet nor JSON, not read: {uri}/notes.md" in capsys.readouterr().out
    fragments = plan_fragments(f"{uri}/*/*.JSONL*")
    assert [rows for f in fragments for _, rows in read_fragment(f, 10)] == [[{"n": 1}], [{"n": 3}]]
    # pyarrow decodes a URI's %20; the files are still shown under the URI as given.
    assert [f.path for f in list_data_files(f"{uri}/*/c%20*")] == [f"{uri}/sub/c d.JSONL.GZ"]
    container = "abfs://pairs@account.dfs.core.windows.net/hh"
    assert without_credentials(container) == container
    assert without_credentials("hdfs://alice@namenode:8020/hh") == "hdfs://alice@namenode:8020/hh"
    assert without_credentials("abfs://:K3Y@account.dfs.core.windows.net/pairs") == "abfs://***@account.dfs.core.windows.net/pairs"
    filesystem, location = _opened(Fragment(f"{container}/part-0.parquet", "parquet", location="pairs/hh/part-0.parquet",
                                            source=container))
    assert filesystem.__reduce__()[1][0]["account_name"] == "account" and location == "pairs/hh/part-0.parquet"


def helpsteer3_rows(pairs, seed=0):
    """Real pairs in both HelpSteer3 layouts, with ties and missing labels mixed in."""
    rng = random.Random(seed)
    rm_gallery, native = [], []
    for i, p in enumerate(pairs):
        prompt, good, bad = p["chosen"][:-1], p["chosen"][-1], p["rejected"][-1]
        labels = [True, None] if i % 10 == 0 else [True, True] if i % 10 == 1 else [True, False]
        # RM-Gallery's DataOutput: the answer is a Step, holding its label.
        outputs = [{"answer": {**answer, "label": {"is_preferred": label}}} for answer, label in zip((good, bad), labels)]
        rm_gallery.append({"id": p["id"], "input": prompt, "output": outputs[:: rng.choice([1, -1])]})
        strength = 0 if i % 10 == 2 else None if i % 10 == 3 else rng.choice([1, 2, 3])
        first_better = rng.random() < 0.5
        native.append({"id": p["id"], "context": prompt, "domain": "general",
                       "response1": (good if first_better else bad)["content"],
                       "response2": (bad if first_better else good)["content"],
                       "overall_preference": None if strength is None else (-strength if first_better else strength)})
    return rm_gallery, native


def test_held_out_split_keeps_each_question_on_one_side():
    """--eval_split_ratio: about that share of the questions, all of their pairs, on the held-out side; every
    pair on exactly one side, in order; the same seed, the same split."""
    import ray.data

    from btrm.data import question_key, split_by_question

    rows = [{"id": f"pair-{k}", "question_key": question_key(f"question {k // 3}")} for k in range(900)]  # 3 a question
    dataset = ray.data.from_items(rows, override_num_blocks=4).materialize()

    def split(seed: int) -> tuple[list[dict], list[dict]]:
        rest, held_out = split_by_question(dataset, 0.2, seed)
        return rest.take_all(), held_out.take_all()

    rest, held_out = split(42)
    assert sorted(r["id"] for r in rest + held_out) == sorted(r["id"] for r in rows)  # each pair once
    assert not {r["question_key"] for r in rest} & {r["question_key"] for r in held_out}
    assert 0.12 < len({r["question_key"] for r in held_out}) / 300 < 0.28
    assert split(42) == (rest, held_out) and split(7)[1] != held_out


def test_questions_opening_with_one_long_template_are_held_out_one_by_one(hh_helpful, qwen_tokenizer_dir, tmp_path):
    """Every question opens with the same 300-character instruction, past the 200 characters a question is
    shown with: the split still goes question by question (it went by the shown text, and all were one)."""
    from btrm.config import TrainConfig
    from btrm.tokenize import TokenizationSpec
    from btrm.train import materialized_pairs, planned_pairs

    template = ("Read the conversation so far, then answer the user's last message as a careful, honest and "
                "helpful assistant would. ") * 3
    assert len(template) > 300
    pairs = []
    for pair in hh_helpful["train"][:120]:
        prompt = pair["chosen"][:-2] + [{"role": "user", "content": template + pair["chosen"][-2]["content"]}]
        pairs.append(dict(pair, chosen=prompt + pair["chosen"][-1:], rejected=prompt + pair["rejected"][-1:]))
    write_parquet_shards(pairs, tmp_path / "shards")
    config = TrainConfig(train_set_path=str(tmp_path / "shards"), num_data_workers=1, data_worker_cpus=0.5)
    planned = planned_pairs("train", config.train_set_path, qwen_tokenizer_dir, TokenizationSpec(max_length=512),
                            config, rows=None)
    rest, _, held_out = materialized_pairs(*planned, config, hold_out=0.25, shuffle=True)
    rest, held_out = list(rest.iter_rows()), list(held_out.iter_rows())
    assert {r["question"][:100] for r in rest + held_out} == {" ".join(template.split())[:100]}
    question = {p["id"]: p["chosen"][-2]["content"] for p in pairs}
    trained, evaluated = {question[r["id"]] for r in rest}, {question[r["id"]] for r in held_out}
    assert not trained & evaluated
    assert 0.1 < len(evaluated) / len(trained | evaluated) < 0.4


def test_helpsteer3_both_layouts(hh_helpful, qwen, qwen_tokenizer_dir, tmp_path):
    pairs = [p for p in hh_helpful["train"][:200] if p["chosen"] != p["rejected"]]
    rm_gallery, native = helpsteer3_rows(pairs)
    by_id = {p["id"]: p for p in pairs}
    for name, rows_in, margins in (("rm_gallery", rm_gallery, False), ("native", native, True)):
        write_parquet_shards(rows_in, tmp_path / name, shards=2)
        rows, ledger = run_pipeline(tmp_path / name, qwen_tokenizer_dir, dataset_format="helpsteer3")
        ties = sum(i % 10 in ((1,) if name == "rm_gallery" else (2,)) for i in range(len(pairs)))
        missing = sum(i % 10 in ((0,) if name == "rm_gallery" else (3,)) for i in range(len(pairs)))
        assert ledger["dropped"]["tie"] == ties and ledger["dropped"]["missing_label"] == missing
        assert ledger["pairs"] == len(pairs) - ties - missing == len(rows)
        assert ledger["with_margin"] == (len(rows) if margins else 0)  # what --use_margin checks
        assert ledger["unread_fields"] == []  # each layout's fields are the processor's
        for row in rows:
            assert_matches_template(row, by_id[row["id"]], qwen)  # the preferred answer is the chosen one
            assert row["margin"] in ((1, 2, 3) if margins else (0,))


def test_pairs_without_an_id_are_named_by_file_row_and_pair(qwen_tokenizer_dir, tmp_path):
    question = [{"role": "user", "content": "Name a prime number."}]
    answers = [("Seven.", True), ("Nine.", False), ("Four.", False)]
    row = {"input": question, "output": [{"answer": {"role": "assistant", "content": text}, "label": {"is_preferred": good}}
                                         for text, good in answers]}
    single = {"input": question, "output": [{"answer": {"role": "assistant", "content": text}, "label": {"is_preferred": good}}
                                            for text, good in answers[:2]]}
    for folder in ("a", "b"):  # the same file name in two folders of one source
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "part.jsonl").write_text(json.dumps(row) + "\n" + json.dumps(single) + "\n")
    rows, _ = run_pipeline(tmp_path, qwen_tokenizer_dir, dataset_format="helpsteer3")
    ids = [r["id"] for r in rows]
    assert ids == [f"{tmp_path / folder / 'part.jsonl'}:{place}" for folder in ("a", "b") for place in ("0/0", "0/1", "1")]


def test_a_copy_of_the_chosen_answer_costs_its_own_pair_not_the_rows_others(qwen_tokenizer_dir, tmp_path):
    question = [{"role": "user", "content": "Name a prime number."}]
    answers = [("Seven.", True), ("Nine.", False), ("Seven.", False)]
    row = {"input": question, "output": [{"answer": {"role": "assistant", "content": text}, "label": {"is_preferred": good}}
                                         for text, good in answers]}
    (tmp_path / "part.jsonl").write_text(json.dumps(row) + "\n")
    rows, ledger = run_pipeline(tmp_path, qwen_tokenizer_dir, dataset_format="helpsteer3")
    assert [(r["id"], r["row"]) for r in rows] == [(f"{tmp_path / 'part.jsonl'}:0/0", 0)]
    assert ledger["rows_read"] == 1 and ledger["pairs"] == 1 and ledger["dropped"]["identical"] == 1
    [example] = ledger["examples"]
    assert example["reason"] == "identical" and example["row"] == 0


def test_hh_rlhf_transcripts_straight_from_the_gzip_file(shared_data, qwen, qwen_tokenizer_dir):
    path = shared_data / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    rows, ledger = run_pipeline(path, qwen_tokenizer_dir, dataset_format="hh_rlhf", max_length=512)
    assert ledger["rows_read"] == 2312 and ledger["pairs"] == len(rows) > 2200
    with gzip.open(path, "rt") as f:
        source = [json.loads(line) for line in f]
    hh = load_processor("hh_rlhf")
    for row in rows[::50]:
        [pair] = hh.pairs(source[row["row"]])
        assert_matches_template(row, pair, qwen, max_length=512)


def test_fields_the_processor_does_not_read_are_named_in_the_ledger(hh_helpful, qwen_tokenizer_dir, tmp_path):
    """A misspelt optional field would otherwise be ignored without a word (as HF's Trainer names the columns
    it ignores). In JSONL, rows differ in their fields: every row's count."""
    from btrm.data import format_ledger

    pairs = hh_helpful["train"][:12]
    write_parquet_shards(pairs, tmp_path / "plain")
    _, ledger = run_pipeline(tmp_path / "plain", qwen_tokenizer_dir)
    assert ledger["unread_fields"] == [] and "ignored fields" not in format_ledger(ledger)
    typo = tmp_path / "typo.jsonl"
    typo.write_text("".join(json.dumps({**p, "margn": 1.0} if k == 7 else {**p, "prompt_id": str(k)}) + "\n"
                            for k, p in enumerate(pairs)))
    _, ledger = run_pipeline(typo, qwen_tokenizer_dir)
    assert ledger["unread_fields"] == ["margn", "prompt_id"] and ledger["with_margin"] == 0
    assert "ignored fields (the processor does not read them): margn, prompt_id" in format_ledger(ledger)


def test_custom_processor_from_a_file(hh_helpful, qwen, qwen_tokenizer_dir, tmp_path):
    path = tmp_path / "qa.py"
    path.write_text(textwrap.dedent('''
        from btrm.processors import BaseBradleyTerryTrainDataset

        class QuestionAnswers(BaseBradleyTerryTrainDataset):
            required_fields = ("question", "better", "worse")

            def convert(self, row):
                prompt = [{"role": "user", "content": row["question"]}]
                return {"chosen": prompt + [{"role": "assistant", "content": row["better"]}],
                        "rejected": prompt + [{"role": "assistant", "content": row["worse"]}],
                        "id": row["key"], "source": "qa"}
    '''))
    pairs = [{**p, "chosen": p["chosen"][-2:], "rejected": p["rejected"][-2:]}  # the last question and its answers
             for p in hh_helpful["test"][:40] if p["chosen"] != p["rejected"]]
    source = [{"key": p["id"], "question": p["chosen"][0]["content"], "better": p["chosen"][1]["content"],
               "worse": p["rejected"][1]["content"]} for p in pairs]
    write_parquet_shards(source, tmp_path / "qa")
    rows, ledger = run_pipeline(tmp_path / "qa", qwen_tokenizer_dir, dataset_format="QuestionAnswers",
                                custom_bt_dataset_path=str(path))
    assert ledger["pairs"] == len(pairs) == len(rows) > 5
    assert ledger["unread_fields"] == []  # a processor that does not declare what it reads is not second-guessed
    by_id = {p["id"]: p for p in pairs}
    for row in rows:
        assert row["source"] == "qa"
        assert_matches_template(row, by_id[row["id"]], qwen)

    # Each process running the data tasks keeps its preprocessor for the next dataset: an edited processor
    # file is loaded anew, not served from that cache.
    path.write_text(path.read_text().replace('"source": "qa"', '"source": "qa, edited"'))
    os.utime(path, ns=(path.stat().st_mtime_ns + 10**9,) * 2)  # a later time, whatever the file system's resolution
    rows, _ = run_pipeline(tmp_path / "qa", qwen_tokenizer_dir, dataset_format="QuestionAnswers",
                           custom_bt_dataset_path=str(path))
    assert len(rows) == len(pairs) and {row["source"] for row in rows} == {"qa, edited"}

    # A subclass of a built-in processor that reads a column of its own gets it from parquet too (it inherits the
    # built-in's read_fields, which do not name it: that column was left unread, every row a KeyError).
    path.write_text(textwrap.dedent('''
        from btrm.processors import StandardDataset

        class WithSystem(StandardDataset):
            def convert(self, row):
                pair, system = super().convert(row), [{"role": "system", "content": row["system"]}]
                return {**pair, "chosen": system + pair["chosen"], "rejected": system + pair["rejected"]}
    '''))
    write_parquet_shards([{**p, "system": "Be brief."} for p in pairs], tmp_path / "with-system")
    rows, ledger = run_pipeline(tmp_path / "with-system", qwen_tokenizer_dir, dataset_format="WithSystem",
                                custom_bt_dataset_path=str(path))
    assert ledger["pairs"] == len(pairs) == len(rows) and ledger["unread_fields"] == []
    for row in rows:
        pair = by_id[row["id"]]
        assert_matches_template(row, {key: [{"role": "system", "content": "Be brief."}] + pair[key]
                                      for key in ("chosen", "rejected")}, qwen)


def test_the_ledger_judges_a_runs_first_2000_rows_once_and_a_retried_batch_replaces_its_report():
    """Every batch waits for its record: the early check keeps running counts rather than summing every report
    again (quadratic in the data: minutes at a million rows). It judges once, when 2000 rows are in: a bad stretch
    later on is judged with all the data, at the end (an evaluation has written its scores by then). A batch
    Ray Data runs again (a retried task) reports under the same key and must not count twice."""
    import ray

    from btrm.data import DROP_REASONS, LedgerReport, new_ledger

    def report(pairs: int, invalid: int, ties: int = 0) -> LedgerReport:
        return LedgerReport(rows_read=pairs + invalid + ties, pairs=pairs,
                            dropped={**dict.fromkeys(DROP_REASONS, 0), "invalid": invalid, "tie": ties})

    ledger = new_ledger("early", 0.1)
    assert ray.get(ledger.record.remote(("a.parquet", 0), report(900, 100))) is None  # 1,000 rows: too few to judge
    assert ray.get(ledger.record.remote(("a.parquet", 0), report(900, 100))) is None  # retried: replaces
    assert ray.get(ledger.record.remote(("a.parquet", 1000), report(1000, 0))) is None  # 5% of 2,000: judged, kept on
    # Ties hold no preference by design: not a fault of the data, and not counted against the limit.
    assert ray.get(ledger.record.remote(("t.parquet", 0), report(700, 0, ties=1000))) is None
    assert ray.get(ledger.record.remote(("b.parquet", 0), report(700, 300))) is None  # 10.8% so far: the end decides
    assert ray.get(ledger.record.remote(("c.parquet", 0), report(3000, 0))) is None  # (5.7% in the end)
    summary = ray.get(ledger.summary.remote())
    assert (summary["rows_read"], summary["pairs"], summary["dropped_total"], summary["files"]) == (7700, 6300, 1400, 4)
    assert summary["drop_fraction"] == round(400 / 6700, 6)

    bad_start = new_ledger("bad-start", 0.1)
    assert ray.get(bad_start.record.remote(("a.parquet", 0), report(1200, 300))) is None
    assert ray.get(bad_start.record.remote(("a.parquet", 1500), report(400, 100))) == (
        "bad-start: 400 of 2000 pairs dropped in the first 2000 rows read (20.0%, ties aside) > --max_drop_fraction "
        "10.0%")
    assert ray.get(bad_start.record.remote(("b.parquet", 0), report(5000, 0))) is not None  # (a retried task too)


def test_too_many_drops_fail_the_run_with_the_ledger(hh_helpful, qwen_tokenizer_dir, tmp_path, capsys):
    pairs = hh_helpful["test"][:40]
    broken = [{**p, "rejected": p["rejected"][:-1]} if i % 2 else p for i, p in enumerate(pairs)]
    write_parquet_shards(broken, tmp_path / "half-broken")
    capsys.readouterr()
    with pytest.raises(DataError) as error:
        run_pipeline(tmp_path / "half-broken", qwen_tokenizer_dir, max_drop_fraction=0.05)
    assert str(error.value) == ("test: 50.0% of pairs dropped (ties aside) > --max_drop_fraction 5.0%; fix the data or "
                                "raise the limit (the ledger above)")
    # The ledger, printed once (the job's output ends with the message, not a second copy).
    printed = capsys.readouterr().out
    assert printed.count("rows read from") == 1 and "invalid 20" in printed
    assert "part-00000.parquet row 1: field 'rejected" in printed
