"""The prepare task's memory: bounded by its batch (BATCH_DOCS), not by its input's size."""
import random
import tracemalloc

import numpy as np
import pytest

from prep_corpus import real_paragraphs, tiny_config, write_jsonl
from data_prep import prepare
from data_prep.config import PrepConfig
from data_prep.plan import make_plan


def _prepare(tmp_path, docs: int, traced: bool) -> tuple[int, dict]:
    """Peak traced heap (numpy arrays included: numpy reports them to tracemalloc) and stats
    of one prepare task over `docs` documents of one real paragraph each."""
    rng = random.Random(docs)
    paras = real_paragraphs()
    d = tmp_path / f"n{docs}"
    write_jsonl(d / "in" / "a.jsonl", [{"text": rng.choice(paras)} for _ in range(docs)])
    cfg = PrepConfig.model_validate(tiny_config([{"name": "web", "type": "jsonl", "paths": [str(d / "in")]}]))
    (task,) = make_plan(cfg)
    if not traced:
        return 0, prepare.run_prepare(cfg, task, d / "prepare")
    tracemalloc.start()
    try:
        stats = prepare.run_prepare(cfg, task, d / "prepare")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return peak, stats


@pytest.mark.parametrize("bound", ["BATCH_DOCS", "BATCH_CHARS"])
def test_prepare_heap_does_not_grow_with_input(tmp_path, monkeypatch, bound):
    # Failed first: the task kept every document's signature, exact key and band keys until
    # its end (0.6 MB of heap for 200 documents, 2.4 MB for 800 here: 3 KB per document).
    # A batch ends at BATCH_DOCS documents or BATCH_CHARS characters, whichever comes first.
    monkeypatch.setattr(prepare, "BATCH_DOCS", 8 if bound == "BATCH_DOCS" else 10**9)
    monkeypatch.setattr(prepare, "BATCH_CHARS", 1500 if bound == "BATCH_CHARS" else 10**12)
    _prepare(tmp_path, 8, traced=False)  # imports and one-time tables, outside the measurement
    small, s_stats = _prepare(tmp_path, 150, traced=True)
    big, b_stats = _prepare(tmp_path, 600, traced=True)
    assert s_stats["records"]["passed_filters"] == 150 and b_stats["records"]["passed_filters"] == 600
    # A batch's texts, signatures, keys and temporaries, whatever the input's size: 450 more
    # documents may add counters, never their keys (old: ~1.4 MB more).
    assert big - small < 450 * 100, (small, big)
    sigs = np.load(tmp_path / "n600" / "prepare" / "task-00000" / "sigs.npy")
    gids = np.load(tmp_path / "n600" / "prepare" / "task-00000" / "gids.npy")
    assert sigs.shape == (600, 112) and np.all(np.diff(gids.astype(np.int64)) == 1)
