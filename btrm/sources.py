"""Finding a source's rows: files, directories of shards, globs and cloud URIs, read in fragments.

A fragment is the unit of parallel work: one parquet row group (or a few) or one JSON file. It knows
its file and the file row number of its first row, so every row can be named in an error exactly as a
user would look it up. Parquet goes through pyarrow (any filesystem pyarrow understands: local, s3://,
gs://, hdfs://); JSON/JSONL (optionally gzip-compressed) is a convenience for small files.
"""

from __future__ import annotations

import codecs
import fnmatch
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
ROWS_PER_FRAGMENT = 8192


class SourceError(ValueError):
    """A source that cannot be read at all (missing, empty, corrupt, wrong schema)."""


@dataclass(frozen=True)
class Fragment:
    path: str  # as the user can find it: a local path or a URI, without credentials or query
    format: str  # "parquet" | "json"
    row_groups: tuple[int, ...] = ()
    first_row: int = 0  # file row number of the fragment's first row (0-based)
    num_rows: int | None = None
    # What the source URI carried besides its path, to open every file of it the same way: credentials
    # (s3://KEY:SECRET@bucket/...) and options (?endpoint_override=...&region=...). Never shown.
    credentials: str = field(default="", repr=False)
    query: str = field(default="", repr=False)


def _split_uri(source: str) -> tuple[str, str, str]:
    """A source → (the source as shown: no credentials, no query; its credentials; its query). Local
    paths are left whole: their '?' is a glob character."""
    if "://" not in source:
        return source, "", ""
    scheme, rest = source.split("://", 1)
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    credentials, _, host = authority.rpartition("@")
    return f"{scheme}://{host}{slash}{path}", credentials, query


def without_credentials(source: Any) -> Any:
    """``source`` as it may be shown and recorded: a URI's credentials masked (s3://***@bucket/...)."""
    if not isinstance(source, str) or "://" not in source:
        return source
    shown, credentials, query = _split_uri(source)
    if not credentials:
        return source
    scheme, rest = shown.split("://", 1)
    return f"{scheme}://***@{rest}" + (f"?{query}" if query else "")


def _filesystem(path: str, credentials: str = "", query: str = "") -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        scheme, rest = path.split("://", 1)
        return pafs.FileSystem.from_uri(f"{scheme}://{credentials + '@' if credentials else ''}{rest}"
                                        f"{'?' + query if query else ''}")
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _display(path: str, original: str) -> str:
    scheme = original.split("://", 1)[0] + "://" if "://" in original else ""
    return scheme + path if scheme and not path.startswith(scheme) else path


def _is_data_file(path: str) -> bool:
    return path.endswith(PARQUET_SUFFIXES + JSON_SUFFIXES)


def _hidden(name: str) -> bool:
    # Checkpoints, caches and job leftovers: .ipynb_checkpoints/, .cache/, Spark's _temporary/ and _SUCCESS.
    return name.startswith((".", "_"))


def _glob_match(parts: Sequence[str], pattern: Sequence[str]) -> bool:
    """Path components against pattern components, as a shell matches: a wildcard stays within one
    component, ``**`` spans any number of them, and only a pattern that names it matches a hidden name."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1)
                   if not any(_hidden(part) for part in parts[:i]))
    return (bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0])
            and (not _hidden(parts[0]) or pattern[0][:1] == parts[0][:1])
            and _glob_match(parts[1:], pattern[1:]))


def is_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def glob_matches(pattern: str, path: str) -> bool:
    """Whether the local glob ``pattern`` names the local file ``path`` (existing or not), as
    :func:`list_data_files` would read it."""
    return _glob_match(os.path.abspath(path).split("/"), os.path.abspath(pattern).split("/"))


def list_data_files(source: str) -> list[str]:
    """The data files a source names: a file, a directory (recursively, leaving out hidden files and
    folders: names starting with . or _), or a glob; URIs without credentials or query (see Fragment)."""
    source, credentials, query = _split_uri(source)
    fs, path = _filesystem(source, credentials, query)
    if is_glob(path):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)].rsplit("/", 1)[0] or "/"
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        files = sorted(i.path for i in infos
                       if i.type == pafs.FileType.File and _glob_match(i.path.split("/"), path.split("/")))
        if not files:
            raise SourceError(f"{source}: the pattern matches no files")
        return [_display(f, source) for f in files]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise SourceError(f"{source}: no such file or directory")
    if info.type == pafs.FileType.File:
        return [_display(path, source)]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and _is_data_file(i.path)
                   and not any(_hidden(part) for part in i.path[len(path):].split("/")))
    if not files:
        raise SourceError(f"{source}: the directory holds no data files "
                          f"({', '.join(PARQUET_SUFFIXES + JSON_SUFFIXES)})")
    json_files = [f for f in files if f.endswith(JSON_SUFFIXES)]
    if json_files and len(json_files) < len(files):
        # Parquet shards with JSON beside them: most likely metadata (dataset_info.json, a manifest) that
        # would be read as rows of pairs. Which files are data is the user's call: a glob says it.
        shown = ", ".join(_display(f, source) for f in json_files[:3]) + (", ..." if len(json_files) > 3 else "")
        suffix = next(s for s in PARQUET_SUFFIXES if any(f.endswith(s) for f in files))
        raise SourceError(f"{source}: the directory mixes {len(files) - len(json_files)} parquet and "
                          f"{len(json_files)} JSON file(s) ({shown}); name the data with a glob, e.g. "
                          f"{source.rstrip('/')}/**/*{suffix}")
    return [_display(f, source) for f in files]


def plan_fragments(source: str, required_fields: tuple[str, ...] = ()) -> list[Fragment]:
    """Splits a source into fragments, checking every parquet footer and schema up front."""
    fragments: list[Fragment] = []
    _, credentials, query = _split_uri(source)
    for path in list_data_files(source):
        if path.endswith(PARQUET_SUFFIXES):
            fragments.extend(_parquet_fragments(path, credentials, query, required_fields))
        elif path.endswith(JSON_SUFFIXES):
            fragments.append(Fragment(path, "json", credentials=credentials, query=query))
        else:
            raise SourceError(f"{path}: unknown file type; btrm reads parquet ({', '.join(PARQUET_SUFFIXES)}) "
                              f"and JSON ({', '.join(JSON_SUFFIXES)})")
    return fragments


def _open_parquet(path: str, credentials: str, query: str) -> pq.ParquetFile:
    fs, local = _filesystem(path, credentials, query)
    try:
        return pq.ParquetFile(fs.open_input_file(local))
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{path}: not a readable parquet file ({e}); is it truncated or of another format?") from e


def _parquet_fragments(path: str, credentials: str, query: str, required_fields: tuple[str, ...]) -> list[Fragment]:
    meta = _open_parquet(path, credentials, query).metadata
    columns = set(meta.schema.to_arrow_schema().names)
    missing = [f for f in required_fields if f not in columns]
    if missing:
        raise SourceError(f"{path}: missing column(s) {missing}; the file has {sorted(columns)}. "
                          "Pick the processor for this data (--dataset_format / --custom_bt_dataset_name) "
                          "or convert it to the standard format")
    if meta.num_row_groups == 0:  # closed before any row was written (Spark's empty parts): the ledger names it
        return [Fragment(path, "parquet", (), 0, 0, credentials, query)]
    fragments, group, first, rows = [], [], 0, 0
    for i in range(meta.num_row_groups):
        group.append(i)
        rows += meta.row_group(i).num_rows
        if rows >= ROWS_PER_FRAGMENT or i == meta.num_row_groups - 1:
            fragments.append(Fragment(path, "parquet", tuple(group), first, rows, credentials, query))
            group, first, rows = [], first + rows, 0
    return fragments


def read_fragment(fragment: Fragment, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    """Yields (row numbers, rows) batches; row numbers are 0-based (for JSONL: the
    line number - 1). A row that cannot be decoded is a :class:`BadRow` in its place, so the others
    go on."""
    if fragment.format == "parquet":
        yield from _read_parquet(fragment, batch_rows)
    else:
        yield from _read_json(fragment, batch_rows)


@dataclass(frozen=True)
class BadRow:
    message: str


def _read_parquet(fragment: Fragment, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    if fragment.num_rows == 0:  # no row groups: pyarrow would read every row group when given none
        return
    parquet = _open_parquet(fragment.path, fragment.credentials, fragment.query)
    row = fragment.first_row
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=list(fragment.row_groups)):
            yield range(row, row + batch.num_rows), _decode_rows(batch)
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{fragment.path}: reading rows from {row} failed: {e}; the file is corrupt") from e


def _decode_rows(batch: pa.RecordBatch) -> list[Any]:
    try:
        return batch.to_pylist(maps_as_pydicts="strict")  # a MAP column (say, messages from Spark) as dicts
    except (UnicodeDecodeError, KeyError, pa.ArrowException):
        # One bad value (say, invalid UTF-8) must not take its neighbours down: decode row by row.
        rows = []
        for i in range(batch.num_rows):
            try:
                rows.append(batch.slice(i, 1).to_pylist(maps_as_pydicts="strict")[0])
            except (UnicodeDecodeError, KeyError, pa.ArrowException) as e:  # KeyError: a map's key twice
                rows.append(BadRow(f"cannot be decoded: {e}"))
        return rows


def _read_json(fragment: Fragment, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    fs, local = _filesystem(fragment.path, fragment.credentials, fragment.query)
    try:
        # pyarrow decompresses .gz (and other compressed suffixes) on the fly; JSONL is read line by line, so a
        # task holds one batch of rows, not the whole file.
        with fs.open_input_stream(local) as stream:
            yield from _json_rows(fragment.path, io.BufferedReader(stream), batch_rows)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{fragment.path}: cannot be read ({e}); is it truncated or corrupt?") from e


def _json_rows(path: str, lines: io.BufferedReader, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    numbers, batch, first = [], [], True
    for number, line in enumerate(lines):
        if not line.strip():  # blank lines (a trailing newline, say) hold no row
            continue
        if first and line.removeprefix(codecs.BOM_UTF8).lstrip()[:1] == b"[":
            yield from _json_array_rows(path, line + lines.read(), batch_rows)  # the file is one JSON array
            return
        first = False
        numbers.append(number)
        batch.append(_json_line(line))
        if len(batch) == batch_rows:
            yield numbers, batch
            numbers, batch = [], []
    if batch:
        yield numbers, batch


def _json_array_rows(path: str, data: bytes, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    try:
        rows = json.loads(data)  # (json.loads skips a BOM itself)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from e
    for start in range(0, len(rows), batch_rows):
        yield range(start, min(start + batch_rows, len(rows))), rows[start : start + batch_rows]


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return BadRow(f"is not valid JSON: {e}")
