"""torch.distributed as the trainer uses it, beside DeepSpeed's own communication.

Every tensor this code hands to a collective is made on `collective_device()`, the
accelerator's current device, never on torch's default device: NCCL is bound to CUDA devices
only and answers a CPU tensor with "No backend type associated with device type cpu", while
gloo on the CPU accepts anything, so a CPU-only test run would never notice. Every collective
of `pipeline/` goes through this module (tests/pipeline/test_distributed.py holds it to that).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence

import torch


def collective_device() -> torch.device:
    """The device the process group's backend serves: `cuda:LOCAL_RANK` under NCCL, `cpu` under gloo."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


# What a launcher (deepspeed, torchrun, mpirun, srun) sets; with none of them, a plain
# `python -m pipeline.train` is a world of one process.
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                      "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")


def _single_process_world() -> None:
    """Without a launcher: rank 0 of a world of 1 on a free local port, instead of DeepSpeed's
    MPI discovery (which needs mpi4py and an MPI launch)."""
    if any(v in os.environ for v in LAUNCHER_VARIABLES):
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def init_distributed(timeout_s: float | None = None) -> None:
    """DeepSpeed's process group: NCCL (or the accelerator's backend) on GPUs, gloo on the CPU.
    `timeout_s`: how long one collective may wait (train.collective_timeout_s; DeepSpeed's own
    default is 600 s)."""
    import datetime

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _single_process_world()

    accelerator = get_accelerator()
    # Before any collective: a CUDA process's current device is 0 until set, and DeepSpeed's
    # init_distributed sets none (its engine does, too late for the collectives before it).
    accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    on_cpu = accelerator.device_name() == "cpu"
    # The CPU accelerator's default backend is oneCCL; gloo ships with every torch.
    timeout = {"timeout": datetime.timedelta(seconds=timeout_s)} if timeout_s else {}
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else None, **timeout)
    if on_cpu:
        _unlink_cpu_shm_buffer()


def _unlink_cpu_shm_buffer() -> None:
    """DeepSpeed's CPU shared-memory all-reduce (the deepspeed_shm_comm op) creates one 66 MB
    segment per rank in /dev/shm, named after the master address and port, and never unlinks it:
    every run would leave its segments in RAM-backed /dev/shm until reboot. Once every rank has
    mapped every segment (the barrier), the names can go; the mappings stay valid."""
    barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(name)
    except FileNotFoundError:  # ranks on several hosts: DeepSpeed uses no shared memory then
        pass


def shutdown() -> None:
    """End of a run that finished its work, on every rank: wait for all, then tear the process
    group down while the interpreter is whole (PyTorch's documented end of a distributed program)."""
    if torch.distributed.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()


def exit_process(code: int) -> None:
    """Leave the process with `code` without the interpreter's finalization.

    destroy_process_group cannot free gloo's (or NCCL's) groups while DeepSpeed still holds them
    (deepspeed.utils.groups, the engine's parameters): their C++ worker threads were still running
    after it in the runs we inspected. At interpreter exit those objects are then destroyed in
    no fixed order, and a joinable std::thread destroyed that way aborts the process ("terminate
    called without an active exception"), so the launcher reported a failure for a run whose
    final checkpoint was written. Everything the run writes is closed and synced before this is
    called; os._exit skips the teardown in which the race lives."""
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank() -> int:
    """This process's rank; 0 without a process group (single-process tools)."""
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier() -> None:
    """A barrier of the default group; a no-op when no process group exists (single-process tools)."""
    if not torch.distributed.is_initialized():
        return
    device = collective_device()
    # NCCL's barrier is an all-reduce on a device it must guess unless told.
    if torch.distributed.get_backend() == "nccl" and device.index is not None:
        torch.distributed.barrier(device_ids=[device.index])
    else:
        torch.distributed.barrier()


def all_reduce_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sums over all ranks, in one float64 all-reduce."""
    t = torch.tensor(list(values), dtype=torch.float64, device=collective_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_values(values: Sequence[float], src: int = 0) -> list[float]:
    """Rank `src`'s `values` on every rank (each rank passes a sequence of the same length)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=collective_device())
    torch.distributed.broadcast(t, src)
    return t.tolist()
