"""Malformed input: every kind gets an error naming its place, or is dropped and counted; none takes the
other rows down."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from btrm.data import DataError
from btrm.sources import Fragment, SourceError, plan_fragments, read_fragment
from conftest import run_pipeline

pytestmark = pytest.mark.usefixtures("ray_session")

Q = [{"role": "user", "content": "Name a prime number."}]
A = {"role": "assistant", "content": "Seven."}
B = {"role": "assistant", "content": "Nine."}

# (what is wrong, row, drop reason, words the message must hold)
MALFORMED = [
    ("missing field", {"chosen": Q + [A], "rejected": None}, "invalid", "field 'rejected': missing"),
    ("empty content", {"chosen": Q + [{"role": "assistant", "content": ""}], "rejected": Q + [B]}, "invalid",
     "field 'chosen[1].content': is empty"),
    ("unknown role", {"chosen": [{"role": "human", "content": "hi"}, A], "rejected": [{"role": "human", "content": "hi"}, B]},
     "invalid", "field 'chosen[0].role': unknown role 'human'"),
    ("no assistant answer", {"chosen": Q, "rejected": Q + [B]}, "invalid", "needs a prompt and an answer"),
    ("prompts differ", {"chosen": Q + [A], "rejected": [{"role": "user", "content": "Another?"}, B]}, "invalid",
     "share the same prompt"),
    ("identical answers", {"chosen": Q + [A], "rejected": Q + [A]}, "identical", "answers are the same"),
    ("answers the template renders alike", {"chosen": Q + [A], "rejected": Q + [{"role": "assistant", "content": "\n\nSeven."}]},
     "identical", "template to the same tokens"),
    ("negative margin", {"chosen": Q + [A], "rejected": Q + [B], "margin": -1.0}, "invalid", "field 'margin'"),
    ("infinite margin", {"chosen": Q + [A], "rejected": Q + [B], "margin": float("inf")}, "invalid", "field 'margin'"),
    ("far over max_length", {"chosen": Q + [{"role": "assistant", "content": "word " * 5000}], "rejected": Q + [B]},
     "overlong", "answers are never truncated"),
    ("answers share an opening over max_length", {"chosen": Q + [{"role": "assistant", "content": "word " * 600 + "7"}],
                                                  "rejected": Q + [{"role": "assistant", "content": "word " * 600 + "9"}]},
     "overlong", "with their shared opening take"),
]


def test_each_malformed_row_is_dropped_counted_and_named(qwen_tokenizer_dir, tmp_path, capsys):
    good = [{"chosen": Q + [A], "rejected": Q + [B], "margin": 1.0, "extra": "ignored"}] * 5
    rows = good[:2] + [row for _, row, _, _ in MALFORMED] + good[2:]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mixed.parquet")
    kept, ledger = run_pipeline(tmp_path / "mixed.parquet", qwen_tokenizer_dir, max_length=512)
    with capsys.disabled():  # the counts show in CI's log
        print(f"\nbad-input corpus: {ledger['rows_read']} rows, {ledger['pairs']} kept, dropped "
              f"{ {k: v for k, v in ledger['dropped'].items() if v} }")
    assert len(kept) == ledger["pairs"] == 5  # the good rows all survive, around the bad ones
    assert ledger["rows_read"] == len(rows)
    examples = {e["row"]: e for e in ledger["examples"]}
    for offset, (what, _, reason, words) in enumerate(MALFORMED):
        example = examples[2 + offset]
        assert example["reason"] == reason, what
        assert words in example["message"], (what, example["message"])
        assert example["file"].endswith("mixed.parquet")
    expected = {}
    for _, _, reason, _ in MALFORMED:
        expected[reason] = expected.get(reason, 0) + 1
    assert {k: v for k, v in ledger["dropped"].items() if v} == expected


def test_invalid_utf8_and_broken_json_lines_only_cost_their_own_row(qwen_tokenizer_dir, tmp_path):
    bad = pa.array([b"pair-0", b"\xff\xfe not text", b"pair-2"], pa.binary())
    ids = pa.Array.from_buffers(pa.string(), 3, bad.buffers())
    rows = [{"chosen": Q + [{"role": "assistant", "content": "x" + str(i)}], "rejected": Q + [B]} for i in range(3)]
    # Columns the processor does not read are never decoded: invalid UTF-8 there, or a date past Python's year
    # 9999 (a database's "infinity"), costs no row.
    created = pa.array([0, 1, 2**31 - 1], pa.int32()).cast(pa.date32())
    table = pa.Table.from_pylist(rows).append_column("id", ids).append_column("notes", ids).append_column("created", created)
    pq.write_table(table, tmp_path / "utf8.parquet")
    kept, ledger = run_pipeline(tmp_path / "utf8.parquet", qwen_tokenizer_dir)
    assert ledger["pairs"] == 2 and ledger["dropped"]["invalid"] == 1 and ledger["unread_fields"] == ["created", "notes"]
    [example] = ledger["examples"]
    assert (example["row"], example["field"]) == (1, "id") and "cannot be decoded" in example["message"]
    # Read (a processor that declares no read_fields reads every column), each costs its own row, named.
    [(_, decoded)] = read_fragment(Fragment(str(tmp_path / "utf8.parquet"), "parquet", row_groups=(0,), num_rows=3), 10)
    assert [getattr(row, "field", None) for row in decoded] == [None, "id", "created"]

    # Valid JSON escapes of a lone surrogate (text cut inside an emoji), in an answer and in an id.
    cut_emoji = {"chosen": Q + [{"role": "assistant", "content": "Seven \ud83d"}], "rejected": Q + [B]}
    cut_call = {"chosen": Q + [{"role": "assistant", "tool_calls": [{"function": {"name": "f\ud800"}}]}],
                "rejected": Q + [B]}
    lines = [json.dumps(rows[0]), '{"chosen": [truncated', "", json.dumps(rows[2]), "[1, 2]", json.dumps(cut_emoji),
             json.dumps({**rows[1], "id": "pair-\udc00"}), json.dumps(cut_call),
             '{"margin": ' + "9" * 5000 + "}", '{"chosen": ' + "[" * 100_000 + "]" * 100_000 + "}"]  # json: no int, no recursion
    (tmp_path / "lines.jsonl").write_text("\n".join(lines) + "\n")
    kept, ledger = run_pipeline(tmp_path / "lines.jsonl", qwen_tokenizer_dir)
    assert ledger["pairs"] == 2 and ledger["dropped"]["invalid"] == 7
    assert [e["row"] for e in ledger["examples"]] == [1, 4, 5, 6, 7, 8, 9]  # 0-based line numbers; the blank line is no row
    assert all("not valid JSON" in ledger["examples"][k]["message"] for k in (0, 5, 6))
    assert [e["field"] for e in ledger["examples"][2:5]] == ["chosen[1].content", "id", "chosen[1].tool_calls[0].function.name"]
    assert all("not valid Unicode text" in e["message"] for e in ledger["examples"][2:5])


def test_a_pair_holding_a_token_past_the_embedding_is_dropped_naming_it(qwen_tokenizer_dir, tmp_path):
    """A special token the model has no embedding row for (Gemma 3's image placeholder), written into the
    text: that pair is invalid (its forward would fail, on a GPU as a device-side assert), the rest train."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_dir)
    rows = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    pairs = [{"chosen": Q + [{"role": "assistant", "content": f"Seven, {i}."}], "rejected": Q + [B]} for i in range(3)]
    pairs.insert(1, {"chosen": Q + [{"role": "assistant", "content": "See <image_soft_token>."}], "rejected": Q + [B]})
    pq.write_table(pa.Table.from_pylist(pairs), tmp_path / "pairs.parquet")
    kept, ledger = run_pipeline(tmp_path / "pairs.parquet", str(tmp_path / "tokenizer"), embedding_rows=rows)
    assert [r["row"] for r in kept] == [0, 2, 3] and ledger["dropped"]["invalid"] == 1
    [example] = ledger["examples"]
    assert example["row"] == 1 and f"'<image_soft_token>' (id {rows}); its embedding has {rows} rows" in example["message"]


def test_files_that_cannot_be_read_fail_early_naming_the_file(hh_helpful, tmp_path):
    pq.write_table(pa.Table.from_pylist(hh_helpful["test"][:20]), tmp_path / "whole.parquet")
    data = (tmp_path / "whole.parquet").read_bytes()
    (tmp_path / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "text.parquet").write_text("chosen,rejected\na,b\n")
    pq.write_table(pa.table({"prompt": ["q"], "answer": ["a"]}), tmp_path / "schema.parquet")
    pq.write_table(pa.Table.from_arrays([pa.array(["a"])] * 3, ["chosen", "rejected", "chosen"]), tmp_path / "twice.parquet")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "arrow_dir").mkdir()
    (tmp_path / "arrow_dir" / "data-00000-of-00001.arrow").write_bytes(b"")  # a datasets cache, say
    cases = {
        "truncated.parquet": "not a readable parquet file",
        "empty.parquet": "not a readable parquet file",
        "text.parquet": "not a readable parquet file",
        "schema.parquet": "missing column(s) ['chosen', 'rejected']; the file has ['answer', 'prompt']",
        "twice.parquet": "column(s) ['chosen'] appear more than once; rename them apart",
        "empty_dir": "the directory holds no data files",
        "arrow_dir": f"the directory holds no data files (.parquet, .pq, .jsonl, .jsonl.gz, .jsonl.bz2, .jsonl.zst, "
                     f".json, .json.gz, .json.bz2, .json.zst); it holds {tmp_path}/arrow_dir/data-00000-of-00001.arrow",
        "absent.parquet": "no such file or directory",
        "*.nothing": "the pattern matches no files",
        "pretty.json": "one JSON object, not rows of pairs (its field 'data' holds a list): write one pair per line",
        "linked": f"{tmp_path}/linked/b.jsonl: a symbolic link to ../../blobs/b, which does not exist",
        "pretty.jsonl": "JSON objects each written over several lines (pretty-printed), one after another: write one "
                        "per line (JSON lines, as `jq -c` does)",
    }
    (tmp_path / "pretty.json").write_text(json.dumps({"data": [{"chosen": [], "rejected": []}] * 2}, indent=2))
    (tmp_path / "linked").mkdir()  # a Hugging Face cache's snapshot copied without its blobs
    (tmp_path / "linked" / "a.jsonl").write_text("")
    (tmp_path / "linked" / "b.jsonl").symlink_to("../../blobs/b")
    pairs = [json.dumps({"chosen": [A], "rejected": [B]}, indent=2) for _ in range(2)]
    (tmp_path / "pretty.jsonl").write_text("\n".join(pairs) + "\n")  # `jq .` of JSON lines
    for name, words in cases.items():
        with pytest.raises(SourceError) as error:
            [rows for fragment in plan_fragments(str(tmp_path / name), ("chosen", "rejected"))
             for rows in read_fragment(fragment, 100)]  # (a JSON file is first read by the task that reads it)
        assert words in str(error.value) and str(tmp_path) in str(error.value), name
    # A relative path (a config file's, say, read from where the job runs, not from the file's folder): said so.
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path / "empty_dir")
        with pytest.raises(SourceError) as error:
            plan_fragments("examples/train.parquet", ("chosen", "rejected"))
    assert str(error.value) == (f"examples/train.parquet: no such file or directory in {tmp_path}/empty_dir, where "
                                "relative paths are read from")


def test_a_source_without_rows_fails_naming_it(qwen_tokenizer_dir, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable pairs"):
        run_pipeline(tmp_path / "empty.jsonl", qwen_tokenizer_dir)
    schema = pa.schema([("chosen", pa.string()), ("rejected", pa.string())])
    (tmp_path / "parts").mkdir()
    for part in ("part-0.parquet", "part-1.parquet"):  # closed before any row was written
        pq.ParquetWriter(tmp_path / "parts" / part, schema).close()
    with pytest.raises(SourceError, match=f"{tmp_path / 'parts'}: holds no rows"):
        run_pipeline(tmp_path / "parts", qwen_tokenizer_dir)


def test_files_without_rows_are_counted_and_named_in_the_ledger(qwen_tokenizer_dir, tmp_path, capsys):
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist([{"chosen": Q + [A], "rejected": Q + [B]}] * 3), tmp_path / "data" / "a.parquet")
    pq.ParquetWriter(tmp_path / "data" / "b.parquet", pa.schema([("chosen", pa.string()), ("rejected", pa.string())])).close()
    (tmp_path / "data" / "c.jsonl").write_text("")  # an upload that failed
    (tmp_path / "data" / "d.jsonl").write_text("\n\n")
    kept, ledger = run_pipeline(str(tmp_path / "data" / "*"), qwen_tokenizer_dir)
    assert len(kept) == ledger["pairs"] == ledger["rows_read"] == 3 and ledger["files"] == 4
    assert ledger["files_without_rows"] == [str(tmp_path / "data" / name) for name in ("b.parquet", "c.jsonl", "d.jsonl")]
    assert f"3 file(s) hold no rows: {tmp_path / 'data' / 'b.parquet'}, " in capsys.readouterr().out


def test_a_conversation_the_chat_template_refuses_costs_only_its_row(qwen_tokenizer_dir, tmp_path):
    # As Gemma's template does: a system turn raises, for that row only, and the ledger says why.
    template = ("{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    system = [{"role": "system", "content": "Be brief."}]
    rows = [{"chosen": Q + [A], "rejected": Q + [B]}, {"chosen": system + Q + [A], "rejected": system + Q + [B]},
            {"chosen": Q + [B], "rejected": Q + [A]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "system.parquet")
    kept, ledger = run_pipeline(tmp_path / "system.parquet", qwen_tokenizer_dir, chat_template=template)
    assert [row["row"] for row in kept] == [0, 2] and ledger["dropped"]["invalid"] == 1
    (example,) = ledger["examples"]
    assert example["row"] == 1 and "chat template refuses the conversation: System role not supported" in example["message"]


def test_byte_order_marks_map_columns_and_rows_a_processor_leaves_empty(qwen_tokenizer_dir, tmp_path):
    from btrm.data import DataSpec, PairPreprocessor
    from btrm.tokenize import TokenizationSpec

    rows = [{"chosen": Q + [A], "rejected": Q + [B]}, {"chosen": Q + [B], "rejected": Q + [A]}]
    (tmp_path / "array.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=2).encode())  # as some editors save
    assert [r for _, batch in read_fragment(Fragment(str(tmp_path / "array.json"), "json"), 100) for r in batch] == rows
    # JSONL is read line by line: a later line that is an array is a row (a bad one), not the start of a JSON array.
    (tmp_path / "rows.jsonl").write_text(f"{json.dumps(rows[0])}\n\n[1, 2]\n{json.dumps(rows[1])}\n")
    read = list(read_fragment(Fragment(str(tmp_path / "rows.jsonl"), "json"), 2))
    assert read == [([0, 2], [rows[0], [1, 2]]), ([3], [rows[1]])]
    # So is a first line that is an array, whole on its line, with rows after it; an array on one line alone is
    # a JSON array (json.dump's), whatever the suffix.
    (tmp_path / "first.jsonl").write_text(f"[1, 2]\n{json.dumps(rows[0])}\n")
    assert list(read_fragment(Fragment(str(tmp_path / "first.jsonl"), "json"), 5)) == [([0, 1], [[1, 2], rows[0]])]
    (tmp_path / "dumped.jsonl").write_text(json.dumps(rows) + "\n\n")
    assert list(read_fragment(Fragment(str(tmp_path / "dumped.jsonl"), "json"), 5)) == [(range(0, 2), rows)]
    # A broken first line is one bad row, not a file read whole as one object.
    (tmp_path / "broken.jsonl").write_text('{"chosen": [\n\n' + "".join(json.dumps(r) + "\n" for r in rows))
    [(numbers, read)] = read_fragment(Fragment(str(tmp_path / "broken.jsonl"), "json"), 10)
    assert numbers == [0, 2, 3] and type(read[0]).__name__ == "BadRow" and read[1:] == rows

    message = pa.map_(pa.string(), pa.string())  # messages as Spark writes a map<string,string> column
    table = pa.table({side: pa.array([[list(m.items()) for m in row[side]] for row in rows], pa.list_(message))
                      for side in ("chosen", "rejected")})
    pq.write_table(table, tmp_path / "maps.parquet")
    kept, ledger = run_pipeline(tmp_path / "maps.parquet", qwen_tokenizer_dir)
    assert ledger["pairs"] == 2 and [list(r["chosen_ids"]) != list(r["rejected_ids"]) for r in kept] == [True, True]

    (tmp_path / "skip.py").write_text(
        "from btrm.processors import BaseBradleyTerryTrainDataset\n"
        "class SkipOdd(BaseBradleyTerryTrainDataset):\n"
        "    def convert(self, row):\n"
        "        return [] if row['n'] % 2 else {'chosen': row['chosen'], 'rejected': row['rejected']}\n")
    spec = DataSpec(path="unused", tokenizer_path=qwen_tokenizer_dir, tokenization=TokenizationSpec(max_length=256),
                    dataset_format="SkipOdd", custom_bt_dataset_path=str(tmp_path / "skip.py"))
    table, report = PairPreprocessor(spec).process_rows("rows.jsonl", range(4), [{**rows[0], "n": n} for n in range(4)])
    assert table.num_rows == report.pairs == 2 and report.dropped["invalid"] == 2  # every row read is accounted for
    assert "SkipOdd gave no pair for this row" in report.examples[0]["message"] and report.examples[0]["row"] == 1


def test_a_large_json_lines_file_is_read_in_byte_ranges_that_give_every_line_once_by_its_number(tmp_path, monkeypatch):
    """Pieces cut anywhere (mid-line, at a line's start, inside a line longer than a piece, in blank lines, at
    a last line without a line break) read, together, what the whole file gives, each row by its line number."""
    import btrm.sources as sources

    rows = [{"n": k, "text": "x" * (k * 7 % 45)} for k in range(40)]
    lines = [json.dumps(row) for row in rows]
    lines[11] = '{"n": 11, "broken'  # a bad row stays one, named by its line
    lines[20] = json.dumps({"n": 20, "text": "y" * 300})  # longer than a piece: pieces without a line of their own
    text = "\n".join(lines[:15]) + "\n\n\r\n" + "\r\n".join(lines[15:30]) + "\n" + "\n".join(lines[30:])  # no final break
    (tmp_path / "pairs.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())
    whole = [(n, row) for numbers, batch in read_fragment(Fragment(str(tmp_path / "pairs.jsonl"), "json"), 1000)
             for n, row in zip(numbers, batch)]
    assert len(whole) == 40 and type(whole[11][1]).__name__ == "BadRow" and whole[-1] == (41, rows[-1])
    for piece in (23, 50, 64, 97, 301):
        monkeypatch.setattr(sources, "JSON_BYTES_PER_FRAGMENT", piece)
        fragments = plan_fragments(str(tmp_path / "pairs.jsonl"))
        assert len(fragments) == -(-(tmp_path / "pairs.jsonl").stat().st_size // piece)
        read = [(n, row) for fragment in fragments for numbers, batch in read_fragment(fragment, 3)
                for n, row in zip(numbers, batch)]
        assert read == whole, piece
    # Rows longer than the first look at the file (long-context pairs): it reads on to tell the layout.
    monkeypatch.setattr(sources, "JSON_LAYOUT_CHECK_BYTES", 100)
    monkeypatch.setattr(sources, "JSON_BYTES_PER_FRAGMENT", 1000)
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"n": k, "text": "z" * 300}) + "\n" for k in range(10)))
    assert len(plan_fragments(str(tmp_path / "long.jsonl"))) == 4
    # Other layouts, and compressed files, stay whole (one task tells them apart, or must read from the start).
    monkeypatch.setattr(sources, "JSON_BYTES_PER_FRAGMENT", 50)
    (tmp_path / "array.json").write_text(json.dumps(rows, indent=1))
    (tmp_path / "first_broken.jsonl").write_text("\n".join(lines[11:]))
    (tmp_path / "pairs.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("array.json", "first_broken.jsonl", "pairs.jsonl.gz"):
        assert [f.byte_range for f in plan_fragments(str(tmp_path / name))] == [()], name


def test_jsonl_with_two_broken_first_lines_is_not_read_whole_into_memory(monkeypatch):
    """Two broken first lines could be one pretty-printed object: the check that tells parses what it has read,
    up to a bound, and the rest of a large file is read line by line, as any JSON lines."""
    import io

    from btrm import sources

    monkeypatch.setattr(sources, "WHOLE_OBJECT_CHECK_BYTES", 1000)
    rows = [{"chosen": Q + [A], "rejected": Q + [B], "id": str(k)} for k in range(2000)]
    data = b'{"chosen": [\n{"rejected"\n' + b"".join(json.dumps(r).encode() + b"\n" for r in rows)
    stream = io.BytesIO(data)
    read = sources._json_rows("big.jsonl", io.BufferedReader(stream), batch_rows=10)
    numbers, first = next(read)
    assert numbers == list(range(10)) and [type(r).__name__ for r in first[:2]] == ["BadRow", "BadRow"]
    assert stream.tell() < 1000 + 3 * io.DEFAULT_BUFFER_SIZE < len(data)  # (not the whole file)
    rest = [(n, r) for numbers, batch in read for n, r in zip(numbers, batch)]
    assert [r for _, r in [*zip(numbers[2:], first[2:]), *rest]] == rows  # (rows across the bound whole)
    assert [n for n, _ in rest] == list(range(10, 2002))


def test_a_processors_failures_cost_only_their_pairs_and_say_where(qwen_tokenizer_dir, tmp_path, monkeypatch):
    from btrm.data import DataSpec, PairPreprocessor
    from btrm.processors import ProcessorError, load_processor
    from btrm.tokenize import TokenizationSpec

    (tmp_path / "answers.py").write_text(
        "from btrm.processors import BaseBradleyTerryTrainDataset\n"
        "class Answers(BaseBradleyTerryTrainDataset):\n"
        "    def convert(self, row):\n"
        "        if row['kind'] == 'none':\n"
        "            return None\n"
        "        if row['kind'] == 'holes':\n"
        "            return [{'chosen': [{'role': 'user', 'content': 'Hi.'}, {'role': 'assistant', 'content': 'Hello.'}],\n"
        "                     'rejected': [{'role': 'user', 'content': 'Hi.'}, {'role': 'assistant', 'content': 'Go.'}]},\n"
        "                    None]\n"
        "        if row['kind'] == 'mapping':\n"
        "            import types\n"
        "            return types.MappingProxyType({'chosen': [{'role': 'user', 'content': 'Hi.'}, {'role': 'assistant',\n"
        "                'content': 'Hello.'}], 'rejected': [{'role': 'user', 'content': 'Hi.'}, {'role': 'assistant', 'content': 'No.'}]})\n"
        "        best = row['best']\n"
        "        prompt = [{'role': 'user', 'content': row['question']}]\n"
        "        return [{'chosen': prompt + [{'role': 'assistant', 'content': best}],\n"
        "                 'rejected': prompt + [{'role': 'assistant', 'content': other}]} for other in row['others']]\n"
        "class Fussy(BaseBradleyTerryTrainDataset):\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('needs a config')\n")
    monkeypatch.chdir(tmp_path)  # a relative path, resolved where the job starts: data tasks run elsewhere
    spec = DataSpec(path="unused", tokenizer_path=qwen_tokenizer_dir, tokenization=TokenizationSpec(max_length=256),
                    dataset_format="Answers", custom_bt_dataset_path="answers.py")
    assert spec.custom_bt_dataset_path == str(tmp_path / "answers.py")
    rows = [{"kind": "pairs", "question": "Name a prime.", "best": "Seven.", "others": ["Nine.", "  ", "Four."]},
            {"kind": "none"},
            {"kind": "pairs", "question": "Name a prime."},
            {"kind": "holes"},
            {"kind": "mapping"}]
    table, report = PairPreprocessor(spec).process_rows("rows.jsonl", range(5), rows)
    # The row's blank answer costs its own pair, not the row's two others; a None among a row's pairs, the same.
    # A mapping that is no dict is one pair, as a dict is.
    assert table.num_rows == report.pairs == 4 and report.dropped["invalid"] == 4
    blank, nothing, raised, hole = report.examples
    assert (hole["row"], hole["message"]) == (3, "field '(pair)': Answers gave NoneType where a pair belongs (a dict with "
                                                 "chosen and rejected) (in the row's pair 2 of 2)")
    assert (blank["row"], blank["field"]) == (0, "rejected[1].content")
    assert blank["message"] == "field 'rejected[1].content': is empty (in the row's pair 2 of 3)"
    assert nothing["row"] == 1 and "Answers gave no pair for this row" in nothing["message"]
    assert raised["row"] == 2 and raised["message"] == (
        f"processor Answers raised KeyError: 'best' (at {tmp_path / 'answers.py'}:14: best = row['best'])")
    # A drop of one pair among a row's several says which, whether validation finds it or the tokenization.
    copies = {"kind": "pairs", "question": "Name a prime.", "best": "Seven.", "others": ["Nine.", "Seven.", "\nSeven."]}
    table, report = PairPreprocessor(spec).process_rows("more.jsonl", range(1), [copies])
    assert table.num_rows == 1 and report.dropped["identical"] == 2
    assert [e["message"][-27:] for e in report.examples] == [" (in the row's pair 2 of 3)", " (in the row's pair 3 of 3)"]
    with pytest.raises(ProcessorError, match=r"'Fussy' in .*answers.py: creating it \(`Fussy\(\)`\) failed: "
                                             "RuntimeError: needs a config"):
        load_processor("Fussy", "answers.py")
    # In a Ray job that uploaded its working directory, every data task runs in its node's copy of it.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}))
    assert DataSpec(path="unused", tokenizer_path=qwen_tokenizer_dir, tokenization=TokenizationSpec(max_length=256),
                    dataset_format="Answers", custom_bt_dataset_path="answers.py").custom_bt_dataset_path == "answers.py"
