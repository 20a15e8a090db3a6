"""Executors run a stage's tasks; stages never know where they run.

`map(label, fn, items, weights)` calls fn(item) for every item and returns the results in
item order, with a tqdm bar (rate and ETA) advanced by each finished item's weight
(input bytes, or 1 per task). `fn` must be a picklable module-level callable.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
from typing import Callable, Sequence

from tqdm import tqdm


def _bar(label: str, total: float, unit: str):
    return tqdm(total=total, desc=f"{label:<16}", unit=unit, unit_scale=unit == "B", unit_divisor=1024 if unit == "B" else 1000,
                dynamic_ncols=True, file=sys.stderr, mininterval=0.5, smoothing=0.1)


_FN: Callable | None = None


def _init_worker(fn: Callable) -> None:
    # The stage function (with its context: config and the whole plan) goes to each worker
    # once, not with every task.
    global _FN
    _FN = fn


def _call(args):
    i, item = args
    return i, _FN(item)


def _call_ray(fn, i, item):
    return i, fn(item)


class LocalExecutor:
    """All cores of this machine (processes: the work is CPU-bound Python)."""

    def __init__(self, workers: int | None = None):
        self.workers = workers or os.cpu_count() or 1

    def map(self, label: str, fn: Callable, items: Sequence, weights: Sequence[float] | None = None, unit: str = "task") -> list:
        weights = list(weights) if weights is not None else [1] * len(items)
        results: list = [None] * len(items)
        with _bar(label, sum(weights), unit) as bar:
            if self.workers == 1 or len(items) <= 1:
                for i, item in enumerate(items):
                    results[i] = fn(item)
                    bar.update(weights[i])
                return results
            # fork: workers inherit the imported modules and start in milliseconds.
            ctx = mp.get_context("fork")
            with ctx.Pool(min(self.workers, len(items)), initializer=_init_worker, initargs=(fn,)) as pool:
                for i, res in pool.imap_unordered(_call, list(enumerate(items))):
                    results[i] = res
                    bar.update(weights[i])
        return results


class RayExecutor:
    """The same tasks as Ray remote functions, on a cluster started with `ray start`.

    Every node must see OUT (a shared filesystem: NFS, Lustre, a mounted bucket), because
    tasks exchange their results through files there, exactly as they do locally.
    """

    def __init__(self, address: str | None = None, workers: int | None = None):
        import ray

        if not ray.is_initialized():
            ray.init(address=address, num_cpus=workers if address is None else None,
                     log_to_driver=False, include_dashboard=False)
        self.ray = ray

    def map(self, label: str, fn: Callable, items: Sequence, weights: Sequence[float] | None = None, unit: str = "task") -> list:
        ray = self.ray
        weights = list(weights) if weights is not None else [1] * len(items)
        remote = ray.remote(num_cpus=1, max_retries=3)(_call_ray)
        fn_ref = ray.put(fn)  # shipped to the object store once, resolved on each node
        pending = {remote.remote(fn_ref, i, it): i for i, it in enumerate(items)}
        results: list = [None] * len(items)
        with _bar(label, sum(weights), unit) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i, res = ray.get(ref)
                    del pending[ref]
                    results[i] = res
                    bar.update(weights[i])
        return results


def make_executor(kind: str, workers: int | None, address: str | None):
    if kind == "ray":
        return RayExecutor(address, workers)
    return LocalExecutor(workers)
