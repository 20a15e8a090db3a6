"""A two-node Ray cluster on this machine, started with the real `ray start`: a head and a second
node, one CPU each, each with its own temp dir, token authentication on.

Stopped by killing its own process groups, not with `ray stop`: that stops every Ray process
on the machine, including other users' clusters and test runs."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runs import free_port

RAY = Path(sys.executable).with_name("ray")  # the `ray` CLI of this environment


@dataclasses.dataclass
class Cluster:
    address: str
    env: dict  # what a driver needs: the cluster's token
    node_ids: list[str]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _node_id(temp_dir: Path) -> str | None:
    """A started node leaves `<port name>_port_<node id>` files in its session directory."""
    names = [p.name for p in (temp_dir / "session_latest").glob("*_port_*")]
    ids = {m.group(1) for n in names if (m := re.search(r"_port_([0-9a-f]{56})$", n))}
    return ids.pop() if len(ids) == 1 else None


def _group_members(pgids: set[int]) -> list[str]:
    """Live (not zombie) processes in these process groups, as 'pid command'."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        comm_end = text.rindex(")")
        state, _ppid, pgid = text[comm_end + 2:].split()[:3]
        if int(pgid) in pgids and state != "Z":
            out.append(f"{stat.parent.name} {text[text.index('(') + 1:comm_end]}")
    return out


def _wait(what: str, ready, procs: list, logs: list[Path], timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not ready():
        dead = [p for p in procs if p.poll() is not None]
        if dead or time.time() > deadline:
            tail = "\n".join(l.read_text()[-1500:] for l in logs)
            raise RuntimeError(f"{what}: {'ray start exited' if dead else 'timed out'}\n{tail}")
        time.sleep(0.2)


@contextlib.contextmanager
def two_node_cluster():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    # Short paths: Ray's unix sockets live under the temp dir (108-byte limit on their names).
    dirs = [Path(tempfile.mkdtemp(prefix="ray", dir="/tmp")) for _ in range(2)]
    port = free_port()
    # Every port a head opens by default at a fixed number is given a free one, so that this
    # cluster starts beside any other on the machine.
    head = ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
            "--include-dashboard=false"]
    second = [f"--address=127.0.0.1:{port}"]
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    try:
        for args, d in ((head, dirs[0]), (second, dirs[1])):
            logs.append(d.with_suffix(".log"))
            with open(logs[-1], "w") as log:
                procs.append(subprocess.Popen([str(RAY), "start", *args, "--num-cpus=1", f"--temp-dir={d}",
                                               "--disable-usage-stats", "--block"], env=env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))
            if d == dirs[0]:  # the second node may start as soon as the head's GCS listens
                _wait("Ray head", lambda: _listening(port), procs, logs)
        # `ray start` writes ray_current_cluster once its node runs.
        _wait("Ray nodes", lambda: all((d / "ray_current_cluster").exists() and _node_id(d) for d in dirs), procs, logs)
        yield Cluster(f"127.0.0.1:{port}", env, [_node_id(d) for d in dirs])
    finally:
        for p in procs:  # `ray stop --force`, for this cluster's processes only
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        deadline = time.time() + 10  # the killed processes' children take a moment to go
        while (left := _group_members({p.pid for p in procs})) and time.time() < deadline:
            time.sleep(0.1)
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
            d.with_suffix(".log").unlink(missing_ok=True)
        assert not left, f"processes of the test's Ray cluster outlived it: {left}"
