"""Collectives on the device their backend serves.

On a GPU node torch's default device is the CPU while the accelerator's is `cuda:N`, and NCCL
is bound to CUDA only: a collective handed a CPU tensor (made without a device, with
`device="cpu"`, by `.cpu()` or from numpy) fails with "No backend type associated with device
type cpu". These tests recreate that split on the CPU: the accelerator's device is a device type
of its own (DEVICE, host memory behind torch's PrivateUse1 slot), each rank's process group is
bound to that device type only (`accel:gloo`), and a CPU tensor given to a collective reaches
c10d's CPU kernel, which finds no backend for the CPU and fails exactly as under NCCL. Every call
site of the trainer that hands a tensor to a collective runs here in two real processes.
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
DEVICE = "accel"  # the emulated accelerator's device type


def _rank_main(rank: int, port: int, results) -> None:
    """Every call of CALLS in turn (in order: the last one replaces the accelerator), each
    result or error kept apart, in one process group, to start two processes once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    out = {}
    try:
        import deepspeed.accelerator

        _serve_emulated_device()
        deepspeed.accelerator.set_accelerator(_emulated_accelerator())
        # Bound to the accelerator's device type only, as NCCL is to CUDA: a CPU tensor finds no backend.
        torch.distributed.init_process_group(f"{DEVICE}:gloo", rank=rank, world_size=WORLD)
        for name, call in CALLS.items():
            try:
                out[name] = call(rank)
            except Exception:
                out[name] = "error: " + traceback.format_exc(limit=-3)
    finally:
        results.put((rank, out))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _emulated_accelerator():
    """DeepSpeed's CPU accelerator whose device is DEVICE, no longer torch's default device (the CPU)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    class EmulatedAccelerator(CPU_Accelerator):
        def current_device_name(self):
            return DEVICE

    return EmulatedAccelerator()


def _serve_emulated_device() -> None:
    """A device type of its own, DEVICE (torch's PrivateUse1 slot renamed), whose tensors keep their
    data in host memory, with the few kernels the collective call sites need: creation, copies to
    and from the CPU, and the all-reduce and broadcast of c10d, which hand the tensors' memory to
    the group's backend for DEVICE (gloo, on host copies) as a GPU's kernels hand theirs to NCCL.
    A CPU tensor keeps c10d's own CPU kernels, which find no backend for the CPU in the group."""
    import numpy as np
    from torch.utils.backend_registration import _setup_privateuseone_for_python_backend

    _setup_privateuseone_for_python_backend(DEVICE)
    key = "privateuseone"

    def wrap(array, dtype):
        t = torch._C._acc.create_empty_tensor(list(array.shape), dtype)
        t.__class__ = _DeviceTensor
        t.host = array
        return t

    def empty(size, *args, dtype=None, **kwargs):
        dtype = dtype or torch.get_default_dtype()
        return wrap(torch.empty(size, dtype=dtype).numpy(), dtype)

    torch.library.impl("aten::empty.memory_format", key)(empty)
    torch.library.impl("aten::empty_strided", key)(lambda size, stride, **kw: empty(size, **kw))

    @torch.library.impl("aten::_copy_from", key)
    def copy_from(src, dst, non_blocking=False):
        data = src.host if src.device.type == DEVICE else src.detach().numpy()
        if dst.device.type == DEVICE:
            dst.host[...] = data
        else:
            dst.copy_(torch.from_numpy(np.asarray(data)))
        return dst

    def on_host(tensors, process_group, collective):
        backend = torch.distributed.ProcessGroup.unbox(process_group)._get_backend(torch.device(DEVICE))
        host = [t.cpu() for t in tensors]
        work = collective(backend, host)
        work.wait()
        for t, h in zip(tensors, host):
            t.copy_(h)
        return tensors, work.boxed()

    @torch.library.impl("c10d::allreduce_", key)
    def allreduce(tensors, process_group, reduce_op, *rest):
        opts = torch.distributed.AllreduceOptions()
        opts.reduceOp = torch.distributed.ReduceOp.RedOpType(reduce_op.op())
        return on_host(tensors, process_group, lambda backend, host: backend.allreduce(host, opts))

    @torch.library.impl("c10d::broadcast_", key)
    def broadcast(tensors, process_group, root_rank, root_tensor, *rest):
        opts = torch.distributed.BroadcastOptions()
        opts.rootRank, opts.rootTensor = root_rank, root_tensor
        return on_host(tensors, process_group, lambda backend, host: backend.broadcast(host, opts))


class _DeviceTensor(torch.Tensor):
    """A tensor on DEVICE; its data is the numpy array `host`."""


def _mean_and_any(rank: int):
    from pipeline.train import all_ranks_mean_and_any

    return all_ranks_mean_and_any(1.0 + 2.0 * rank, flag=rank == 1, count=rank + 1, mine=(float(rank), 10.0 + rank))


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


def _cpu_tensors(rank: int):
    """A CPU tensor however it got there, each handed to a collective: the refusals, one per way."""
    import numpy as np

    made = {"device=cpu": lambda: torch.tensor([1.0], device="cpu"),
            ".cpu()": lambda: torch.tensor([1.0], device=DEVICE).cpu(),
            "from numpy": lambda: torch.from_numpy(np.ones(1))}
    refusals = {}
    for how, make in made.items():
        for name, collective in (("all_reduce", torch.distributed.all_reduce),
                                 ("broadcast", lambda t: torch.distributed.broadcast(t, 0))):
            try:
                collective(make())
                refusals[f"{name}({how})"] = "accepted"
            except RuntimeError as e:
                refusals[f"{name}({how})"] = str(e).splitlines()[0]
    return refusals


CALLS = {"mean_and_any": _mean_and_any, "init_from_flag": _init_from_flag, "broadcast": _broadcast,
         "cpu_tensors": _cpu_tensors, "device_after_init": _device_after_init}


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
    # The mean, any rank's flag, the summed count, and each rank's own values gathered in the same all-reduce.
    want = (2.0, True, 3, [(0.0, 10.0), (1.0, 11.0)])
    assert out == {0: want, 1: want}, out


def test_init_from_flag_broadcast_on_a_backend_bound_to_the_accelerator(rank_results):
    out = run_ranks(rank_results, "init_from_flag")
    assert out == {0: "ok", 1: "ok"}, out


def test_each_rank_uses_its_own_device_before_the_engine_exists(rank_results):
    assert run_ranks(rank_results, "device_after_init") == {0: 0, 1: 1}


def test_a_cpu_tensor_in_a_collective_is_refused_however_it_was_made(rank_results):
    """What NCCL refuses at the first step on a GPU: all_reduce_sum with its tensor made with
    device="cpu" is refused here too (test_mean_and_preemption_flag... fails then)."""
    for rank, refusals in run_ranks(rank_results, "cpu_tensors").items():
        assert isinstance(refusals, dict) and len(refusals) == 6, (rank, refusals)
        for call, answer in refusals.items():
            assert answer == "No backend type associated with device type cpu", (rank, call, answer)


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
