"""Run test functions on real gloo ranks: one thread per rank, results and assertions in the test.

:func:`run_on_ranks` sends each case to a live group of ranks (:mod:`rank_pool`: processes started once per
world size); ``run_on_local_ranks`` starts fresh processes, for the cases that need them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rank_pool import run_in_pool

from lightning_cp.launch import free_port, run_on_local_ranks

__all__ = ["free_port", "run_on_local_ranks", "run_on_ranks"]


def run_on_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 300) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank."""
    return run_in_pool(fn, *args, world_size=world_size, timeout=timeout)
