"""Collectives on the device their backend serves.

On a GPU node torch's default device is the CPU while the accelerator's is `cuda:N`, and NCCL
is bound to CUDA only: a collective handed a tensor made without an explicit device fails with
"No backend type associated with device type cpu". These tests recreate that split on the CPU:
each rank's process group is bound to the accelerator's device type only (`cpu:gloo` for the
CPU accelerator), and the default device is set to `meta`, so a tensor made without naming the
accelerator's device lands on a device the backend does not serve and the collective fails
exactly as NCCL does. (On `meta` a c10d op is a no-op rather than an error, so each rank also
wraps the collectives in a check of the tensors' device types against the ones the process
group's backend is bound to: the check NCCL makes.) Every call site of the trainer that hands a tensor to a collective runs
here in two real processes.
"""

from __future__ import annotations

import ast
import os
import traceback

import pytest
import torch
import torch.multiprocessing as mp

from runs import REPO, free_port

WORLD = 2


def _rank_main(rank: int, port: int, results) -> None:
    """Every call of CALLS in turn (in order: the last one replaces the accelerator), each
    result or error kept apart, in one process group, to start two processes once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    out = {}
    try:
        from deepspeed.accelerator import get_accelerator

        device_type = torch.device(get_accelerator().current_device_name()).type
        torch.distributed.init_process_group(f"{device_type}:gloo", rank=rank, world_size=WORLD)
        _check_devices_in_collectives()
        for name, call in CALLS.items():
            try:
                with torch.device("meta"):  # the default device differs from the accelerator's, as on a GPU node
                    out[name] = call(rank)
            except Exception:
                out[name] = "error: " + traceback.format_exc(limit=-3)
    finally:
        results.put((rank, out))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _check_devices_in_collectives() -> None:
    """Refuse, as c10d does for a device type its backend does not serve, any tensor whose device
    type is not one the default group's backend is bound to (`cpu:gloo` → {"cpu"})."""
    dist = torch.distributed
    served = {part.split(":")[0] for part in dist.get_backend_config().split(",")}

    def checked(fn):
        def call(*args, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
            for t in tensors:
                if t.device.type not in served:
                    raise RuntimeError(f"No backend type associated with device type {t.device.type}")
            return fn(*args, **kwargs)
        return call

    for name in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor",
                 "reduce", "gather", "scatter", "all_to_all_single", "send", "recv", "isend", "irecv"):
        setattr(dist, name, checked(getattr(dist, name)))


def _mean_and_any(rank: int):
    from pipeline.train import all_ranks_mean_and_any

    return all_ranks_mean_and_any(1.0 + 2.0 * rank, flag=rank == 1)


def _init_from_flag(rank: int):
    # ZeRO-3's --init-from: rank 0 tells every rank whether weights follow (none here).
    from pipeline.engines.zero import _load_partitioned

    _load_partitioned(None, None)
    return "ok"


def _broadcast(rank: int):
    from pipeline.distributed import broadcast_values

    return broadcast_values([7.0, float(rank)] if rank == 0 else [0.0, 0.0], src=0)


def _device_after_init(rank: int):
    """CUDA's rule, which the CPU accelerator does not have: a process's current device is 0 until
    it sets one. DeepSpeed's init_distributed sets none (its engine does, later), so the
    collectives before the engine exists (run id barrier, resume, --init-from broadcast) would
    put every rank of a node on GPU 0, which NCCL refuses ("Duplicate GPU detected")."""
    import deepspeed.accelerator
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    from pipeline.distributed import init_distributed

    class CurrentDeviceZeroUntilSet(CPU_Accelerator):
        def __init__(self):
            super().__init__()
            self._current = 0

        def set_device(self, index):
            self._current = int(index)

        def current_device(self):
            return self._current

    deepspeed.accelerator.set_accelerator(CurrentDeviceZeroUntilSet())
    init_distributed()  # the process group exists already, so DeepSpeed only adopts it
    return deepspeed.accelerator.get_accelerator().current_device()


CALLS = {"mean_and_any": _mean_and_any, "init_from_flag": _init_from_flag, "broadcast": _broadcast,
         "device_after_init": _device_after_init}


@pytest.fixture(scope="module")
def rank_results() -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    out = dict(results.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return out


def run_ranks(rank_results: dict, call: str) -> dict:
    return {rank: rank_results[rank].get(call, "not run") for rank in range(WORLD)}


def test_mean_and_preemption_flag_on_a_backend_bound_to_the_accelerator(rank_results):
    out = run_ranks(rank_results, "mean_and_any")
    assert out == {0: (2.0, True), 1: (2.0, True)}, out


def test_init_from_flag_broadcast_on_a_backend_bound_to_the_accelerator(rank_results):
    out = run_ranks(rank_results, "init_from_flag")
    assert out == {0: "ok", 1: "ok"}, out


def test_each_rank_uses_its_own_device_before_the_engine_exists(rank_results):
    assert run_ranks(rank_results, "device_after_init") == {0: 0, 1: 1}


def test_broadcast_values_reach_every_rank(rank_results):
    out = run_ranks(rank_results, "broadcast")
    assert out == {0: [7.0, 0.0], 1: [7.0, 0.0]}, out


COLLECTIVES = {"all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
               "reduce_scatter_tensor", "reduce", "gather", "scatter", "all_to_all", "all_to_all_single",
               "broadcast_object_list", "all_gather_object", "barrier", "send", "recv", "isend", "irecv"}


COLLECTIVE_MODULES = {"torch.distributed", "deepspeed.comm"}


def collective_calls(source: str) -> list[str]:
    """`LINE: NAME` for each collective that `source` reaches other than through pipeline/distributed.py:
    attributes of torch.distributed or deepspeed.comm under any name they were imported as
    (`import torch.distributed as xyz`, `from torch import distributed`), and collectives imported
    by name (`from torch.distributed import all_reduce`)."""
    tree = ast.parse(source)
    modules = set(COLLECTIVE_MODULES) | {"dist"}  # `dist` as the module is conventionally named
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names if a.name in COLLECTIVE_MODULES}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in COLLECTIVE_MODULES:
                    modules.add(a.asname or a.name)
                elif node.module in COLLECTIVE_MODULES and a.name in COLLECTIVES:
                    found.append(f"{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in modules:
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_collective_check_sees_aliases_and_from_imports():
    source = ("import torch.distributed as xyz\n"
              "from torch.distributed import all_reduce\n"
              "from torch import distributed as d\n"
              "from deepspeed import comm\n"
              "xyz.broadcast(t, 0)\n"
              "all_reduce(t)\n"
              "d.barrier()\n"
              "comm.all_gather(ts, t)\n"
              "torch.distributed.get_rank()\n")
    assert collective_calls(source) == ["2: from torch.distributed import all_reduce", "5: xyz.broadcast",
                                        "7: d.barrier", "8: comm.all_gather"]


def test_collectives_are_called_only_through_pipeline_distributed():
    """Complements the runs above, which can only exercise call sites they know: any other
    module calling torch.distributed collectives directly would bypass the device rule."""
    offenders = [f"{path.relative_to(REPO)}:{found}" for path in sorted((REPO / "pipeline").rglob("*.py"))
                 if path.name != "distributed.py" for found in collective_calls(path.read_text())]
    assert not offenders, offenders
