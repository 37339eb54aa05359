"""Run test functions on real gloo ranks: one thread per rank, results and assertions in the test.

:func:`run_on_ranks` sends each case to a live group of ranks (:mod:`rank_pool`: processes started once per
world size); ``run_on_local_ranks`` starts fresh processes, for the cases that need them. A case that runs many
models in one call wraps each in ``new_process_groups_destroyed()``, as the pool wraps each case.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from rank_pool import new_process_groups_destroyed, run_in_pool

from lightning_cp.launch import free_port, run_on_local_ranks

__all__ = [
    "averaged_gradients",
    "free_port",
    "new_process_groups_destroyed",
    "run_on_local_ranks",
    "run_on_ranks",
    "summed_gradients",
]


def run_on_ranks(fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout: float = 300) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank."""
    return run_in_pool(fn, *args, world_size=world_size, timeout=timeout)


def summed_gradients(model: torch.nn.Module, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
    """Each parameter's gradient (zeros where it has none) summed over ``group``'s ranks, by name.

    One collective for the whole model: one per parameter costs more than a tiny model's step when the ranks
    share cores (four ranks on the two of CI: a thousand collectives, each waiting for every rank to be scheduled).
    """
    named = list(model.named_parameters())
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten() for _, p in named])
    dist.all_reduce(flat, group=group)
    parts = flat.split([p.numel() for _, p in named])
    return {name: part.view_as(p) for (name, p), part in zip(named, parts, strict=True)}


def averaged_gradients(model: torch.nn.Module, group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """Each parameter's gradient averaged over ``group``'s ranks (the data × context ranks, as the strategies
    reduce them), by name."""
    size = dist.get_world_size(group)
    return {name: grad / size for name, grad in summed_gradients(model, group).items()}
