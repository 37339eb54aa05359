"""Live groups of gloo ranks for the tests: started once per world size, each case dispatched to them.

Starting a rank costs seconds (a new interpreter importing torch, transformers and lightning_cp, then a
rendezvous); a case usually costs less. So, as torch's own distributed tests do, the suite keeps one group
of processes per world size alive and sends it one case after another: ``fn(rank, world_size, *args)`` on
every rank, the results back by rank. Each rank collects garbage after a case, so modules a case hooked
are gone before the next (the functional API's ``"auto"`` decides from the modules hooked in the process).
A case must leave its process as it found it; one that cannot (it registers a function with transformers, say)
starts fresh processes with ``run_on_local_ranks`` instead (the doctor's tests mark it ``fresh_processes``).

A case that fails on some ranks while the others wait in a collective, a case past its timeout, or a rank
that died leaves the group unusable: it is killed, the case is reported by name with each rank's
traceback, and the next case gets a fresh group. The process groups a case created (its device meshes) are
destroyed after it: each holds a gloo thread that wakes every 10 ms (200 of them kept an idle rank at a fifth of
a core on the 2-core CI machine; destroyed, at 0.5 %), and the cases ahead would pay for it.

The Trainer and Fabric scripts of ``tests/scripts`` run here too (:func:`run_script_in_pool`): Lightning, finding
``LOCAL_RANK`` set and the process group initialized, takes the ranks as a launcher of one's own started them.
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import os
import queue
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_map

from lightning_cp.launch import free_port

#: After one rank fails, how long the others get to finish (or fail) before the group counts as stuck.
_GRACE_S = 10.0


def _serve(rank: int, world_size: int, port: int, threads: int, tasks: Any, results: Any) -> None:
    """A rank of a live group: run the cases it is sent until it is sent ``None``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    # torch names a subgroup by its ranks salted with the number of live groups: once a case's groups are
    # destroyed, the next case's groups would take their names and read their dead addresses from the store
    # (gloo: "Connection refused"). Salt with the groups created so far, as newer torch does (pytorch#189073)
    dist.distributed_c10d._hash_ranks_to_str = _group_name_never_reused
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=120))
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            with new_process_groups_destroyed():
                # CUDA tensors would cross as CUDA IPC handles that die with the case: results travel on the CPU
                result = fn(rank, world_size, *args)
                outcome = True, tree_map(lambda x: x.cpu() if torch.is_tensor(x) else x, result)
        except BaseException:  # noqa: BLE001 - reported to the test, which raises it
            outcome = False, traceback.format_exc()
        gc.collect()
        results.put((rank, *outcome, _step()))
    dist.destroy_process_group()
    # skip interpreter teardown, where gloo's threads now and then abort a finished process (lightning_cp.launch)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


#: The subgroups this rank named by their ranks (the same count on every rank: the ranks run the same cases).
_groups_named = 0


def _group_name_never_reused(ranks: list[int]) -> str:
    """A subgroup's name from its ranks and how many subgroups this rank named before."""
    global _groups_named
    _groups_named += 1
    return hashlib.sha1(f"{'_'.join(map(str, ranks))}_{_groups_named}".encode()).hexdigest()


@contextmanager
def new_process_groups_destroyed() -> Iterator[None]:
    """Destroy, on leaving, the process groups created inside: a case's device meshes (a peer still waiting in
    one of them gets an error, not a hang). Cases that run many models in one call wrap each in it."""
    groups_before = set(dist.distributed_c10d._world.pg_map)
    try:
        yield
    finally:
        for group in list(dist.distributed_c10d._world.pg_map):
            if group not in groups_before:
                dist.destroy_process_group(group)


def _step() -> tuple[int, int, int]:
    """Where this rank stands: the collectives it ran on the default group (the one group cases share), and the
    subgroups it named (sequentially, and by ranks). Ranks that differ are out of step: the next case's collectives
    would pair up wrongly, or its new groups take different names on different ranks (and wait, or meet a
    destroyed group's address in the store)."""
    world = dist.distributed_c10d._world
    return world.default_pg._get_sequence_number_for_group(), world.group_count, _groups_named


class RankGroup:
    """``world_size`` live gloo ranks that run one case at a time."""

    def __init__(self, world_size: int, threads_per_rank: int = 1) -> None:
        context = mp.get_context("spawn")
        self.world_size = world_size
        self._tasks = [context.SimpleQueue() for _ in range(world_size)]
        self._results = context.Queue()
        #: Whether every rank ran as many collectives on the default group and named as many subgroups: a case that
        #: failed on some ranks may leave them out of step (see ``_step``).
        self.in_step = True
        port = free_port()
        self._processes = [
            context.Process(
                target=_serve,
                args=(rank, world_size, port, threads_per_rank, self._tasks[rank], self._results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in self._processes:
            process.start()

    def alive(self) -> bool:
        """Whether every rank is still running."""
        return all(process.is_alive() for process in self._processes)

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], timeout: float) -> list[Any]:
        """``fn(rank, world_size, *args)`` on every rank; the results by rank, or an error naming the case.

        Raises ``RuntimeError`` with each failing rank's traceback, or ``TimeoutError``; in both cases the
        group is closed when it may be stuck (the caller then starts another).
        """
        for tasks in self._tasks:
            tasks.put((fn, args))
        outcomes: dict[int, tuple[bool, Any]] = {}
        steps: dict[int, tuple[int, int, int]] = {}
        deadline = time.monotonic() + timeout
        while len(outcomes) < self.world_size:
            now = time.monotonic()
            if now > deadline:
                self.close(kill=True)
                if outcomes:
                    break  # some ranks failed, the others are stuck in a collective: report the failures
                raise TimeoutError(f"{_case(fn)} did not finish on {self.world_size} ranks within {timeout:.0f} s")
            try:
                rank, ok, payload, steps[rank] = self._results.get(timeout=min(1.0, deadline - now))
            except queue.Empty:
                if not self.alive():
                    self.close(kill=True)
                    raise RuntimeError(f"a rank died while running {_case(fn)}") from None
                continue
            outcomes[rank] = (ok, payload)
            if not ok:
                deadline = min(deadline, time.monotonic() + _GRACE_S)
        self.in_step = len(set(steps.values())) == 1
        failures = {rank: payload for rank, (ok, payload) in outcomes.items() if not ok}
        if failures:
            if len(outcomes) < self.world_size:
                self.close(kill=True)
            report = "\n".join(f"--- rank {rank} ---\n{text}" for rank, text in sorted(failures.items()))
            raise RuntimeError(f"{_case(fn)} failed on rank(s) {sorted(failures)}:\n{report}")
        return [outcomes[rank][1] for rank in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        """Stop the ranks: ask them to finish (or kill them), and wait."""
        for process, tasks in zip(self._processes, self._tasks, strict=True):
            if kill or not process.is_alive():
                process.kill()
            else:
                tasks.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()


def _case(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


_groups: dict[int, RankGroup] = {}


def run_in_pool(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 300) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on the live group of ``world_size`` ranks (started on first use,
    replaced when a case left it unusable); return the results by rank."""
    group = _groups.get(world_size)
    if group is None or not group.alive():
        group = _groups[world_size] = RankGroup(world_size)
    try:
        return group.run(fn, args, timeout)
    finally:
        if not group.alive():
            _groups.pop(world_size, None)
        elif not group.in_step:
            discard_group(world_size)


class ScriptFailed(Exception):
    """A script run on a rank of the live group ended with a non-zero code; the message holds what it printed."""


def run_script_in_pool(script: Path, args: list[str], world_size: int, timeout: float) -> subprocess.CompletedProcess:
    """Run ``script``'s ``main()`` with ``args`` on every rank of the live group of ``world_size`` ranks.

    Returns what ``python script *args`` under a launcher returns: the exit code (0, or 1 when any rank failed)
    and the ranks' output, rank after rank.
    """
    command = [sys.executable, str(script), *args]
    try:
        outputs = run_in_pool(_run_script, str(script), args, world_size=world_size, timeout=timeout)
    except RuntimeError as failure:
        return subprocess.CompletedProcess(command, 1, stdout=str(failure), stderr="")
    return subprocess.CompletedProcess(command, 0, stdout="".join(outputs), stderr="")


def _run_script(rank: int, world_size: int, script: str, args: list[str]) -> str:
    """A rank's part of :func:`run_script_in_pool`: the script's ``main()`` as rank ``rank``, its output captured."""
    launcher_env = {"LOCAL_RANK": rank, "RANK": rank, "WORLD_SIZE": world_size, "LOCAL_WORLD_SIZE": world_size}
    saved_env, saved_argv = dict(os.environ), sys.argv
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    os.environ.update({name: str(value) for name, value in launcher_env.items()}, NODE_RANK="0")
    sys.argv = [script, *args]
    failure = None
    # a fresh process shows each warning once: so does each run (the filters' version moves on entering)
    with _captured_output() as output, warnings.catch_warnings():
        try:
            runpy.run_path(script, run_name="__pool_case__")["main"]()
        except BaseException:  # noqa: BLE001 - a script's failure, reported with what it printed
            traceback.print_exc()
            failure = True
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            sys.argv = saved_argv
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    if failure:
        raise ScriptFailed(output.text)
    return output.text


class _Output:
    text = ""


@contextmanager
def _captured_output() -> Iterator[_Output]:
    """Everything written to file descriptors 1 and 2 inside the block (Python, C++ and subprocesses alike)."""
    output = _Output()
    with tempfile.TemporaryFile() as sink:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield output
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            output.text = sink.read().decode(errors="replace")


def discard_group(world_size: int) -> None:
    """Kill the live group of ``world_size`` ranks, if any: the next case starts a fresh one."""
    group = _groups.pop(world_size, None)
    if group is not None:
        group.close(kill=True)


@atexit.register
def _close_groups() -> None:
    for group in _groups.values():
        group.close()
    _groups.clear()
