"""The GPU check's report: every step's result as `report.json` (every figure, for tools) and
`report.md` (the same figures, for people), written together so they never disagree, and
`logs.tar.gz`, the last LOG_TAIL_BYTES of every command's output. Three files, written again after
every step (each under a temporary name, then renamed), so a check stopped half-way still
returns what it measured: a GPU machine that gives back a few files only (`$OUT`) gets all of it."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOG_TAIL_BYTES = 256 * 1024

STATUSES = ("pass", "fail", "skipped")


@dataclass
class StepResult:
    step: str  # "a" … "d"
    title: str
    status: str  # one of STATUSES
    seconds: float
    figures: dict = field(default_factory=dict)
    reason: str = ""  # why it failed or was skipped
    output_tail: str = ""  # the end of the failing command's output
    estimate_s: float | None = None  # the plan's estimate of its wall time
    limit_s: float | None = None  # the hard limit it ran under


def failed(results: list[StepResult]) -> bool:
    return any(r.status == "fail" for r in results)


def write_report(out: Path, results: list[StepResult], environment: dict, dry_run: bool, plan: dict | None = None,
                 stopped: str = "", logs: Path | None = None) -> None:
    """report.json and report.md (and logs.tar.gz of the commands' outputs under `logs`) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {"dry_run": dry_run, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "passed": not failed(results) and not stopped, "stopped": stopped or None, "environment": environment,
           "plan": plan, "steps": [asdict(r) for r in results]}
    _replace(out / "report.json", (json.dumps(doc, indent=2, default=str) + "\n").encode())
    _replace(out / "report.md", markdown(doc).encode())
    if logs is not None:
        _replace(out / "logs.tar.gz", log_tails(logs))


def log_tails(logs: Path) -> bytes:
    """A gzipped tar of the last LOG_TAIL_BYTES of each file under `logs`."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(logs.rglob("*")) if logs.is_dir() else []:
            if not path.is_file():
                continue
            with path.open("rb") as f:
                f.seek(max(0, path.stat().st_size - LOG_TAIL_BYTES))
                data = f.read()
            info = tarfile.TarInfo(f"logs/{path.relative_to(logs)}")
            info.size, info.mtime, info.mode = len(data), int(path.stat().st_mtime), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _replace(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m {s:02d}s" if m else f"{s}s"


def _value(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if v is None:
        return "none"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    text = v if isinstance(v, str) else json.dumps(v)
    return text.replace("|", "\\|").replace("\n", " ⏎ ")


def flatten(figures: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Nested figures as (dotted name, printable value) rows, in the order they were recorded."""
    rows = []
    for k, v in figures.items():
        if isinstance(v, dict) and v:
            rows += flatten(v, f"{prefix}{k}.")
        else:
            rows.append((f"{prefix}{k}", _value(v)))
    return rows


def _environment(env: dict) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in env.items() if k != "packages"]
    packages = env.get("packages", {})
    if packages:
        lines += ["", "| package | used | requirements.txt |", "|---|---|---|"]
        lines += [f"| {name} | {p['used'] or 'missing'} | {p['pinned']} |" for name, p in packages.items()]
    return lines


def _step(r: dict) -> list[str]:
    lines = [f"## {r['step']}. {r['title']}: {r['status']} ({_duration(r['seconds'])})", ""]
    if r["reason"]:
        lines += [f"{'Skipped' if r['status'] == 'skipped' else 'Failed'}: {r['reason']}", ""]
    rows = flatten(r["figures"])
    if rows:
        lines += ["| figure | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if r["output_tail"]:
        lines += ["End of the failing command's output:", "", "```", r["output_tail"].rstrip(), "```", ""]
    return lines


def _seconds(v: float | None) -> str:
    return "" if v is None else _duration(v)


def markdown(doc: dict) -> str:
    title = "# GPU check" + (" (dry run: profiles through the planner and the preflight, no GPU used)"
                             if doc["dry_run"] else "")
    verdict = "every step passed or was skipped" if doc["passed"] else "at least one step FAILED"
    if doc.get("stopped"):
        verdict = f"STOPPED ({doc['stopped']}); the steps after it did not run"
    lines = [title, "", f"Written {doc['written']}; {verdict}.", ""]
    plan = doc.get("plan")
    if plan:
        lines += [f"Budget {plan['budget_s']:.0f} s on {plan['gpu']}: ~{plan['planned_s']:.0f} s planned.", ""]
    lines += [*_environment(doc["environment"]), "",
              "| step | what | result | wall time | estimate | limit |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['title']} | {r['status']}"
              + (f": {_value(r['reason'])}" if r["status"] == "skipped" else "")
              + f" | {_duration(r['seconds'])} | {_seconds(r.get('estimate_s'))} | {_seconds(r.get('limit_s'))} |"
              for r in doc["steps"]]
    lines.append("")
    for r in doc["steps"]:
        lines += _step(r)
    return "\n".join(lines)
