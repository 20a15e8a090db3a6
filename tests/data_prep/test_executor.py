"""The local executor's progress bar moves while a task works, not only when it ends."""
import json
import time
from functools import partial
from pathlib import Path

import pytest

from data_prep import executor
from data_prep.config import PrepConfig
from data_prep.executor import LocalExecutor, report_progress
from data_prep.plan import make_plan
from data_prep.prepare import run_prepare
from prep_corpus import real_documents, tiny_config, write_jsonl


class _Bar:
    """Records the bar's position after every update; `on_update` runs on each."""

    def __init__(self, on_update=lambda: None):
        self.n, self.seen, self.on_update = 0.0, [], on_update

    def update(self, k):
        self.n += k
        self.seen.append(self.n)
        self.on_update()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _half_then_wait(flags: Path, item: str) -> bool:
    report_progress(50)
    deadline = time.time() + 60
    while not (flags / "seen").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(executor.REPORT_EVERY_S)
    report_progress(500)  # past the item's weight (or arriving after its end): the bar stops at the weight
    return (flags / "seen").exists()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_bar_moves_within_a_task(tmp_path, monkeypatch, workers):
    # Failed first: the bar moved only when a task ended, so each task here waited in vain.
    bar = _Bar(lambda: (tmp_path / "seen").touch())  # the tasks finish only once the bar has moved
    monkeypatch.setattr(executor, "_bar", lambda *a: bar)
    got = LocalExecutor(workers).map("test", partial(_half_then_wait, tmp_path), ["a", "b"], [100, 100], unit="B")
    assert got == [True, True]
    assert bar.seen[0] == 50 and bar.seen == sorted(bar.seen) and bar.n == 200


def test_prepare_reports_bytes_read_within_its_task(tmp_path, monkeypatch):
    rows = [{"text": t} for t in real_documents(60)[:40]]
    path = write_jsonl(tmp_path / "one.jsonl", rows)
    cfg = PrepConfig.model_validate(tiny_config([{"name": "s", "type": "jsonl", "paths": [str(path)]}]))
    (task,) = make_plan(cfg)
    bar = _Bar()
    monkeypatch.setattr(executor, "_bar", lambda *a: bar)
    LocalExecutor(1).map("prepare", partial(run_prepare, cfg, prepare_dir=tmp_path / "prep"), [task], [task.bytes], unit="B")
    first_line = len(json.dumps(rows[0]).encode()) + 1
    assert bar.seen[0] == first_line and bar.n == task.bytes == path.stat().st_size
