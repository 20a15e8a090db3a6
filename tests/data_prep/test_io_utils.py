"""Staged output directories: whole or absent, readable by others, and no litter after a kill."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from data_prep.io_utils import staged_dir

REPO = Path(__file__).resolve().parents[2]

KILLED = """
import os, signal, sys
from pathlib import Path
from data_prep.io_utils import staged_dir
with staged_dir(Path(sys.argv[1])) as tmp:
    (tmp / "half.safetensors").write_bytes(b"x" * 100)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_writer_leaves_nothing_after_the_next_run(tmp_path):
    final = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(final)], cwd=REPO, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode < 0  # killed inside the block
    left = list(tmp_path.glob(".hf.tmp-*"))
    assert len(left) == 1 and not final.exists()
    # Failed first: the killed export's hidden directory stayed forever.
    with staged_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert (final / "config.json").read_text() == "{}"
