"""The GPU check's report: every step's result as `report.json` (every figure, for tools) and
`report.md` (the same figures, for people), written together so they never disagree."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

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


def failed(results: list[StepResult]) -> bool:
    return any(r.status == "fail" for r in results)


def write_report(out: Path, results: list[StepResult], environment: dict, dry_run: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    doc = {"dry_run": dry_run, "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "passed": not failed(results),
           "environment": environment, "steps": [asdict(r) for r in results]}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "report.md").write_text(markdown(doc))


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


def markdown(doc: dict) -> str:
    title = "# GPU check" + (" (dry run: profiles through the planner and the preflight, no GPU used)"
                             if doc["dry_run"] else "")
    verdict = "every step passed or was skipped" if doc["passed"] else "at least one step FAILED"
    lines = [title, "", f"Written {doc['written']}; {verdict}.", "", *_environment(doc["environment"]), "",
             "| step | what | result | wall time |", "|---|---|---|---|"]
    lines += [f"| {r['step']} | {r['title']} | {r['status']}"
              + (f": {_value(r['reason'])}" if r["status"] == "skipped" else "")
              + f" | {_duration(r['seconds'])} |" for r in doc["steps"]]
    lines.append("")
    for r in doc["steps"]:
        lines += _step(r)
    return "\n".join(lines)
