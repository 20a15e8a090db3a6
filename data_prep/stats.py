"""Accounting: merge per-task counters into stats.json, check that the outcomes add up to
the input records, and write a readable summary with PNG plots of the main distributions."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from data_prep.records import EXACT_DUP, NEAR_DUP, OUTCOMES

# The reason a duplicate is removed under: the stage that found it, as filters name their rule.
DEDUP_REASONS = {EXACT_DUP: f"{EXACT_DUP}:exact_dedup", NEAR_DUP: f"{NEAR_DUP}:near_dedup"}


class Histogram:
    """Log-scale histogram (4 bins per power of two) that merges by adding counts, so each
    task keeps a few hundred numbers instead of one per document."""

    def __init__(self, counts: dict[int, int] | None = None):
        self.counts: Counter = Counter(counts or {})

    def add(self, value: int) -> None:
        self.counts[0 if value <= 0 else int(math.log2(value) * 4) + 1] += 1

    def add_many(self, values) -> None:
        for v in values:
            self.add(int(v))

    def merge(self, other: "Histogram") -> None:
        self.counts.update(other.counts)

    def to_json(self) -> dict[str, int]:
        return {str(k): v for k, v in sorted(self.counts.items())}

    @classmethod
    def from_json(cls, d: dict[str, int]) -> "Histogram":
        return cls({int(k): v for k, v in d.items()})

    def edges(self) -> list[tuple[float, int]]:
        return [(0.0 if k == 0 else 2 ** ((k - 1) / 4), v) for k, v in sorted(self.counts.items())]


def _add(a: dict, b: dict) -> None:
    for k, v in b.items():
        a[k] = a.get(k, 0) + v


NO_DUPLICATE_IDS = {"records": 0, "sources": {}, "examples": []}


def aggregate(prepare: list[dict], tokenize: list[dict], max_examples_per_reason: int = 3, off: list[str] = (),
              duplicate_ids: dict = NO_DUPLICATE_IDS) -> dict:
    """stats.json from the prepare and tokenize tasks' counters. Every removed record has a
    reason: prepare's (bad input, filters) and the dedup stage that removed it (tokenize counts
    those). `off`: the dedup stages the config switched off, marked in the stage table.
    `duplicate_ids`: the duplicate_ids stage's report (data_prep/ids.py)."""
    records: dict = {}
    nbytes: dict = {}
    reasons: dict = {}
    reason_bytes: dict = {}
    filter_inputs: dict = {}
    per_source: dict = {}
    chars, tokens = Histogram(), Histogram()
    incomplete = [f for p in prepare for f in p.get("incomplete_files", [])]
    for p, t in zip(prepare, tokenize):
        rec = {k: v for k, v in p["records"].items() if k != "passed_filters"}
        _add(rec, t["records"])
        byt = {k: v for k, v in p["bytes"].items() if k != "passed_filters"}
        _add(byt, t["bytes"])
        _add(records, rec)
        _add(nbytes, byt)
        why = {**p["reasons"], **{r: t["records"][o] for o, r in DEDUP_REASONS.items() if t["records"].get(o)}}
        why_bytes = {**p["reason_bytes"], **{r: t["bytes"][o] for o, r in DEDUP_REASONS.items() if t["records"].get(o)}}
        _add(reasons, why)
        _add(reason_bytes, why_bytes)
        _add(filter_inputs, dict(p["filter_inputs"]))  # a list of pairs: keeps the filters' order
        src = per_source.setdefault(p["source"], {"records": {}, "bytes": {}, "tokens": 0, "reasons": {},
                                                  "reason_bytes": {}, "samples": {}})
        _add(src["records"], rec)
        _add(src["bytes"], byt)
        _add(src["reasons"], why)
        _add(src["reason_bytes"], why_bytes)
        for reason, docs in p.get("samples", {}).items():
            have = src["samples"].setdefault(reason, [])
            have.extend(docs[: max_examples_per_reason - len(have)])
        src["tokens"] += t["tokens"]
        chars.merge(Histogram.from_json(p["chars_hist"]))
        tokens.merge(Histogram.from_json(t["tokens_hist"]))
    for o in OUTCOMES:
        records.setdefault(o, 0)
        nbytes.setdefault(o, 0)
    outcomes = sum(records[o] for o in OUTCOMES)
    ok = outcomes == records.get("input", 0)
    for s in per_source.values():
        s["accounting_ok"] = sum(s["records"].get(o, 0) for o in OUTCOMES) == s["records"].get("input", 0)
    return {
        # Input is what could be read: a file cut short counts up to its cut (one truncated_file
        # record stands for the unreadable rest), and is listed here so that nobody mistakes
        # "adds up" for "read everything".
        "accounting": {"input_records": records.get("input", 0), "outcome_records": outcomes, "ok": ok,
                       "incomplete_files": incomplete},
        "duplicate_ids": duplicate_ids,
        "records": dict(sorted(records.items())),
        "bytes": dict(sorted(nbytes.items())),
        "tokens": {"kept": sum(t["tokens"] for t in tokenize)},
        "reasons": dict(sorted(reasons.items())),
        "reason_bytes": dict(sorted(reason_bytes.items())),
        "stages": _stage_table(records, nbytes, reasons, reason_bytes, filter_inputs, off),
        "sources": dict(sorted(per_source.items())),
        "histograms": {"document_chars": chars.to_json(), "document_tokens": tokens.to_json()},
    }


def _stage_table(records: dict, nbytes: dict, reasons: dict, reason_bytes: dict, filter_inputs: dict,
                 off: list[str]) -> list[dict]:
    """Documents and bytes into and removed by each stage, in pipeline order. Bytes are as
    read for records removed before cleaning finished, cleaned text after. A dedup stage that
    is off says so (it removed nothing because it did not run, not because it found nothing)."""
    def removed(prefix: str, exclude: str | None = None) -> tuple[int, int]:
        keys = [k for k in reasons if k.startswith(prefix) and k != exclude]
        return sum(reasons[k] for k in keys), sum(reason_bytes.get(k, 0) for k in keys)

    rows = []
    docs = records.get("input", 0)
    n, b = removed("bad_input:", exclude="bad_input:empty")
    n2, b2 = removed("filtered:too_large")
    rows.append({"stage": "read", "in": docs, "removed": n + n2, "removed_bytes": b + b2})
    n += n2
    docs -= n
    n, b = removed("bad_input:empty")
    rows.append({"stage": "clean", "in": docs, "removed": n, "removed_bytes": b})
    for name, count in filter_inputs.items():
        n, b = removed(f"filtered:{name}:")
        rows.append({"stage": f"filter:{name}", "in": count, "removed": n, "removed_bytes": b})
    docs = records.get("kept", 0) + records.get("exact_duplicate", 0) + records.get("near_duplicate", 0)
    rows.append({"stage": "exact_dedup", "in": docs, "removed": records.get("exact_duplicate", 0),
                 "removed_bytes": nbytes.get("exact_duplicate", 0)})
    docs -= records.get("exact_duplicate", 0)
    rows.append({"stage": "near_dedup", "in": docs, "removed": records.get("near_duplicate", 0),
                 "removed_bytes": nbytes.get("near_duplicate", 0)})
    for r in rows:
        r["out"] = r["in"] - r["removed"]
        if r["stage"] in off:
            r["off"] = True
    return rows


def write_summary(stats: dict, out: Path) -> str:
    lines = ["# Data prep summary", ""]
    acc = stats["accounting"]
    lines.append(f"Input records: {acc['input_records']:,}; outcomes add up: {'yes' if acc['ok'] else 'NO'}")
    for f in acc.get("incomplete_files", []):
        lines.append(f"- **{f['file']} could not be read to its end**: {f['records_read']:,} records read before the cut "
                     "(counted above); the rest of the file is not in the input count")
    ids = stats["duplicate_ids"]
    if ids["records"]:
        lines.append(f"- **{repeated_ids(ids)}**; the first:")
        lines += [f"  - {e['source']}: id `{e['id']}` at `{e['first']}` and `{e['again']}`" for e in ids["examples"]]
    lines += ["", "| outcome | records | bytes |", "|---|---:|---:|"]
    for o in OUTCOMES:
        lines.append(f"| {o} | {stats['records'][o]:,} | {stats['bytes'][o]:,} |")
    lines += ["", f"Kept tokens: {stats['tokens']['kept']:,}", "", "| stage | in | removed | removed bytes | out |", "|---|---:|---:|---:|---:|"]
    for r in stats["stages"]:
        name = f"{r['stage']} (off)" if r.get("off") else r["stage"]
        lines.append(f"| {name} | {r['in']:,} | {r['removed']:,} | {r['removed_bytes']:,} | {r['out']:,} |")
    lines += ["", "| source | input | kept | bytes kept | tokens |", "|---|---:|---:|---:|---:|"]
    for name, s in stats["sources"].items():
        lines.append(f"| {name} | {s['records'].get('input', 0):,} | {s['records'].get('kept', 0):,} | "
                     f"{s['bytes'].get('kept', 0):,} | {s['tokens']:,} |")
    lines += ["", "## Removed, per source and rule", "", "| source | rule | documents | bytes | share of the source's input bytes |",
              "|---|---|---:|---:|---:|"]
    for name, s in stats["sources"].items():
        total = s["bytes"].get("input", 0) or 1
        for k, v in sorted(s["reasons"].items(), key=lambda kv: (-kv[1], kv[0])):
            b = s["reason_bytes"].get(k, 0)
            lines.append(f"| {name} | {k} | {v:,} | {b:,} | {100 * b / total:.1f}% |")
    lines += ["", "## Samples of removed documents (first of each source and rule)", ""]
    for name, s in stats["sources"].items():
        for reason, docs in sorted(s["samples"].items()):
            lines.append(f"### {name}: {reason}")
            lines.append("")
            for d in docs:
                text = " ".join(d["text"].split())
                lines.append(f"- `{d['where']}` id `{d['id']}`: {text[:200]}{'...' if len(text) > 200 else ''}")
            lines.append("")
    lines += ["", "Plots: plots/outcomes.png, plots/document_chars.png, plots/document_tokens.png", ""]
    text = "\n".join(lines)
    return text


def write_plots(stats: dict, plot_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    meta = {"Software": None}  # no version string: plots stay byte-identical across reruns
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(OUTCOMES)
    ax.barh(names, [stats["records"][o] for o in names], color="#4477aa")
    ax.set_xlabel("records")
    ax.set_title("Outcome of every input record")
    fig.tight_layout()
    fig.savefig(plot_dir / "outcomes.png", metadata=meta)
    plt.close(fig)
    for key, label in (("document_chars", "characters per document (after filters)"),
                       ("document_tokens", "tokens per kept document")):
        h = Histogram.from_json(stats["histograms"][key]).edges()
        fig, ax = plt.subplots(figsize=(7, 3.5))
        if h:
            xs, ys = zip(*h)
            ax.bar(xs, ys, width=[max(x * 0.18, 0.5) for x in xs], align="edge", color="#228833")
            ax.set_xscale("symlog")
        ax.set_xlabel(label)
        ax.set_ylabel("documents")
        fig.tight_layout()
        fig.savefig(plot_dir / f"{key}.png", metadata=meta)
        plt.close(fig)


def repeated_ids(ids: dict) -> str:
    """What stats.json duplicate_ids counts, in words (summary.md and the console say the same)."""
    per = ", ".join(f"{source} {n:,}" for source, n in ids["sources"].items())
    return (f"{ids['records']:,} record(s) repeat an earlier record's id in their source ({per}), so an id in "
            "rejected.jsonl or duplicates.jsonl can name two documents")


def dump(obj) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
