"""Executors run a stage's tasks; stages never know where they run.

`map(label, fn, items, weights)` calls fn(item) for every item and returns the results in
item order, with a tqdm bar (rate and ETA) advanced by each item's weight (input bytes, or 1
per task). While it works, fn may call `report_progress(done)` with how much of its item's
weight is done: the local executor moves the bar within a task (from worker processes through
a queue), the Ray executor when a task ends. `fn` must be a picklable module-level callable.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import socket
import sys
import tempfile
import time
from typing import Callable, Sequence

from tqdm import tqdm

REPORT_EVERY_S = 0.25  # a worker sends at most this often per task (and its first report at once)


def _bar(label: str, total: float, unit: str):
    return tqdm(total=total, desc=f"{label:<16}", unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5, smoothing=0.1)


class _Progress:
    """The bar's view of every item: advanced by reports within an item, completed by its end.
    A report never moves the bar back or past the item's weight, and one that arrives after
    the item ended is ignored."""

    def __init__(self, bar, weights: list[float]):
        self.bar, self.weights, self.shown = bar, weights, [0] * len(weights)  # int weights show as "16/16", not "16.0/16"

    def advance(self, i: int, done: float) -> None:
        step = min(done, self.weights[i]) - self.shown[i]
        if step > 0:
            self.shown[i] += step
            self.bar.update(step)

    def finish(self, i: int) -> None:
        self.advance(i, self.weights[i])


_FN: Callable | None = None
_SINK: Callable[[int, float], None] | None = None  # where report_progress goes in this process
_ITEM = -1
_SENT = 0.0


def report_progress(done: float) -> None:
    """Called by a stage function while it works: `done` of the current item's weight is
    finished (a running total). Cheap enough to call per record: sends at most every
    REPORT_EVERY_S; a no-op where nobody listens (Ray, direct calls)."""
    global _SENT
    if _SINK is None:
        return
    now = time.monotonic()
    if now - _SENT >= REPORT_EVERY_S:
        _SENT = now
        _SINK(_ITEM, done)


def _start_item(i: int) -> None:
    global _ITEM, _SENT
    _ITEM, _SENT = i, 0.0


def _init_worker(fn: Callable, reports) -> None:
    # The stage function (with its context: config and the whole plan) goes to each worker
    # once, not with every task.
    global _FN, _SINK
    _FN = fn
    _SINK = lambda i, done: reports.put((i, done))


def _call(args):
    i, item = args
    _start_item(i)
    return i, _FN(item)


def _call_ray(fn, i, item):
    import ray

    return i, fn(item), ray.get_runtime_context().get_node_id()


class ExecutorError(Exception):
    """The cluster cannot be used; the message is one line naming the address."""


class LocalExecutor:
    """All cores of this machine (processes: the work is CPU-bound Python)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def map(self, label: str, fn: Callable, items: Sequence, weights: Sequence[float] | None = None, unit: str = "task") -> list:
        global _SINK
        weights = list(weights) if weights is not None else [1] * len(items)
        results: list = [None] * len(items)
        with _bar(label, sum(weights), unit) as bar:
            progress = _Progress(bar, weights)
            if self.workers == 1 or len(items) <= 1:
                _SINK = progress.advance
                try:
                    for i, item in enumerate(items):
                        _start_item(i)
                        results[i] = fn(item)
                        progress.finish(i)
                finally:
                    _SINK = None
                return results
            # fork: workers inherit the imported modules and start in milliseconds.
            ctx = mp.get_context("fork")
            reports = ctx.Queue()
            with ctx.Pool(min(self.workers, len(items)), initializer=_init_worker, initargs=(fn, reports)) as pool:
                it = pool.imap_unordered(_call, list(enumerate(items)))
                for _ in items:
                    while True:
                        try:
                            i, res = it.next(timeout=REPORT_EVERY_S)
                            break
                        except mp.TimeoutError:
                            _drain(reports, progress)
                    _drain(reports, progress)
                    results[i] = res
                    progress.finish(i)
        return results


def _drain(reports, progress: _Progress) -> None:
    while True:
        try:
            i, done = reports.get_nowait()
        except queue.Empty:
            return
        progress.advance(i, done)


class RayExecutor:
    """The same tasks as Ray remote functions, on a cluster started with `ray start`.

    Every node must see OUT (a shared filesystem: NFS, Lustre, a mounted bucket), because
    tasks exchange their results through files there, exactly as they do locally.
    """

    def __init__(self, address: str | None = None, workers: int | None = None):
        import ray

        if not ray.is_initialized():
            if address is None:
                ray.init(num_cpus=workers, log_to_driver=False, include_dashboard=False)
            else:
                _connect(ray, address)
        self.ray = ray

    def map(self, label: str, fn: Callable, items: Sequence, weights: Sequence[float] | None = None, unit: str = "task") -> list:
        ray = self.ray
        weights = list(weights) if weights is not None else [1] * len(items)
        remote = ray.remote(num_cpus=1, max_retries=3)(_call_ray)
        fn_ref = ray.put(fn)  # shipped to the object store once, resolved on each node
        pending = {remote.remote(fn_ref, i, it): i for i, it in enumerate(items)}
        results: list = [None] * len(items)
        nodes: set[str] = set()
        with _bar(label, sum(weights), unit) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i, res, node = ray.get(ref)
                    del pending[ref]
                    results[i] = res
                    nodes.add(node)
                    bar.update(weights[i])
        # Which nodes did the work: a cluster that runs everything on the head is visible here.
        print(f"{label}: {len(items)} tasks ran on {len(nodes)} Ray node(s): {' '.join(sorted(n[:8] for n in nodes))}",
              file=sys.stderr)
        return results


# Ray tries a connection 20 times (about 1 s each when the cluster refuses the token, 40 s when
# nothing or no Ray answers: 14 minutes) and logs each try from its C++ core to stderr. A wrong
# address or token should cost seconds and say so in one line.
_CONNECT_TRIES = "3"


@contextlib.contextmanager
def _stderr_captured(into: list):
    """fd 2, where Python and Ray's C++ core both write, goes to a file; its text is appended to `into`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            into.append(f.read().decode(errors="replace"))


def _connect(ray, address: str) -> None:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if host and port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as e:
            why = "no answer in 10 s" if isinstance(e, TimeoutError) else e.strerror or str(e)
            raise ExecutorError(f"Ray address {address}: cannot connect ({why}); is the head node started there "
                                f"(`ray start --head --port={port}`)?") from None
    own_tries = "RAY_gcs_server_port_wait_time_s" not in os.environ  # a user's own setting wins
    if own_tries:
        os.environ["RAY_gcs_server_port_wait_time_s"] = _CONNECT_TRIES
    error, log = None, []
    try:
        with _stderr_captured(log):
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError, ray.exceptions.RayError) as e:
        error = e
    finally:
        if own_tries:
            del os.environ["RAY_gcs_server_port_wait_time_s"]
    if error is None:
        sys.stderr.write(log[0])  # what Ray says on a good connection is not lost
        return
    if isinstance(error, ray.exceptions.AuthenticationError):
        why = ("RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, "
               "or write ~/.ray/auth_token) to the cluster's token")
    elif "Unauthenticated" in log[0]:
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            why = ("the cluster rejected this process's token (taken from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                   "or ~/.ray/auth_token, in that order): give it the cluster's token")
        else:
            why = ("the cluster requires token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                   "(or RAY_AUTH_TOKEN_PATH) to the cluster's token")
    else:
        why = (str(error).strip() or type(error).__name__).splitlines()[0]
    raise ExecutorError(f"Ray address {address}: {why}") from None


def make_executor(kind: str, workers: int | None, address: str | None):
    if kind == "ray":
        return RayExecutor(address, workers)
    return LocalExecutor(workers)
