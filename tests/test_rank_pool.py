"""The suite's live groups of ranks (tests/rank_pool.py): a failed case leaves a group that the next case can trust.

A group is kept after a case that failed alike on every rank, and replaced after one that left its ranks out of
step on the default process group (the next case's collectives would pair with the failed case's).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from distributed_harness import run_on_ranks


def _pid(rank: int, world_size: int) -> int:
    return os.getpid()


def _sum_of_ranks(rank: int, world_size: int) -> float:
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    return total.item()


def _fail_alike(rank: int, world_size: int) -> None:
    raise RuntimeError("planned failure")


def _fail_out_of_step(rank: int, world_size: int) -> None:
    if rank == 0:  # a collective that rank 1 never joins: rank 0 is one collective ahead
        dist.all_reduce(torch.ones(1), async_op=True)
    raise RuntimeError("planned failure")


def test_a_case_that_fails_alike_on_every_rank_keeps_the_group():
    before = run_on_ranks(_pid)
    with pytest.raises(RuntimeError, match="planned failure"):
        run_on_ranks(_fail_alike)
    assert run_on_ranks(_pid) == before
    assert run_on_ranks(_sum_of_ranks) == [3.0, 3.0]


@pytest.mark.slow  # starts a fresh group of ranks
def test_a_case_that_leaves_the_ranks_out_of_step_is_followed_by_a_fresh_group():
    before = run_on_ranks(_pid)
    with pytest.raises(RuntimeError, match="planned failure"):
        run_on_ranks(_fail_out_of_step)
    assert set(run_on_ranks(_pid)).isdisjoint(before)
    assert run_on_ranks(_sum_of_ranks) == [3.0, 3.0]


def _create_a_group(rank: int, world_size: int) -> int:
    dist.new_group(list(range(world_size)))  # as a case's device mesh does
    return len(dist.distributed_c10d._world.pg_map)


def _groups_held(rank: int, world_size: int) -> int:
    return len(dist.distributed_c10d._world.pg_map)


def test_the_process_groups_a_case_creates_are_destroyed_after_it():
    """Each idle gloo group wakes its thread every 10 ms: the groups of hundreds of cases would slow the rest."""
    held = run_on_ranks(_groups_held)
    assert run_on_ranks(_create_a_group) == [held[0] + 1] * 2
    assert run_on_ranks(_groups_held) == held
