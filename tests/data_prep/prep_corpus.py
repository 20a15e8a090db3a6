"""Test helpers for tests/data_prep: real English text from the standard library's docstrings
(present on every machine with this Python), and tiny configs. (Not conftest.py: `tests/` is
on sys.path, so `from conftest import` would find tests/conftest.py.)"""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from data_prep.readers import python_docstrings

STDLIB_MODULES = ["argparse", "collections/__init__", "subprocess", "threading", "typing", "inspect", "logging/__init__",
                  "pathlib", "tarfile", "zipfile", "email/message", "unittest/case", "asyncio/events", "json/__init__",
                  "dataclasses", "functools", "shutil", "tempfile", "urllib/request", "http/client", "configparser",
                  "difflib", "doctest", "pdb", "pickle", "smtplib", "socket", "ssl", "statistics", "textwrap"]


def _paragraphs() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for m in STDLIB_MODULES:
        p = root / f"{m}.py"
        if not p.exists():
            continue
        for para in python_docstrings(p.read_text(encoding="utf-8")).split("\n\n"):
            para = " ".join(para.split())
            if len(para.split()) >= 12 and sum(c.isalpha() for c in para) > 0.6 * len(para):
                out.append(para)
    # The same paragraph can occur in two modules; keep the first.
    return list(dict.fromkeys(out))


_CACHE: dict[str, list[str]] = {}


def real_paragraphs() -> list[str]:
    if "p" not in _CACHE:
        _CACHE["p"] = _paragraphs()
    return _CACHE["p"]


def real_documents(min_words: int = 250) -> list[str]:
    """Distinct documents of at least min_words words, each built from consecutive paragraphs."""
    docs, cur = [], []
    for para in real_paragraphs():
        cur.append(para)
        if sum(len(p.split()) for p in cur) >= min_words:
            docs.append("\n\n".join(cur))
            cur = []
    return docs


def awkward_jsonl(path: Path, cut: int) -> bytes:
    """Real documents with bad lines everywhere, CRLF lines, a byte-order mark, malformed lines
    on both sides of offset `cut` (a line start: task_bytes=cut cuts there), an exact and a near
    duplicate of early documents near the end, and no newline after the last line."""
    bad = [b'{"text": "broken\n', b"\xff\xfe not utf-8\n", b"\n", b'{"body": "no text"}\n']
    docs = real_documents(40)
    lines = []
    for i, text in enumerate(docs[:60]):
        lines.append(json.dumps({"text": text}).encode() + (b"\r\n" if i % 4 == 1 else b"\n"))
        if i % 3 == 0:
            lines.append(bad[i % 4])
    # A malformed line that ends exactly at offset `cut`, and another one right after it, which
    # starts exactly at the first cut.
    off, k = 3, 0  # after the byte-order mark
    while off + len(lines[k]) <= cut - 11:
        off += len(lines[k])
        k += 1
    filler = ("A line that ends exactly where the first range ends. " * 100)[: cut - 11 - off]
    lines[k:k] = [b'{"text": "' + filler.encode() + b"\n", b'{"text": "cut right before me\n']
    lines[-1:-1] = [json.dumps({"text": docs[0]}).encode() + b"\n",  # an exact and a near duplicate, in another range
                    json.dumps({"text": docs[1] + " An edited footer."}).encode() + b"\n"]
    data = (b"\xef\xbb\xbf" + b"".join(lines)).rstrip(b"\r\n")  # no newline after the last line
    path.write_bytes(data)
    return data


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return path


def tiny_config(sources: list[dict], **over) -> dict:
    """Filters off, small vocab and partitions: fast, and every outcome is predictable."""
    cfg = {
        "sources": sources,
        "filters": {k: {"enabled": False} for k in ("language", "gopher_quality", "gopher_repetition", "c4", "fineweb")},
        "minhash": {"partitions": 4},
        "tokenizer": {"vocab_size": 400, "sample_bytes": 2_000_000},
        "shards": {"target_bytes": 200_000, "validation_fraction": 0.05},
        "executor": {"workers": 2},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(json.dumps(cfg, indent=1))
    return path
