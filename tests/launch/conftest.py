"""A real prepared data set for the launch tests: the session fixture `prepared_data` (a
manifest written by `python -m data_prep run`) when tests/conftest.py provides it, else the
same command run here on a small slice of the installed packages' documentation (~10 s)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SMALL_PREP = {
    "sources": [{"name": "docs", "type": "site_packages", "max_bytes": 2_000_000, "task_bytes": 1_000_000}],
    "filters": {"language": {"enabled": False}},
    "tokenizer": {"vocab_size": 1024, "sample_bytes": 1_000_000},
    "shards": {"target_bytes": 4_000_000, "validation_fraction": 0.05},
    "executor": {"workers": 2},
}


def build_small_prep(out: Path) -> Path:
    cfg = out / "prep.json"
    cfg.write_text(json.dumps(SMALL_PREP))
    subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(cfg), "--out", str(out / "prep")],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    return out / "prep" / "shards" / "manifest.json"


@pytest.fixture(scope="session")
def launch_manifest(request, tmp_path_factory) -> Path:
    try:
        return Path(request.getfixturevalue("prepared_data"))
    except pytest.FixtureLookupError:
        return build_small_prep(tmp_path_factory.mktemp("launch-data"))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts real multi-process runs (tens of seconds each)")
