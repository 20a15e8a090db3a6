"""Read stage: stream records out of jsonl(.gz/.zst), parquet, saved Hugging Face datasets and
plain text files (whole file = one document; for a .py file, its docstrings), one record at a time, never the whole input in memory.

A reader never raises on bad content: malformed JSON, invalid UTF-8, a missing or non-string
text field, an oversized record or a truncated compressed stream become `Record(bad=reason)`
with file and line, and reading goes on. A file that cannot be opened at all raises ReadError.
"""
from __future__ import annotations

import gzip
import inspect
import io
import json
import re
import zlib
from pathlib import Path
from typing import Iterator

from data_prep.records import Record


class ReadError(RuntimeError):
    pass


def _open_binary(path: str) -> io.BufferedIOBase:
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise ReadError(f"{path}: cannot open: {e.strerror}") from None
    if path.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return raw


def _doc_id(value, fallback: str) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return fallback


def read_jsonl(path: str, text_field: str, id_field: str | None, max_bytes: int, rel: str) -> Iterator[Record]:
    f = _open_binary(path)
    line = 0
    with f:
        while True:
            line += 1
            try:
                raw = f.readline(max_bytes + 1)
                if not raw:
                    return
                if len(raw) > max_bytes and not raw.endswith(b"\n"):
                    # Skip the rest of an oversized line in bounded chunks.
                    n = len(raw)
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(1 << 20)
                        n += len(raw)
                    yield Record(rel, line, bad="too_large", nbytes=n)
                    continue
            except (EOFError, OSError, zlib.error):
                # Truncated or corrupt compressed stream: nothing after this point is readable.
                yield Record(rel, line, bad="truncated_file")
                return
            except Exception as e:  # zstandard.ZstdError and friends
                if type(e).__name__ == "ZstdError":
                    yield Record(rel, line, bad="truncated_file")
                    return
                raise
            yield _parse_json_line(raw, rel, line, text_field, id_field)


def _parse_json_line(raw: bytes, rel: str, line: int, text_field: str, id_field: str | None) -> Record:
    n = len(raw)
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Record(rel, line, bad="invalid_utf8", nbytes=n)
    if not s.strip():
        return Record(rel, line, bad="empty", nbytes=n)
    try:
        obj = json.loads(s)
    except (json.JSONDecodeError, RecursionError):
        return Record(rel, line, bad="malformed_json", nbytes=n)
    if not isinstance(obj, dict):
        return Record(rel, line, bad="not_an_object", nbytes=n)
    if text_field not in obj or obj[text_field] is None:
        return Record(rel, line, bad="missing_text", nbytes=n)
    text = obj[text_field]
    if not isinstance(text, str):
        return Record(rel, line, bad="text_not_string", nbytes=n)
    doc_id = _doc_id(obj.get(id_field) if id_field else None, f"{rel}:{line}")
    return Record(rel, line, doc_id, text, nbytes=n)


_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.S)


def python_docstrings(source: str) -> str:
    """The triple-quoted strings of a Python file (its docstrings), blank-line separated:
    the prose part of an installed package."""
    parts = [inspect.cleandoc(a or b) for a, b in _DOCSTRING.findall(source)]
    return "\n\n".join(p for p in parts if p.strip())


def read_text_file(path: str, max_bytes: int, rel: str) -> Iterator[Record]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise ReadError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        yield Record(rel, 1, bad="too_large", nbytes=Path(path).stat().st_size)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        yield Record(rel, 1, bad="invalid_utf8", nbytes=len(data))
        return
    if path.endswith(".py"):
        text = python_docstrings(text)
        if not text:
            yield Record(rel, 1, bad="no_docstrings", nbytes=len(data))
            return
    yield Record(rel, 1, rel, text, nbytes=len(data))


def _arrow_rows(batches, rel: str, text_field: str, id_field: str | None, max_bytes: int, schema) -> Iterator[Record]:
    import pyarrow as pa

    names = schema.names
    has_text = text_field in names
    text_ok = has_text and (pa.types.is_string(schema.field(text_field).type) or pa.types.is_large_string(schema.field(text_field).type))
    row = 0
    for batch in batches:
        texts = batch.column(text_field).to_pylist() if text_ok else None
        ids = batch.column(id_field).to_pylist() if id_field and id_field in names else None
        for i in range(batch.num_rows):
            row += 1
            if not has_text:
                yield Record(rel, row, bad="missing_text")
                continue
            if not text_ok:
                yield Record(rel, row, bad="text_not_string")
                continue
            text = texts[i]
            if text is None:
                yield Record(rel, row, bad="missing_text")
                continue
            n = len(text.encode("utf-8", "surrogatepass"))
            if n > max_bytes:
                yield Record(rel, row, bad="too_large", nbytes=n)
                continue
            yield Record(rel, row, _doc_id(ids[i] if ids else None, f"{rel}:{row}"), text, nbytes=n)


def read_parquet(path: str, text_field: str, id_field: str | None, max_bytes: int, rel: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ReadError(f"{path}: cannot open as parquet: {e}") from None
    schema = pf.schema_arrow
    cols = [c for c in (text_field, id_field) if c and c in schema.names]
    if text_field not in schema.names:
        # Still one outcome per row: every row lacks the text field.
        yield from (Record(rel, r + 1, bad="missing_text") for r in range(pf.metadata.num_rows))
        return
    yield from _arrow_rows(pf.iter_batches(batch_size=1024, columns=cols), rel, text_field, id_field, max_bytes, schema)


def read_arrow_stream(path: str, text_field: str, id_field: str | None, max_bytes: int, rel: str) -> Iterator[Record]:
    """One data file of a dataset saved with `datasets.Dataset.save_to_disk` (Arrow IPC stream)."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(path))
    except Exception as e:
        raise ReadError(f"{path}: cannot open as Arrow stream: {e}") from None
    yield from _arrow_rows(reader, rel, text_field, id_field, max_bytes, reader.schema)


def read_file(kind: str, path: str, rel: str, text_field: str, id_field: str | None, max_bytes: int) -> Iterator[Record]:
    if kind == "jsonl":
        return read_jsonl(path, text_field, id_field, max_bytes, rel)
    if kind == "parquet":
        return read_parquet(path, text_field, id_field, max_bytes, rel)
    if kind == "hf_dataset":
        return read_arrow_stream(path, text_field, id_field, max_bytes, rel)
    return read_text_file(path, max_bytes, rel)
