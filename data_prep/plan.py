"""Split the input into tasks: one per input file, or a group of small text files.

The plan is written once to OUT/work/plan.json and reused on resume, so a rerun sees the same
tasks even if the directory listing changed. A document's global id (gid) is
`task_index << 32 | ordinal`: ordering by gid is ordering by (source, file, line), which is
what makes "the first copy survives" deterministic.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.config import PrepConfig, SourceConfig, site_packages_dir
from data_prep.readers import CODECS, ReadError

JSONL_SUFFIXES = tuple(base + codec for base in (".jsonl", ".json") for codec in ("", *CODECS))


@dataclass
class Task:
    index: int
    source: str
    kind: str  # reader: jsonl | parquet | hf_dataset | text
    root: str  # file paths are relative to it (what reports show)
    files: list[str]
    bytes: int

    def gid(self, ordinal: int) -> int:
        return (self.index << 32) | ordinal


def _expand(paths: list[str], want, wanted: str) -> list[str]:
    out: list[str] = []
    for p in paths:
        hits = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
        if not hits:
            raise ReadError(f"{p}: no input matches")
        for h in hits:
            if os.path.isdir(h):
                n = len(out)
                for dirpath, dirnames, filenames in os.walk(h):
                    dirnames.sort()
                    out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if want(f))
                if len(out) == n:
                    raise ReadError(f"{h}: directory has no {wanted} files")
            elif not os.path.exists(h):
                raise ReadError(f"{h}: no such file")
            else:
                out.append(h)
    return out


def _check_readable(path: str) -> int:
    try:
        with open(path, "rb"):
            pass
        return os.path.getsize(path)
    except OSError as e:
        raise ReadError(f"{path}: cannot open: {e.strerror}") from None


def _hf_dataset_files(path: str) -> list[str]:
    """Data files of a dataset saved with save_to_disk (a Dataset dir or a DatasetDict dir)."""
    p = Path(path)
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text())["splits"]
        return [f for s in splits for f in _hf_dataset_files(str(p / s))]
    state = p / "state.json"
    if not state.exists():
        raise ReadError(f"{path}: not a saved Hugging Face dataset (no state.json or dataset_dict.json)")
    return [str(p / f["filename"]) for f in json.loads(state.read_text())["_data_files"]]


def _text_files(src: SourceConfig) -> tuple[str, list[str]]:
    roots = src.paths or [site_packages_dir()]
    files: list[tuple[int, str]] = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for f in sorted(filenames):
                full = os.path.join(dirpath, f)
                rel = os.path.relpath(full, root)
                for prio, pat in enumerate(src.patterns):
                    if fnmatch.fnmatchcase(rel, pat) and os.path.isfile(full) and not os.path.islink(full):
                        files.append((prio, full))
                        break
    files.sort()
    return os.path.commonpath(roots) if len(roots) > 1 else roots[0], [f for _, f in files]


def make_plan(cfg: PrepConfig) -> list[Task]:
    tasks: list[Task] = []
    for src in cfg.sources:
        if src.type in ("text_files", "site_packages"):
            root, files = _text_files(src)
            group: list[str] = []
            size = total = 0
            for f in files:
                n = os.path.getsize(f)
                if src.max_bytes is not None and total + n > src.max_bytes:
                    continue  # keep looking for smaller files that still fit the bound
                total += n
                group.append(f)
                size += n
                if size >= src.task_bytes:
                    tasks.append(Task(len(tasks), src.name, "text", root, group, size))
                    group, size = [], 0
            if group:
                tasks.append(Task(len(tasks), src.name, "text", root, group, size))
            if not files:
                raise ReadError(f"source '{src.name}': no file under {', '.join(src.paths or [root])} matches {src.patterns}")
            continue
        if src.type == "hf_dataset":
            files = [f for p in src.paths for f in _hf_dataset_files(p)]
        else:
            suffixes = JSONL_SUFFIXES if src.type == "jsonl" else (".parquet",)
            files = _expand(src.paths, lambda f: f.endswith(suffixes), "/".join(suffixes))
        total = 0
        for f in files:
            n = _check_readable(f)
            if src.max_bytes is not None and total + n > src.max_bytes:
                break
            total += n
            tasks.append(Task(len(tasks), src.name, src.type, os.path.dirname(f), [f], n))
    if not tasks:
        raise ReadError("no input files found for any source")
    return tasks


def save_plan(tasks: list[Task], path: Path) -> None:
    from data_prep.io_utils import atomic_write_text

    atomic_write_text(path, json.dumps([asdict(t) for t in tasks], indent=1))


def load_plan(path: Path) -> list[Task]:
    return [Task(**t) for t in json.loads(path.read_text())]
