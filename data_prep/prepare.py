"""Prepare task: read -> clean -> filter -> exact hash + MinHash, for one input task.

Output, written into a temporary directory renamed to prepare/task-NNNNN when complete (the
rename is the task's completion marker). Every file is appended to batch by batch, so the task
holds one batch (BATCH_DOCS documents or BATCH_CHARS characters), whatever its input's size:
  docs.arrow      surviving documents: gid, id, text (Arrow IPC stream)
  sigs.npy        MinHash signatures, row i = document i of docs.arrow (gid in gids.npy)
  exact-PPP.npy   text hashes by partition;  bands-PPP.npy  LSH band keys by partition
  ids-PPP.npy     (a source with id_field) id hashes by partition; where.json  file:line of each
                  record (data_prep/ids.py)
  rejected.jsonl  every bad-input and filtered record: file, line, outcome, reason
  removed.jsonl   (output.write_removed) the same with the removed text
  stats.json      this task's counters
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.clean import Cleaner
from data_prep.config import PrepConfig
from data_prep.dedup import BAND_DTYPE, EXACT_DTYPE, append_by_partition, hash_rows, partition_of
from data_prep.executor import report_progress
from data_prep.filters import build_filters
from data_prep.ids import IdHashes
from data_prep.io_utils import NpyAppender, commit_dir
from data_prep.minhash import EMPTY, MinHasher, band_keys
from data_prep.plan import Task
from data_prep.readers import read_file
from data_prep.records import BAD_INPUT, FILTERED, Record
from data_prep.stats import Histogram

DOCS_SCHEMA = pa.schema([("gid", pa.uint64()), ("id", pa.string()), ("text", pa.large_string())])
# A batch is flushed at BATCH_DOCS documents or BATCH_CHARS characters of text, whichever
# comes first: what a task holds (its heap is ~45 bytes per character of a batch while the
# batch is shingled) is bounded by these, never by its input's size.
BATCH_DOCS = 2048
BATCH_CHARS = 4 << 20
SAMPLES_PER_REASON, SAMPLE_CHARS = 3, 300


def exact_key(text: str) -> bytes:
    # Normalised for exact dedup: case and whitespace differences are the same document.
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _Batch:
    def __init__(self):
        self.gids: list[int] = []
        self.ids: list[str] = []
        self.texts: list[str] = []
        self.chars = 0

    def add(self, gid: int, rec: Record):
        self.gids.append(gid)
        self.ids.append(rec.id)
        self.texts.append(rec.text)
        self.chars += len(rec.text)

    def full(self) -> bool:
        return len(self.gids) >= BATCH_DOCS or self.chars >= BATCH_CHARS


class _Outputs:
    """The kept documents and their dedup keys, appended to disk one batch at a time."""

    def __init__(self, cfg: PrepConfig, tmp: Path):
        self.cfg = cfg
        self.P = P = cfg.minhash.partitions
        self.hasher = MinHasher(cfg.minhash.num_perm, cfg.minhash.seed) if cfg.minhash.enabled else None
        self.writer = pa.ipc.new_stream(str(tmp / "docs.arrow"), DOCS_SCHEMA)
        self.exact_out = [NpyAppender(tmp / f"exact-{p:03d}.npy", EXACT_DTYPE) for p in range(P)]
        self.band_out = [NpyAppender(tmp / f"bands-{p:03d}.npy", BAND_DTYPE) for p in range(P)]
        self.sigs_out = NpyAppender(tmp / "sigs.npy", np.uint32, (cfg.minhash.num_perm,))
        self.gids_out = NpyAppender(tmp / "gids.npy", np.uint64)

    def write(self, batch: _Batch):
        if not batch.gids:
            return
        cfg, P = self.cfg, self.P
        gids = np.array(batch.gids, dtype=np.uint64)
        self.writer.write_batch(pa.record_batch([pa.array(gids), pa.array(batch.ids, pa.string()),
                                                 pa.array(batch.texts, pa.large_string())], schema=DOCS_SCHEMA))
        if cfg.exact_dedup.enabled:
            rows = hash_rows([exact_key(t) for t in batch.texts], gids)
            append_by_partition(self.exact_out, rows, partition_of(rows["hi"], P))
        if self.hasher is not None:
            sigs = self.hasher(batch.texts, cfg.minhash.ngram)
            self.sigs_out.append(sigs)
            self.gids_out.append(gids)
            keep = sigs[:, 0] != EMPTY  # documents shorter than one shingle take no part in LSH
            keys = band_keys(sigs[keep], cfg.minhash.bands, cfg.minhash.rows)
            rows = np.empty(keys.size, dtype=BAND_DTYPE)
            rows["key"] = keys.ravel()
            rows["gid"] = np.repeat(gids[keep], cfg.minhash.bands)
            append_by_partition(self.band_out, rows, partition_of(rows["key"], P))

    def close(self):
        self.writer.close()
        for out in self.exact_out + self.band_out:
            out.close()
        if self.hasher is not None:
            self.sigs_out.close(create=True)
            self.gids_out.close(create=True)


class _Tally:
    """What happened to each record: counters for stats.json, and a row per removed record."""

    def __init__(self, tmp: Path, write_removed: bool):
        self.counts: Counter = Counter()  # outcome -> records
        self.nbytes: Counter = Counter()
        self.reasons: Counter = Counter()  # "bad_input:invalid_utf8", "filtered:gopher_quality:stop_words"
        self.reason_bytes: Counter = Counter()
        self.stage_in: Counter = Counter()  # filter name -> records it judged
        self.chars_hist = Histogram()
        self.incomplete: list[dict] = []  # files that could not be read to their end
        self.samples: dict[str, list] = {}  # a few removed documents per reason, for summary.md
        self.rejected = open(tmp / "rejected.jsonl", "w")
        self.removed = open(tmp / "removed.jsonl", "w") if write_removed else None

    def read(self, rec: Record):
        self.counts["input"] += 1
        self.nbytes["input"] += rec.nbytes

    def kept(self, rec: Record):
        self.counts["passed_filters"] += 1
        self.nbytes["passed_filters"] += len(rec.text.encode("utf-8", "surrogatepass"))
        self.chars_hist.add(len(rec.text))

    def reject(self, rec: Record, outcome: str, reason: str):
        key = f"{outcome}:{reason}"
        self.counts[outcome] += 1
        self.nbytes[outcome] += rec.nbytes
        self.reasons[key] += 1
        self.reason_bytes[key] += rec.nbytes
        row = {"file": rec.file, "line": rec.line, "id": rec.id, "outcome": outcome, "reason": reason}
        if reason == "truncated_file":
            row["records_read_before"] = rec.read_before
            self.incomplete.append({"file": rec.file, "records_read": rec.read_before})
        self.rejected.write(json.dumps(row, ensure_ascii=False) + "\n")
        if self.removed is not None:
            self.removed.write(json.dumps({**row, "text": rec.text}, ensure_ascii=False) + "\n")
        got = self.samples.setdefault(key, [])
        if len(got) < SAMPLES_PER_REASON:
            got.append({"where": rec.where, "id": rec.id, "text": (rec.text or "")[:SAMPLE_CHARS]})

    def close(self):
        self.rejected.close()
        if self.removed is not None:
            self.removed.close()

    def stats(self, task: Task, filters: list) -> dict:
        return {
            "task": task.index, "source": task.source, "input_bytes": task.bytes,
            "records": dict(sorted(self.counts.items())), "bytes": dict(sorted(self.nbytes.items())),
            "reasons": dict(sorted(self.reasons.items())), "reason_bytes": dict(sorted(self.reason_bytes.items())),
            "filter_inputs": [[f.name, self.stage_in[f.name]] for f in filters],  # in the order they run
            "chars_hist": self.chars_hist.to_json(),
            "incomplete_files": self.incomplete,
            "samples": self.samples,
        }


def _screen(rec: Record, cleaner: Cleaner, filters: list, tally: _Tally) -> tuple[str, str] | None:
    """(outcome, reason) when the record is not kept; cleans its text in place otherwise."""
    if rec.bad is not None:
        # An oversized document is a legitimate one over the configured limit, not bad input.
        return (FILTERED if rec.bad == "too_large" else BAD_INPUT), rec.bad
    if cleaner(rec) is not None:
        return BAD_INPUT, "empty"
    for f in filters:
        tally.stage_in[f.name] += 1
        r = f(rec)
        if r is not None:
            return FILTERED, f"{f.name}:{r}"
    return None


def _records(cfg: PrepConfig, task: Task, src):
    """The task's records in order, reporting bytes read to the progress bar."""
    done = 0  # bytes of the task's files before this one
    for path in task.files:
        rel = str(Path(path).relative_to(task.root)) if path.startswith(task.root) else path
        # A range of a cut jsonl file starts at its own first line: ids and reports name the
        # whole file's line numbers, as they would if it were read in one task.
        yield from read_file(task.kind, path, f"{task.source}/{rel}", src.text_field, src.id_field,
                             cfg.read.max_doc_bytes, cfg.read.max_record_bytes, task.start, task.end,
                             task.first_line, lambda n: report_progress(done + n))
        done += task.bytes if len(task.files) == 1 else Path(path).stat().st_size
        report_progress(done)


def run_prepare(cfg: PrepConfig, task: Task, prepare_dir: Path) -> dict:
    final = prepare_dir / f"task-{task.index:05d}"
    if final.exists():
        return json.loads((final / "stats.json").read_text())
    tmp = prepare_dir / f".task-{task.index:05d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    src = next(s for s in cfg.sources if s.name == task.source)
    cleaner = Cleaner(cfg.clean, html=src.html)
    filters = build_filters(cfg.filters_for(src))
    tally = _Tally(tmp, cfg.output.write_removed)
    outputs = _Outputs(cfg, tmp)
    ids = IdHashes(tmp, src.name, cfg.minhash.partitions) if src.id_field else None
    batch = _Batch()
    for ordinal, rec in enumerate(_records(cfg, task, src)):
        gid = task.gid(ordinal)
        tally.read(rec)
        if ids is not None:
            ids.add(gid, rec)
        refused = _screen(rec, cleaner, filters, tally)
        if refused is not None:
            tally.reject(rec, *refused)
            continue
        tally.kept(rec)
        batch.add(gid, rec)
        if batch.full():
            # Every full batch goes to disk at once: the task holds one batch, whatever its input's size.
            outputs.write(batch)
            batch = _Batch()
    outputs.write(batch)
    outputs.close()
    tally.close()
    if ids is not None:
        ids.close()
    stats = tally.stats(task, filters)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True))
    commit_dir(tmp, final)
    return stats
