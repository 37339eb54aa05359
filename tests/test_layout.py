"""Resolving data × context × tensor parallel sizes against the world size (pure arithmetic, and when built)."""

from __future__ import annotations

import lightning as L
import pytest

from lightning_cp import ContextParallelStrategy
from lightning_cp.mesh import ParallelLayout, resolve_layout
from lightning_cp.strategies.fabric import ContextParallelStrategy as FabricContextParallelStrategy


@pytest.mark.parametrize(
    "world,cp,dp,tp,expected",
    [
        (2, 2, "auto", 1, ParallelLayout(1, 2, 1)),
        (4, 2, "auto", 1, ParallelLayout(2, 2, 1)),
        (8, 2, "auto", 2, ParallelLayout(2, 2, 2)),
        (4, "auto", "auto", 1, ParallelLayout(1, 4, 1)),
        (4, "auto", 2, 1, ParallelLayout(2, 2, 1)),
        (4, 2, 2, "auto", ParallelLayout(2, 2, 1)),
    ],
)
def test_layouts_fill_in_auto_sizes(world, cp, dp, tp, expected):
    assert resolve_layout(world, cp, dp, tp) == expected


def test_cp_size_must_divide_the_world():
    with pytest.raises(ValueError, match="cp_size=3 does not divide the world size \\(4 processes\\)"):
        resolve_layout(4, 3, "auto", 1)


@pytest.mark.parametrize("world,cp,dp,tp", [(4, 2, 3, 1), (8, 2, 1, 2), (4, "auto", 3, 1), (6, 2, "auto", 2)])
def test_product_of_sizes_must_equal_the_world(world, cp, dp, tp):
    with pytest.raises(ValueError, match="does not equal the world size"):
        resolve_layout(world, cp, dp, tp)


@pytest.mark.parametrize(
    "kwargs", [{"cp_size": 0}, {"cp_size": "two"}, {"data_parallel_size": -1}, {"rotate_method": "x"}]
)
def test_strategy_refuses_bad_arguments_when_built(kwargs):
    with pytest.raises(ValueError):
        ContextParallelStrategy(**kwargs)



@pytest.mark.parametrize("framework", ["trainer", "fabric"])
def test_cp_size_that_does_not_divide_the_devices_is_refused_when_trainer_or_fabric_is_built(framework):
    """Issue 26: in the main process, before any rank is launched, with the devices × nodes it was resolved against."""
    message = "^lightning_cp: cp_size=3 does not divide the world size \\(2 processes: devices=2 × num_nodes=1\\)"
    with pytest.raises(ValueError, match=message):
        if framework == "trainer":
            L.Trainer(accelerator="cpu", devices=2, strategy=ContextParallelStrategy(cp_size=3), logger=False)
        else:
            L.Fabric(accelerator="cpu", devices=2, strategy=FabricContextParallelStrategy(cp_size=3))
