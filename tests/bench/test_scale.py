"""bench/scale.py --quick end to end: the whole data-prep pipeline at every size runs as one
measured command (`python -m data_prep run`) and gets a wall time, a throughput and per-process
peak memory, anonymous and resident; the loader's order is measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from runs import REPO, bench_module, cpu_env


@pytest.mark.slow  # two data_prep commands of ten seconds each and four loader probes
def test_quick_run_measures_the_pipeline_at_every_size_and_the_loader(tmp_path):
    proc = subprocess.run([sys.executable, "bench/scale.py", "--quick", "--json", str(tmp_path / "scale.json")],
                          cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "scale.json").read_text())
    sizes = doc["sizes_mb"]
    assert sizes == [0.05, 0.5]
    assert doc["stages"] == ["run"]
    assert sorted((r["stage"], r["size_mb"]) for r in doc["prep"]) == [("run", z) for z in sizes]
    for r in doc["prep"]:
        assert r["wall_s"] > 0 and r["mb_s_core"] > 0 and r["driver_peak_mb"] > 0, r
        # the exact maximum over the process tree is at least what polling saw of any process in it
        assert r["tree_peak_mb"] >= max(r["driver_peak_mb"], r["worker_peak_mb"]) * 0.99, r
        # anonymous memory is part of the resident set: never above its high-water mark
        assert 0 < r["driver_anon_mb"] <= r["driver_peak_mb"], r
        # prepare's tasks (8 files) run in a pool: its workers were seen
        assert 0 < r["worker_anon_mb"] <= r["worker_peak_mb"], r
    g = doc["growth"]["run"]
    assert g["s_per_mb"] > 0 and g["driver_peak"] > 0 and g["driver_anon"] > 0 and g["worker_anon"] > 0
    assert g["flat"] == (max(g["driver_anon"], g["worker_anon"]) <= 1.2)
    # the planted copies were found, and every document is accounted for
    big = doc["corpora"][-1]
    assert big["planted_exact"] > 0 and big["exact_duplicate"] > 0 and big["near_duplicate"] > 0
    assert big["input"] == big["documents"] and big["kept"] > 0
    current = [r for r in doc["loader"] if r["method"] == "current"]
    assert [r["extrapolated"] for r in current] == [False, False, True]
    assert current[-1]["samples"] == 10**12 // 2048
    # BlendOrder is measured wherever pipeline.data has it, and its absence is said otherwise
    assert any(r["method"] == "blendorder" for r in doc["loader"]) or "no BlendOrder" in doc["notes"][0]
    assert all(r["build_s"] > 0 and r["tracemalloc_peak_mb"] > 0 and r["locate_us"] > 0 for r in doc["loader"])

    table = proc.stdout
    for size in ("0.05", "0.5"):
        assert any(line.startswith(f"| run | {size} |") for line in table.splitlines()), (size, table)
    assert f"| run: 0.05 -> 0.5 MB | {'flat' if g['flat'] else 'grows'} |" in table
    assert "| current index | 1T, extrapolated |" in table


def test_growth_tells_batches_that_filled_up_from_memory_that_keeps_growing():
    scale = bench_module("scale")
    sizes = [1, 10, 100, 1000]

    def rows(stage, worker_anon):
        return [{"stage": stage, "size_mb": z, "input_mb": z, "wall_s": 2 + z / 2, "driver_anon_mb": 130,
                 "worker_anon_mb": w, "driver_peak_mb": 250, "worker_peak_mb": w + 80, "tree_peak_mb": w + 80}
                for z, w in zip(sizes, worker_anon)]

    g = scale.growth(rows("filled", [170, 195, 219, 221]) + rows("leaks", [170, 200, 240, 300]), sizes, ["filled", "leaks"])
    filled, leaks = g["filled"], g["leaks"]
    assert not filled["flat"] and filled["worker_anon"] == pytest.approx(221 / 170)
    assert filled["last_step"]["flat"] and filled["last_step"]["worker_anon"] == pytest.approx(221 / 219)
    assert not leaks["flat"] and not leaks["last_step"]["flat"]
    assert filled["marginal_s_per_mb"] == pytest.approx(1.0)  # the wall time above is linear in the input
    row = scale.growth_row("filled", 100, 1000, filled["last_step"], "last step")
    assert row.startswith("| filled: 100 -> 1000 MB | flat | s/MB x") and "| x1.01 |" in row
    # two sizes: no last step apart from the whole range
    assert scale.growth(rows("filled", [170, 195, 219, 221])[:2], sizes[:2], ["filled"])["filled"]["last_step"] is None
