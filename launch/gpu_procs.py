"""Process control for the GPU check: every command in its own process group, each with a hard
time limit, and nothing left running when the check ends, however it ends.

A command's ranks hold the GPU, so a command that outlives the check (a collective that hangs,
the check stopped by Ctrl-C, SIGTERM or its own budget) would keep the GPU from whoever comes
next. Each command starts in a new process group, so that the deepspeed launcher, its launch
process and every rank are killed with one `killpg`. The check also makes itself a child
subreaper (Linux `PR_SET_CHILD_SUBREAPER`): a descendant that left its group (`setsid`) and lost
its parent is re-parented to the check instead of to init, so `stop_all` still finds it among
the check's descendants, kills it and reaps it.

    processes = Processes()
    done = processes.run("a-train", cmd, log_dir, env, timeout=300)   # Finished, or raises TimedOut
    processes.stop_all()                                               # on a signal or at the budget's end

Fault injection (tests and fire drills, off unless the variable is set):
    GPU_CHECK_INJECT_HANG=b     every command of step b is replaced by a process tree that sleeps
                                (a child in the same group and a grandchild in a session of its own)
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36
# A command the injected hang runs instead: it sleeps with a child, and with a grandchild that
# leaves the process group as a careless launcher could.
HANG = ("import subprocess, time; subprocess.Popen(['sleep', '600']); "
        "subprocess.Popen(['sleep', '601'], start_new_session=True); print('hanging', flush=True); time.sleep(600)")


class TimedOut(Exception):
    def __init__(self, name: str, limit: float, output_tail: str):
        super().__init__(f"{name}: no result within its limit of {limit:.0f} s; killed")
        self.output_tail = output_tail


class Stopped(BaseException):
    """The check was asked to stop (a signal, or its budget's last second): not an Exception,
    so no step's error handling swallows it."""

    def __init__(self, why: str, exit_code: int):
        super().__init__(why)
        self.exit_code = exit_code


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self, chars: int = 3000) -> str:
        return tail(self.stdout, self.stderr, chars)


def tail(stdout: str, stderr: str, chars: int = 3000) -> str:
    return (stdout[-chars // 2:] + ("\n--- stderr ---\n" + stderr[-chars // 2:] if stderr.strip() else "")).strip()


def become_subreaper() -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: groups are still killed, orphans that left them are not
        return False


class Processes:
    """The commands the check starts, and the means to stop them all."""

    def __init__(self, inject_hang: str = ""):
        self.subreaper = become_subreaper()
        self.running: dict[int, subprocess.Popen] = {}  # process group id → its leader
        self.inject_hang = inject_hang or os.environ.get("GPU_CHECK_INJECT_HANG", "")

    def run(self, name: str, cmd: list[str], log_dir: Path, env: dict, timeout: float, cwd: Path | None = None,
            step: str = "") -> Finished:
        """Run `cmd` in a process group of its own; stdout and stderr go to LOG_DIR/NAME.out and
        .err as they come (a killed command leaves what it said). At `timeout` seconds its group
        is killed and TimedOut raised."""
        if step and step in self.inject_hang.split(","):
            cmd = [sys.executable, "-c", HANG]
        log_dir.mkdir(parents=True, exist_ok=True)
        out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        tic = time.monotonic()
        with out_path.open("w") as out, err_path.open("w") as err:
            proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                    process_group=0)
            self.running[proc.pid] = proc
            try:
                proc.wait(timeout=max(timeout, 0.1))
            except subprocess.TimeoutExpired:
                self.kill_group(proc.pid)
                raise TimedOut(name, timeout, tail(out_path.read_text(errors="replace"),
                                                   err_path.read_text(errors="replace"))) from None
            finally:  # also on Stopped: stop_all finds the group still listed and kills it
                if proc.returncode is not None:
                    self.kill_group(proc.pid)  # what the leader left behind in its group
        return Finished(proc.returncode, out_path.read_text(errors="replace"), err_path.read_text(errors="replace"),
                        time.monotonic() - tic)

    def kill_group(self, pgid: int) -> None:
        """SIGKILL the group, reap its leader and wait until no member is left running. SIGKILL
        is delivered asynchronously, so a member may still show as running for a moment after
        `killpg` returns; the members are this process's descendants (or re-parented to it)."""
        members = [p for p in descendants() if _pgid(p) == pgid]
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc = self.running.pop(pgid, None)
        if proc is not None:
            proc.wait()
        psutil.wait_procs(members, timeout=10)

    def stop_all(self, wait_s: float = 10.0) -> list[int]:
        """Kill every group started and every remaining descendant, and wait for them. Returns the
        pids that were still alive when asked to stop."""
        before = descendants()
        for pgid in list(self.running):
            self.kill_group(pgid)
        left = descendants() + [p for p in before if p.is_running()]
        for p in left:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(left, timeout=wait_s)
        reap_orphans()
        return [p.pid for p in before]


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except ProcessLookupError:
        return None


def descendants() -> list[psutil.Process]:
    try:
        return psutil.Process().children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def reap_orphans() -> None:
    """Collect the exit status of re-parented descendants (this process is their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
