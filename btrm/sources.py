"""Finding a source's rows: files, directories of shards, globs and cloud URIs, read in fragments.

A fragment is the unit of parallel work: one parquet row group (or a few), one JSON file, or a byte range
of a large JSON-lines file. It knows its file and the file row number of its first row, so every row can be
named in an error exactly as a user would look it up. Parquet goes through pyarrow (any filesystem pyarrow
understands: local, s3://, gs://, hdfs://, abfs://), and so does JSON/JSONL (optionally compressed).
"""

from __future__ import annotations

import codecs
import dataclasses
import fnmatch
import functools
import io
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PARQUET_SUFFIXES = (".parquet", ".pq")
# pyarrow decompresses these on the fly (by the suffix).
JSON_SUFFIXES = tuple(f"{kind}{compression}" for kind in (".jsonl", ".json") for compression in ("", ".gz", ".bz2", ".zst"))
ROWS_PER_FRAGMENT = 8192
# An uncompressed JSON-lines file larger than this is read in pieces of this many bytes, one data task each
# (a compressed one cannot be entered midway, nor can a JSON array: one task reads it whole).
JSON_BYTES_PER_FRAGMENT = 64 << 20
JSON_LAYOUT_CHECK_BYTES = 1 << 20  # how much of a large JSON file planning reads first to tell JSON lines
# JSON is read through buffers of this size: on an object store each read of the file is a ranged GET.
READ_BUFFER_BYTES = 1 << 20


class SourceError(ValueError):
    """A source that cannot be read at all (missing, empty, corrupt, wrong schema)."""


@dataclass(frozen=True)
class Fragment:
    path: str  # as the user can find it: a local path or a URI, without credentials or query
    format: str  # "parquet" | "json"
    row_groups: tuple[int, ...] = ()
    first_row: int = 0  # file row number of the fragment's first row (0-based)
    num_rows: int | None = None
    # A piece of a JSON-lines file: (start, end) in bytes; it reads the lines that begin in it. Its first_row
    # counts the lines ended before ``start`` (the one running into the piece, if any, is the piece before's).
    byte_range: tuple[int, ...] = ()
    # A parquet file's columns that the processor declares it does not read: never decoded (a column of images
    # costs no memory, a bad value in a column of notes no row), only named in the ledger.
    unread_columns: tuple[str, ...] = ()
    # Where pyarrow opens it: the file's path in the filesystem of the source the user gave (``location``), and
    # that source itself, whole: a URI's credentials (s3://KEY:SECRET@bucket/...) and options
    # (?endpoint_override=...&region=...) open every file of it the same way. Never shown.
    location: str = field(default="", repr=False)
    source: str = field(default="", repr=False)

    def __post_init__(self):
        # Ray Data hands a fragment back to its task with the tuples as numpy arrays.
        object.__setattr__(self, "row_groups", tuple(int(i) for i in self.row_groups))
        object.__setattr__(self, "byte_range", tuple(int(i) for i in self.byte_range))
        object.__setattr__(self, "unread_columns", tuple(str(name) for name in self.unread_columns))


@dataclass(frozen=True)
class DataFile:
    path: str  # as shown (see Fragment)
    location: str  # in the source's filesystem
    size: int  # bytes, as listed


def _split_uri(source: str) -> tuple[str, str, str]:
    """A source → (the source as shown: no credentials, no query; its credentials; its query). A URI's
    user part is a credential only with a password in it (s3://KEY:SECRET@bucket); without one it names
    where the data is (abfs://container@account..., hdfs://user@namenode) and stays. Local paths are left
    whole: their '?' is a glob character."""
    if "://" not in source:
        return source, "", ""
    scheme, rest = source.split("://", 1)
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    user, at, host = authority.rpartition("@")
    if ":" not in user:
        return f"{scheme}://{rest}", "", query
    return f"{scheme}://{host}{slash}{path}", user, query


def without_credentials(source: Any) -> Any:
    """``source`` as it may be shown and recorded: a URI's credentials masked (s3://***@bucket/...)."""
    if not isinstance(source, str) or "://" not in source:
        return source
    shown, credentials, query = _split_uri(source)
    if not credentials:
        return source
    scheme, rest = shown.split("://", 1)
    return f"{scheme}://***@{rest}" + (f"?{query}" if query else "")


# One client per source and process: planning opens every parquet footer, a data task every fragment (and an
# s3:// URI without a region looks the bucket's up over the network each time a filesystem is made).
_uri_filesystem = functools.lru_cache(maxsize=16)(pafs.FileSystem.from_uri)


def _filesystem(source: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of a source as the user gave it (credentials and options included), and its path there."""
    if "://" in source:
        return _uri_filesystem(source)
    return pafs.LocalFileSystem(), os.path.abspath(source)


def _kind(path: str) -> str | None:
    """"parquet", "json", or None for a file btrm does not read (by its suffix, in any case)."""
    lowered = path.lower()
    return "parquet" if lowered.endswith(PARQUET_SUFFIXES) else "json" if lowered.endswith(JSON_SUFFIXES) else None


def first_few(names: Sequence[str], count: int = 5) -> str:
    """"a, b, c, ..." for messages that name files or fields."""
    return ", ".join(names[:count]) + (", ..." if len(names) > count else "")


def _hidden(name: str) -> bool:
    # Checkpoints, caches and job leftovers: .ipynb_checkpoints/, .cache/, Spark's _temporary/ and _SUCCESS.
    return name.startswith((".", "_"))


def _glob_match(parts: Sequence[str], pattern: Sequence[str], folder: bool = False) -> bool:
    """Path components against pattern components, as a shell matches: a wildcard stays within one
    component, ``**`` spans any number of them, and only a pattern that names it matches a hidden name.
    ``folder``: whether files below the folder ``parts`` can match (so the folder is worth listing)."""
    if not parts and folder:
        return bool(pattern)  # (a pattern used up: nothing below this folder can match)
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return (_glob_match(parts, pattern[1:], folder)
                or bool(parts) and not _hidden(parts[0]) and _glob_match(parts[1:], pattern, folder))
    return (bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0])
            and (not _hidden(parts[0]) or pattern[0][:1] == parts[0][:1])
            and _glob_match(parts[1:], pattern[1:], folder))


def _in_named_folder(parts: Sequence[str], pattern: Sequence[str], depth: int = 0) -> bool:
    """Whether ``parts`` (``depth`` levels below it: 1 for a file in it) is at or below a folder the whole pattern
    names, with no hidden name (Spark's _SUCCESS, .crc files) on the way: read as a directory given as the
    source is (Spark writes `out/train.parquet` as a folder of parts)."""
    return any(_glob_match(parts[:k], pattern) and not any(map(_hidden, parts[k:]))
               for k in range(1, len(parts) - depth + 1))


def _glob_names_file(parts: Sequence[str], pattern: Sequence[str], data_file: bool) -> bool:
    """Whether a glob reads the file at ``parts``: the pattern names it, or a folder above it (then only data files)."""
    return _glob_match(parts, pattern) or data_file and _in_named_folder(parts, pattern, depth=1)


def is_glob(path: str) -> bool:
    """Whether ``path`` is a pattern: it holds *, ? or [, and is not the name of a local file or folder as
    written (`pairs[v2].jsonl`)."""
    return any(ch in path for ch in "*?[") and not ("://" not in path and os.path.lexists(path))


def glob_matches(pattern: str, path: str) -> bool:
    """Whether the local glob ``pattern`` names the local file ``path`` (existing or not), as
    :func:`list_data_files` would read it."""
    return _glob_names_file(os.path.abspath(path).split("/"), os.path.abspath(pattern).split("/"), bool(_kind(path)))


# Folders listed at once (each listing a round trip to an object store: a Hive-partitioned tree has thousands).
LISTING_THREADS = 16


def _files_below(fs: pafs.FileSystem, folder: str, wanted_file: Callable[[str], bool],
                 wanted_folder: Callable[[str], bool], shown: Callable[[str], str]) -> list[pafs.FileInfo]:
    """The files below ``folder`` that are wanted, listing only the folders that are, a level at a time: a
    hidden tree (.git/, Spark's _temporary/) or one a pattern cannot reach is never read, and a folder that
    cannot be listed is named."""
    def listing(folder: str) -> list[pafs.FileInfo]:
        try:
            infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
        except OSError as e:  # (pyarrow's errors: PermissionError, a network error, ...)
            raise SourceError(f"{shown(folder)}: cannot be listed ({e})") from e
        if isinstance(fs, pafs.LocalFileSystem):
            _refuse_dangling_links(folder, {info.path for info in infos}, wanted_file)
        return infos

    seen: set[str] = set()
    again: list[str] = []

    def first_time(location: str) -> bool:
        # Local symbolic links: a folder or file linked twice (latest -> v3 beside v3/, latest.jsonl -> train.jsonl)
        # would give its pairs twice, and a link to a folder above loops. What a link leads to is read once, where
        # it is first found.
        if not isinstance(fs, pafs.LocalFileSystem):
            return True
        real = os.path.realpath(location)
        if real in seen:
            again.append(location)
            return False
        seen.add(real)
        return True

    first_time(folder)
    files, level = [], [folder]
    with ThreadPoolExecutor(LISTING_THREADS) as pool:
        while level:
            infos = sorted((info for listed in pool.map(listing, level) for info in listed), key=lambda i: i.path)
            files += [info for info in infos
                      if info.type == pafs.FileType.File and wanted_file(info.path) and first_time(info.path)]
            level = [info.path for info in infos
                     if info.type == pafs.FileType.Directory and wanted_folder(info.path) and first_time(info.path)]
    if again:
        print(f"[btrm] {shown(folder)}: {len(again)} folder(s) or file(s) lead where an earlier one did (symbolic "
              f"links), not read again: {first_few([shown(p) for p in again])}", flush=True)
    return sorted(files, key=lambda info: info.path)


def _refuse_dangling_links(folder: str, listed: set[str], wanted_file: Callable[[str], bool]) -> None:
    """pyarrow lists no symbolic link whose target is missing: a copied Hugging Face cache (its snapshot's
    files link to ../../blobs/) would lose its data without a word. One named as no data file is (a README.md
    copied without what it links to): a link without a suffix may have led to a folder of data."""
    with os.scandir(folder) as entries:
        for entry in entries:
            if (entry.path not in listed and entry.is_symlink() and not os.path.exists(entry.path)
                    and (_kind(entry.name) or "." not in entry.name.lstrip(".")) and wanted_file(entry.path)):
                raise SourceError(f"{entry.path}: a symbolic link to {os.readlink(entry.path)}, which does not exist "
                                  "(copied without what it links to?); copy the files themselves (cp -L)")


def list_data_files(source: str) -> list[DataFile]:
    """The data files a source names: a file, a directory (recursively, leaving out hidden files and
    folders: names starting with . or _), or a glob. Files of other types in a directory are named in a note."""
    shown_source, _, _ = _split_uri(source)
    local = "://" not in source
    try:
        fs, path = _filesystem(source)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{shown_source}: cannot be read ({e})") from e
    path = path.rstrip("/") or path
    glob_at = min(path.index(ch) for ch in "*?[" if ch in path) if is_glob(path) else None
    # The folder the listing starts from, in the filesystem and as shown: the source's path there and its
    # shown form end in the same components (s3://bucket/a → bucket/a; abfs://c@account/a → c/a), counted by
    # component (pyarrow decodes %20 and the like, the shown form keeps them).
    top = path if glob_at is None else path[:glob_at].rsplit("/", 1)[0] or ("/" if local else "")
    shown_path = shown_source.rstrip("/")
    shown_top = shown_path.rsplit("/", path[len(top):].strip("/").count("/") + 1)[0] if top != path else shown_path

    def shown(location: str) -> str:
        return location if local else shown_top + location[len(top):]

    def relative(location: str) -> list[str]:
        return location[len(top):].strip("/").split("/")

    if glob_at is not None:
        pattern = relative(path)
        files = _files_below(fs, top, lambda f: _glob_names_file(relative(f), pattern, bool(_kind(f))),
                             lambda d: _glob_match(relative(d), pattern, folder=True) or _in_named_folder(relative(d), pattern),
                             shown)
        if not files:
            raise SourceError(f"{shown_source}: the pattern matches no files")
        return [DataFile(shown(f.path), f.path, f.size) for f in files]
    try:
        info = fs.get_file_info(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{shown_source}: cannot be read ({e})") from e
    if info.type == pafs.FileType.NotFound:
        # (a relative path in a config file is read from where the job runs, not from the file's folder)
        where = "" if not local or os.path.isabs(shown_source) else f" in {os.getcwd()}, where relative paths are read from"
        raise SourceError(f"{shown_source}: no such file or directory{where}")
    if info.type == pafs.FileType.File:
        return [DataFile(shown(path), path, info.size)]
    found = _files_below(fs, path, lambda f: not _hidden(f.rsplit("/", 1)[-1]),
                         lambda d: not _hidden(d.rsplit("/", 1)[-1]), shown)
    files = [f for f in found if _kind(f.path)]
    others = [shown(f.path) for f in found if not _kind(f.path)]
    named = first_few(others)
    if not files:
        raise SourceError(f"{shown_source}: the directory holds no data files "
                          f"({', '.join(PARQUET_SUFFIXES + JSON_SUFFIXES)})" + (f"; it holds {named}" if others else ""))
    if others:  # (a README beside the shards, or data in a format btrm does not read: say which)
        print(f"[btrm] {shown_source}: {len(others)} file(s) neither parquet nor JSON, not read: {named}", flush=True)
    json_files = [f.path for f in files if _kind(f.path) == "json"]
    if json_files and len(json_files) < len(files):
        # Parquet shards with JSON beside them: most likely metadata (dataset_info.json, a manifest) that
        # would be read as rows of pairs. Which files are data is the user's call: a glob says it.
        named = first_few([shown(f) for f in json_files], 3)
        suffix = next(s for s in PARQUET_SUFFIXES if any(f.path.lower().endswith(s) for f in files))
        raise SourceError(f"{shown_source}: the directory mixes {len(files) - len(json_files)} parquet and "
                          f"{len(json_files)} JSON file(s) ({named}); name the data with a glob, e.g. "
                          f"{shown_path}/**/*{suffix}")
    return [DataFile(shown(f.path), f.path, f.size) for f in files]


def plan_fragments(source: str, required_fields: tuple[str, ...] = (),
                   read_fields: tuple[str, ...] | None = None) -> list[Fragment]:
    """Splits a source into fragments, checking every parquet footer and schema up front. ``read_fields``: the
    processor's (None: it reads any), the only parquet columns read."""
    fragments: list[Fragment] = []
    for file in list_data_files(source):
        kind = _kind(file.path)
        if kind == "parquet":
            fragments.extend(_parquet_fragments(file, source, required_fields, read_fields))
        elif kind == "json":
            fragments.extend(_json_fragments(file, source))
        else:
            raise SourceError(f"{file.path}: unknown file type; btrm reads parquet ({', '.join(PARQUET_SUFFIXES)}) "
                              f"and JSON ({', '.join(JSON_SUFFIXES)})")
    return fragments


def _opened(fragment: Fragment) -> tuple[pafs.FileSystem, str]:
    """The fragment's filesystem and its path there (a fragment made by hand has only its local path)."""
    fs, path = _filesystem(fragment.source or fragment.path)
    return fs, fragment.location or path


def _open_parquet(fragment: Fragment) -> pq.ParquetFile:
    fs, location = _opened(fragment)
    try:
        return pq.ParquetFile(fs.open_input_file(location))
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{fragment.path}: not a readable parquet file ({e}); is it truncated or of another "
                          "format?") from e


def _parquet_fragments(file: DataFile, source: str, required_fields: tuple[str, ...],
                       read_fields: tuple[str, ...] | None) -> list[Fragment]:
    meta = _open_parquet(Fragment(file.path, "parquet", location=file.location, source=source)).metadata
    columns = meta.schema.to_arrow_schema().names
    missing = [f for f in required_fields if f not in columns]
    if missing:
        raise SourceError(f"{file.path}: missing column(s) {missing}; the file has {sorted(columns)}. "
                          "Pick the processor for this data (--dataset_format / --custom_bt_dataset_name) "
                          "or convert it to the standard format")
    twice = sorted({c for c in columns if columns.count(c) > 1})
    if twice:  # (a row would hold one of them, the last, and nothing would say so)
        raise SourceError(f"{file.path}: column(s) {twice} appear more than once; rename them apart")
    unread = () if read_fields is None else tuple(sorted({c for c in columns if c not in read_fields}))
    whole = Fragment(file.path, "parquet", unread_columns=unread, location=file.location, source=source)
    if meta.num_row_groups == 0:  # closed before any row was written (Spark's empty parts): the ledger names it
        return [dataclasses.replace(whole, num_rows=0)]
    fragments, group, first, rows = [], [], 0, 0
    for i in range(meta.num_row_groups):
        group.append(i)
        rows += meta.row_group(i).num_rows
        if rows >= ROWS_PER_FRAGMENT or i == meta.num_row_groups - 1:
            fragments.append(dataclasses.replace(whole, row_groups=tuple(group), first_row=first, num_rows=rows))
            group, first, rows = [], first + rows, 0
    return fragments


def _json_fragments(file: DataFile, source: str) -> list[Fragment]:
    """A JSON file whole, or, when it is uncompressed JSON lines past JSON_BYTES_PER_FRAGMENT, in byte-range
    pieces. Their first rows are counted now (every line break before each piece, the pieces read at once):
    one pass over the file, so each piece names its rows by their line numbers."""
    whole = Fragment(file.path, "json", location=file.location, source=source)
    if _compression(file.location):
        return [whole]
    size = file.size
    if size <= JSON_BYTES_PER_FRAGMENT:
        return [whole]
    fs, location = _opened(whole)
    try:
        with fs.open_input_file(location) as f:
            if not _json_lines_layout(_head(f, lines=2, limit=JSON_BYTES_PER_FRAGMENT)):
                return [whole]
        starts = range(0, size, JSON_BYTES_PER_FRAGMENT)
        with ThreadPoolExecutor(LISTING_THREADS) as pool:
            line_breaks = list(pool.map(lambda start: _line_breaks(fs, location, start, start + JSON_BYTES_PER_FRAGMENT),
                                        starts))
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{file.path}: cannot be read ({e})") from e
    before = itertools.accumulate(line_breaks[:-1], initial=0)
    return [dataclasses.replace(whole, byte_range=(start, min(start + JSON_BYTES_PER_FRAGMENT, size)), first_row=lines)
            for start, lines in zip(starts, before)]


def _head(file: pa.NativeFile, lines: int, limit: int) -> bytes:
    """The file's start, through its first ``lines`` filled lines where they end within ``limit`` bytes (read in
    growing steps: a long-context pair may be megabytes on its line)."""
    size = JSON_LAYOUT_CHECK_BYTES
    while True:
        head = file.read_at(size, 0)
        if len(head) < size or size >= limit or sum(1 for line in head.split(b"\n")[:-1] if line.strip()) >= lines:
            return head
        size = min(size * 4, limit)


def _json_lines_layout(head: bytes) -> bool:
    """Whether a file starting with ``head`` is JSON lines beyond doubt: its first two filled lines are whole in
    it and JSON objects each (the other layouts, and a file whose first rows are broken, are read whole, where
    :func:`_json_rows` tells them apart)."""
    filled = [line for line in head.split(b"\n")[:-1] if line.strip()][:2]
    return len(filled) == 2 and all(isinstance(_json_line(line), dict) for line in filled)


def _line_breaks(fs: pafs.FileSystem, location: str, start: int, end: int, block: int = 8 << 20) -> int:
    """The line breaks in bytes [start, end) of a file."""
    count = 0
    with fs.open_input_file(location) as f:
        for offset in range(start, end, block):
            count += f.read_at(min(block, end - offset), offset).count(b"\n")
    return count


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
    field: str | None = None


# KeyError: a MAP's key twice; OverflowError: a date or timestamp past Python's year 9999 (a database's "infinity").
DECODE_ERRORS = (UnicodeDecodeError, KeyError, OverflowError, pa.ArrowException)
# json's: invalid JSON or UTF-8 (ValueErrors both), an integer of more than 4300 digits (ValueError), nesting
# deeper than the interpreter's recursion limit (RecursionError).
JSON_ERRORS = (ValueError, RecursionError)


def _read_parquet(fragment: Fragment, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    if fragment.num_rows == 0:  # no row groups: pyarrow would read every row group when given none
        return
    parquet = _open_parquet(fragment)
    columns = [name for name in parquet.schema_arrow.names if name not in fragment.unread_columns]
    row = fragment.first_row
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=list(fragment.row_groups), columns=columns):
            yield range(row, row + batch.num_rows), _decode_rows(batch)
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{fragment.path}: reading rows from {row} failed: {e}; the file is corrupt") from e


def _decode_rows(batch: pa.RecordBatch) -> list[Any]:
    try:
        return batch.to_pylist(maps_as_pydicts="strict")  # a MAP column (say, messages from Spark) as dicts
    except DECODE_ERRORS:
        # One bad value (say, invalid UTF-8) must not take its neighbours down: decode row by row.
        rows = []
        for i in range(batch.num_rows):
            try:
                rows.append(batch.slice(i, 1).to_pylist(maps_as_pydicts="strict")[0])
            except DECODE_ERRORS as e:
                rows.append(_undecodable(batch.slice(i, 1), e))
        return rows


def _undecodable(row: pa.RecordBatch, error: Exception) -> BadRow:
    """The row's first column that cannot be decoded, named."""
    for name, column in zip(row.schema.names, row.columns):
        try:
            column.to_pylist(maps_as_pydicts="strict")
        except DECODE_ERRORS as e:
            return BadRow(f"cannot be decoded: {e}", name)
    return BadRow(f"cannot be decoded: {error}")


def _read_json(fragment: Fragment, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    fs, location = _opened(fragment)
    try:
        if fragment.byte_range:
            with fs.open_input_file(location) as file:
                yield from _json_line_rows(_lines_begun_in(file, *fragment.byte_range, fragment.first_row), batch_rows)
            return
        # pyarrow decompresses .gz (and other compressed suffixes) on the fly; JSONL is read line by line, so a
        # task holds one batch of rows, not the whole file.
        with fs.open_input_stream(location, compression=_compression(location)) as stream:
            yield from _json_rows(fragment.path, io.BufferedReader(stream, READ_BUFFER_BYTES), batch_rows)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(f"{fragment.path}: cannot be read ({e}); is it truncated or corrupt?") from e


def _compression(location: str) -> str | None:
    # (pyarrow's own detection goes by the suffix as written: X.JSONL.GZ would be read as its gzip bytes)
    suffix = location.lower().rsplit(".", 1)[-1]
    return {"gz": "gzip", "bz2": "bz2", "zst": "zstd"}.get(suffix)


WHOLE_OBJECT_CHECK_BYTES = 64 << 20  # how much of a JSON file whose first lines are broken is parsed as one object


def _json_rows(path: str, lines: io.BufferedReader, batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    numbered = enumerate(lines)
    for number, line in numbered:  # to the first line that holds something: which layout is this?
        if not line.strip():
            continue
        start = line.removeprefix(codecs.BOM_UTF8).lstrip()[:1]
        if start == b"[":
            # One JSON array (over lines, or json.dump's one line), or JSON lines whose first row is an array (a
            # bad row): only a line whole on its own with more lines after it is that.
            alone = _json_line(line)
            following = None if isinstance(alone, BadRow) else _next_filled(numbered)
            if following is None:
                rows = _json_array(path, line + lines.read()) if isinstance(alone, BadRow) else alone
                for first in range(0, len(rows), batch_rows):
                    yield range(first, min(first + batch_rows, len(rows))), rows[first : first + batch_rows]
                return
            numbered = itertools.chain([following], numbered)
        elif start == b"{" and isinstance(_json_line(line), BadRow):
            # One object written over several lines, or JSON lines whose first is broken? The next line tells,
            # without reading a large file whole: only an object's own lines do not parse alone.
            following = _next_filled(numbered)
            if following is None or isinstance(_json_line(following[1]), BadRow):
                # Parsed whole up to a bound (and to the end of a line): a large file past it is read on, line by line.
                rest = (following[1] if following else b"") + lines.read(WHOLE_OBJECT_CHECK_BYTES)
                rest += b"" if rest.endswith(b"\n") else lines.readline()
                _refuse_objects_over_lines(path, line + rest, len(line))
                numbered = enumerate(itertools.chain(io.BytesIO(rest), lines),
                                     start=following[0] if following else number + 1)
            else:
                numbered = itertools.chain([following], numbered)
        yield from _json_line_rows(itertools.chain([(number, line)], numbered), batch_rows)
        return


def _lines_begun_in(file: pa.NativeFile, start: int, end: int, lines_before: int) -> Iterator[tuple[int, bytes]]:
    """The lines of a file that begin in bytes [start, end), numbered (``lines_before``: the line breaks before
    ``start``). A line running into ``start`` from before is the previous piece's, read whole there."""
    file.seek(max(start - 1, 0))
    lines = io.BufferedReader(file, READ_BUFFER_BYTES)
    position, number = max(start - 1, 0), lines_before
    if start > 0:
        rest = lines.readline()  # from the byte before the piece to the end of its line: a line break at most
        position += len(rest)
        number += rest.count(b"\n", 1)  # (one in the piece: the line running into it ends in it)
    while position < end:
        line = lines.readline()
        if not line:
            return
        yield number, line
        position += len(line)
        number += 1


def _next_filled(numbered: Iterator[tuple[int, bytes]]) -> tuple[int, bytes] | None:
    """The next line that holds something, with its number; None at the end."""
    return next(((number, line) for number, line in numbered if line.strip()), None)


def _json_line_rows(numbered: Iterator[tuple[int, bytes]], batch_rows: int) -> Iterator[tuple[Sequence[int], list[Any]]]:
    numbers, batch = [], []
    for number, line in numbered:
        if not line.strip():  # blank lines (a trailing newline, say) hold no row
            continue
        numbers.append(number)
        batch.append(_json_line(line))
        if len(batch) == batch_rows:
            yield numbers, batch
            numbers, batch = [], []
    if batch:
        yield numbers, batch


def _refuse_objects_over_lines(path: str, data: bytes, first_line_length: int) -> None:
    """A file holding one JSON object (pretty-printed, say {"data": [...]}) is no rows of pairs, nor are objects
    pretty-printed one after another (`jq .`): read line by line, every line but a few would be dropped as
    broken JSON, and the ledger would not say why. ``data``: the file from its start, whole or not."""
    try:
        parsed = json.loads(data)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and e.pos > first_line_length:  # a whole object over several lines, then more
            raise SourceError(f"{path}: JSON objects each written over several lines (pretty-printed), one after "
                              "another: write one per line (JSON lines, as `jq -c` does) or one JSON array of them") from None
        return  # JSON lines, the first one broken (or an object larger than the bound): dropped and named like any other
    except JSON_ERRORS:
        return
    if isinstance(parsed, dict):
        lists = [key for key, value in parsed.items() if isinstance(value, list)]
        raise SourceError(f"{path}: one JSON object, not rows of pairs"
                          + (f" (its field {lists[0]!r} holds a list)" if lists else "")
                          + ": write one pair per line (JSON lines) or one JSON array of pairs")


def _json_array(path: str, data: bytes) -> list[Any]:
    try:
        return json.loads(data)  # (json.loads skips a BOM itself)
    except JSON_ERRORS as e:
        raise SourceError(f"{path}: not valid JSON ({e})") from e


def _json_line(line: bytes) -> Any:
    try:
        return json.loads(line)
    except JSON_ERRORS as e:
        return BadRow(f"is not valid JSON: {e}")
