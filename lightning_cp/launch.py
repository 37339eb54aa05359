"""Running a function on N local processes that form a real process group (gloo, or NCCL on GPUs).

The tests, the benchmarks and anyone checking CP on one machine use it: each rank's return value comes
back to the caller, an exception on a rank is re-raised with its traceback, and a hang ends at
``timeout`` seconds instead of blocking forever.
"""

from __future__ import annotations

import os
import random
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: Where :func:`free_port` looks first: below Linux's default ephemeral range (32768-60999).
_LISTEN_PORTS = range(20000, 32768)


def free_port() -> int:
    """A TCP port on the loopback interface that is free right now, for a job's store to listen on.

    Chosen outside the kernel's ephemeral range when it can be: a port the kernel handed out would be free
    again at once, and until the store binds it any outgoing connection on the machine (another job's gloo
    pairs, a store client) may be given it; the ranks then connect to the wrong peer ("Connection reset by
    peer") and wait for a store that never answers.
    """
    generator = random.Random()  # not the global generator: the caller's seeding must not make ports collide
    for _ in range(64):
        port = generator.choice(_LISTEN_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    backend: str,
    threads: int,
    args: tuple[Any, ...],
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()
    # The work is done and saved: skip interpreter teardown, where gloo's threads now and then abort the
    # process ("terminate called without an active exception") and would turn a good run into a failure.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_on_local_ranks(
    fn: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = 300,
    backend: str = "gloo",
    threads_per_rank: int | None = None,
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return the results by rank.

    ``fn`` must be importable (defined at module level). Each rank gets ``threads_per_rank`` CPU
    threads (default: the cores shared out evenly), so ranks do not fight over cores.
    """
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), out_dir, backend, threads, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} did not finish on {world_size} ranks within {timeout} s")
        # On the CPU: CUDA tensors a rank returned must not start CUDA in this (the launching) process.
        return [
            torch.load(Path(out_dir) / f"rank{rank}.pt", weights_only=False, map_location="cpu")
            for rank in range(world_size)
        ]
