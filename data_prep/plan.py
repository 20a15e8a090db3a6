"""Split the input into tasks: a byte range of a large uncompressed jsonl file (cut at line
boundaries, about `task_bytes` each), a whole compressed or columnar file, or a group of small
text files.

The plan is written once to OUT/work/plan.json and reused on resume, so a rerun sees the same
tasks even if the directory listing changed. A document's global id (gid) is
`task_index << 32 | ordinal`: ordering by gid is ordering by (source, file, line), which is
what makes "the first copy survives" deterministic. A range knows the number of its first
line (counted in parallel before the plan is saved: `number_lines`), so ids (`file:line`) and
reports are the same however the file is cut.
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from data_prep.config import PrepConfig, SourceConfig, site_packages_dir
from data_prep.executor import report_progress
from data_prep.readers import CODECS, ReadError

# What a directory of a jsonl source contributes: never *.json (configs, manifests, stats lie beside data).
JSONL_SUFFIXES = tuple(".jsonl" + codec for codec in ("", *CODECS))
# A compressed stream can only be decoded from its start (multi-member gzip or multi-frame
# zstd would need an index of member offsets): one task per compressed file.
CODECS_SUFFIXES = tuple(CODECS)
SCAN_BYTES = 1 << 20
COUNT_BYTES = 16 << 20


def _after_newline(f, pos: int, size: int) -> int:
    """The first line start at or after `pos`: `pos` itself if the byte before it is a newline,
    else just past the next newline (or `size`). Reads only up to that newline."""
    f.seek(pos - 1)
    while pos < size:
        chunk = f.read(SCAN_BYTES)
        if not chunk:
            return size
        i = chunk.find(b"\n")
        if i >= 0:
            return pos + i
        pos += len(chunk)
    return size


def line_cuts(path: str, size: int, task_bytes: int) -> list[int]:
    """Offsets that cut a file into ranges of about task_bytes at line starts (0 and size not
    included): one seek and a short read per cut, never the whole file."""
    cuts: list[int] = []
    try:
        with open(path, "rb") as f:
            target = task_bytes
            while target < size:
                cut = _after_newline(f, target, size)
                if cut >= size:
                    break
                cuts.append(cut)
                target = cut + task_bytes
    except OSError as e:
        raise ReadError(f"{path}: I/O error while planning: {e.strerror or e}") from None
    return cuts


@dataclass
class Task:
    index: int
    source: str
    kind: str  # reader: jsonl | parquet | hf_dataset | text
    root: str  # file paths are relative to it (what reports show)
    files: list[str]
    bytes: int
    # jsonl ranges: files[0] from byte `start` (a line start) to `end` (just after a newline);
    # None: to the end of the file as it is when read (an uncut file, or a cut file's last range).
    start: int = 0
    end: int | None = None
    first_line: int = 1  # line number of the line at `start`

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
            cuts = line_cuts(f, n, src.task_bytes) if src.type == "jsonl" and not f.endswith(CODECS_SUFFIXES) else []
            if not cuts:
                tasks.append(Task(len(tasks), src.name, src.type, os.path.dirname(f), [f], n))
                continue
            bounds = [0, *cuts, n]
            for a, b in zip(bounds, bounds[1:]):
                tasks.append(Task(len(tasks), src.name, src.type, os.path.dirname(f), [f], b - a, start=a,
                                  end=b if b < n else None))
    if not tasks:
        raise ReadError("no input files found for any source")
    return tasks


def count_lines(task: Task) -> int:
    """Newlines in a task's range: big reads and bytes.count, at disk speed."""
    path, n, done = task.files[0], 0, 0
    try:
        with open(path, "rb") as f:
            f.seek(task.start)
            while done < task.bytes:
                chunk = f.read(min(task.bytes - done, COUNT_BYTES))
                if not chunk:
                    raise ReadError(f"{path}: ends at byte {task.start + done}, before the end of its planned range "
                                    f"({task.end}): the file changed; use a new --out")
                n += chunk.count(b"\n")
                done += len(chunk)
                report_progress(done)
    except OSError as e:
        raise ReadError(f"{path}: I/O error while counting lines: {e.strerror or e}") from None
    return n


def number_lines(tasks: list[Task], ex) -> list[Task]:
    """Set first_line of every range of a cut file, from the lines of the ranges before it,
    counted in parallel by the executor (each range but a file's last)."""
    counted = [t for t, nxt in zip(tasks, tasks[1:]) if nxt.start > 0]
    if not counted:
        return tasks
    found = ex.map("count lines", count_lines, counted, [t.bytes for t in counted], unit="B")
    counts = {t.index: n for t, n in zip(counted, found)}
    line = 1
    for t in tasks:
        if t.start == 0:
            line = 1
        t.first_line = line
        line += counts.get(t.index, 0)
    return tasks


def save_plan(tasks: list[Task], path: Path) -> None:
    from data_prep.io_utils import atomic_write_text

    atomic_write_text(path, json.dumps([asdict(t) for t in tasks], indent=1))


def load_plan(path: Path) -> list[Task]:
    return [Task(**t) for t in json.loads(path.read_text())]
