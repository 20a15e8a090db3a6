"""Read stage: stream records out of jsonl (plain or .gz/.zst/.bz2/.xz), parquet, saved Hugging
Face datasets and plain text files (whole file = one document; for a .py file, its docstrings),
one record at a time, never the whole input in memory.

Nothing is lost silently. Bad content (malformed JSON, invalid UTF-8, a missing or non-string
text field, an oversized record) becomes `Record(bad=reason)` with file and line, and reading
goes on. A compressed stream that ends early or is corrupt after some records becomes one
`truncated_file` record whose `kept` says how many records came before it. Everything else
stops the run with one ReadError line naming the file: it cannot be opened, an I/O error
while reading, or its content is not what its name says (a plain file named `.gz`).
"""
from __future__ import annotations

import bz2
import inspect
import io
import json
import lzma
import re
import zlib
from pathlib import Path
from typing import Callable, Iterator

from data_prep.records import Record


class ReadError(RuntimeError):
    pass


class Truncated(Exception):
    """The compressed stream ended before its end marker, or is corrupt past its start."""


def _zstd():
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj()


# suffix -> (codec name for messages, new decompressor). Every one of them has `.eof` and
# `.unused_data`, which is what tells a complete stream from a cut one.
CODECS = {
    ".gz": ("gzip", lambda: zlib.decompressobj(wbits=31)),
    ".zst": ("zstd", _zstd),
    ".bz2": ("bzip2", bz2.BZ2Decompressor),
    ".xz": ("xz", lzma.LZMADecompressor),
}


class _Decompressed(io.RawIOBase):
    """A compressed file as a raw stream of its decompressed bytes, multi-member/multi-frame.

    The codecs' own file objects cannot be trusted to report a cut stream (zstandard's
    stream_reader returns a clean EOF), so the end is checked here: input exhausted while the
    decompressor has not seen its end marker raises Truncated."""

    def __init__(self, raw, path: str, codec: str, new):
        self.raw, self.path, self.codec, self.new = raw, path, codec, new
        self.dec = new()
        self.started = False  # the codec accepted some input: later failures are corruption, not a wrong format
        self.pending = b""

    def readable(self) -> bool:
        return True

    def _chunk(self) -> bytes:
        while True:
            data = self.raw.read(1 << 16)  # OSError propagates: the caller names the file
            if not data:
                if self.started and self.dec.eof:
                    return b""
                if not self.started:
                    raise ReadError(f"{self.path}: not a {self.codec} file (it is empty)")
                raise Truncated
            try:
                out = self.dec.decompress(data)
                while self.dec.eof and self.dec.unused_data:  # the next member / frame
                    rest = self.dec.unused_data
                    self.dec = self.new()
                    out += self.dec.decompress(rest)
            except (zlib.error, lzma.LZMAError, OSError, EOFError) as e:
                if not self.started:
                    raise ReadError(f"{self.path}: not a {self.codec} file ({e})") from None
                raise Truncated from None
            except Exception as e:  # zstandard.ZstdError
                if type(e).__name__ != "ZstdError":
                    raise
                if not self.started:
                    raise ReadError(f"{self.path}: not a {self.codec} file ({e})") from None
                raise Truncated from None
            self.started = True
            if out:
                return out

    def readinto(self, b) -> int:
        if not self.pending:
            self.pending = self._chunk()
        n = min(len(b), len(self.pending))
        b[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        return n

    def close(self):
        self.raw.close()
        super().close()


def _open_binary(path: str) -> io.BufferedIOBase:
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise ReadError(f"{path}: cannot open: {e.strerror}") from None
    for suffix, (codec, new) in CODECS.items():
        if path.endswith(suffix):
            return io.BufferedReader(_Decompressed(raw, path, codec, new), 1 << 20)
    return raw


def first_record_fields(path: str) -> list[str]:
    """The field names of a jsonl file's first record; [] when it is not a JSON object."""
    try:
        with _open_binary(path) as f:
            obj = json.loads(f.readline(1 << 20).decode("utf-8", "replace").lstrip("\ufeff"))
    except (ReadError, OSError, ValueError, RecursionError):
        return []
    return sorted(obj) if isinstance(obj, dict) else []


def _doc_id(value, fallback: str) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return fallback


def read_jsonl(path: str, text_field: str, id_field: str | None, max_bytes: int, rel: str,
               max_record_bytes: int = 64 << 20, start: int = 0, end: int | None = None, first_line: int = 1,
               progress: Callable[[int], None] | None = None) -> Iterator[Record]:
    """Records up to max_record_bytes are parsed, so that one whose text is over max_bytes is
    reported `too_large` with its id; longer lines are skipped in bounded chunks, unparsed.

    start/end: the byte range of an uncompressed file to read (start at a line start, end just
    after a newline: plan.line_cuts), whose first line is number first_line. progress(n) is
    called before each record with the bytes of the file on disk read so far (from start)."""
    limit = max(max_record_bytes, max_bytes)
    f = _open_binary(path)
    disk = f.raw.raw if isinstance(f.raw, _Decompressed) else None  # compressed: count bytes on disk
    line = first_line - 1
    pos = start  # where the next line starts
    with f:
        if start:
            f.seek(start)
        while end is None or pos < end:
            line += 1
            try:
                raw = f.readline(limit + 1)
                if not raw:
                    if end is not None:
                        raise ReadError(f"{path}: ends at byte {pos}, before the end of its planned range "
                                        f"({end}): the file changed; use a new --out")
                    return
                at_file_start = pos == 0
                pos += len(raw)
                if at_file_start and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]  # a UTF-8 byte-order mark is not part of the first record
                if len(raw) > limit and not raw.endswith(b"\n"):
                    n = len(raw)
                    while raw and not raw.endswith(b"\n"):
                        raw = f.readline(1 << 20)
                        n += len(raw)
                        pos += len(raw)
                    if progress is not None:
                        progress(disk.tell() if disk is not None else pos - start)
                    yield Record(rel, line, bad="too_large", nbytes=n)
                    continue
                if progress is not None:
                    progress(disk.tell() if disk is not None else pos - start)
            except Truncated:
                yield Record(rel, line, bad="truncated_file", read_before=line - first_line)
                return
            except OSError as e:
                raise ReadError(f"{path}: I/O error after line {line - 1}: {e.strerror or e}") from None
            rec = _parse_json_line(raw, rel, line, text_field, id_field)
            if rec.bad is None and len(raw) > max_bytes and len(rec.text.encode("utf-8", "surrogatepass")) > max_bytes:
                rec = Record(rel, line, rec.id, bad="too_large", nbytes=len(raw))
            yield rec


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
    try:
        with f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise ReadError(f"{path}: I/O error: {e.strerror or e}") from None
    if len(data) > max_bytes:
        yield Record(rel, 1, rel, bad="too_large", nbytes=Path(path).stat().st_size)
        return
    try:
        text = data.decode("utf-8-sig")
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
            doc_id = _doc_id(ids[i] if ids else None, f"{rel}:{row}")
            if n > max_bytes:
                yield Record(rel, row, doc_id, bad="too_large", nbytes=n)
                continue
            yield Record(rel, row, doc_id, text, nbytes=n)


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


def read_file(kind: str, path: str, rel: str, text_field: str, id_field: str | None, max_bytes: int,
              max_record_bytes: int = 64 << 20, start: int = 0, end: int | None = None, first_line: int = 1,
              progress: Callable[[int], None] | None = None) -> Iterator[Record]:
    """Records of one file, or of the byte range start..end of a jsonl file (see read_jsonl)."""
    if kind == "jsonl":
        return read_jsonl(path, text_field, id_field, max_bytes, rel, max_record_bytes, start, end, first_line, progress)
    if kind == "parquet":
        return _arrow_io(path, read_parquet(path, text_field, id_field, max_bytes, rel))
    if kind == "hf_dataset":
        return _arrow_io(path, read_arrow_stream(path, text_field, id_field, max_bytes, rel))
    return read_text_file(path, max_bytes, rel)


def _arrow_io(path: str, records: Iterator[Record]) -> Iterator[Record]:
    """An Arrow or parquet file that fails while being read (an I/O error, a cut file) stops
    the run naming it: rows cannot be counted past the failure."""
    import pyarrow as pa

    try:
        yield from records
    except (OSError, pa.ArrowException) as e:
        raise ReadError(f"{path}: read failed: {e}") from None
