"""Every rank holds the same replicated weights after setup, whatever the user seeded (as DDP guarantees).

torch seeds each fresh process differently, so a user who builds a model without seeding gets another
model on every rank. The runs here give each rank its own seed on purpose: the strategies must still
train rank 0's model, exactly as one process would.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from common import INIT_SEED_PER_RANK, reference_sgd_run, run_script
from distributed_harness import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from lightning_cp.strategies.replicas import broadcast_replicated_state


def _run(tmp_path: Path, script: str, *args: str) -> tuple[dict, dict]:
    out = tmp_path / "result.pt"
    result = run_script(script, "--out", str(out), "--lr", "1.0", "--seed-per-rank", *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return torch.load(out, weights_only=False), torch.load(f"{out}.rank1", weights_only=False)


def _assert_same_weights(first: dict, second: dict) -> None:
    for name, weight in first.items():
        torch.testing.assert_close(second[name], weight, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("script,shuffled", [("trainer_llama.py", True), ("fabric_llama.py", False)])
def test_models_built_from_different_seeds_train_rank_zeros_model(tmp_path, script, shuffled, assert_same_training):
    run, rank1_weights = _run(tmp_path, script)
    _assert_same_weights(run["weights"], rank1_weights)
    reference = reference_sgd_run(steps=5, accumulate=1, lr=1.0, shuffled=shuffled, init_seed=INIT_SEED_PER_RANK)
    assert_same_training(run, reference)


def test_without_the_broadcast_the_ranks_train_different_models(tmp_path):
    """Negative control: bypassing the setup broadcast leaves each rank with its own model."""
    run, rank1_weights = _run(tmp_path, "trainer_llama.py", "--skip-replica-sync")
    with pytest.raises(AssertionError):
        _assert_same_weights(run["weights"], rank1_weights)


def _sync_each_layout(rank: int, world_size: int) -> dict[str, torch.Tensor]:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("data_context_parallel",))
    module = torch.nn.Linear(3, 2)
    with torch.no_grad():
        module.weight.fill_(float(rank + 1))  # plain tensor: a different value on every rank
        module.bias.fill_(float(rank + 1))
    replicated = DTensor.from_local(torch.full((4,), float(rank + 1)), mesh, [Replicate()], run_check=False)
    sharded = DTensor.from_local(torch.full((2,), float(rank + 1)), mesh, [Shard(0)], run_check=False)
    module.register_parameter("replicated", torch.nn.Parameter(replicated))
    module.register_parameter("sharded", torch.nn.Parameter(sharded))
    module.register_buffer("counter", torch.tensor([rank + 1]))
    broadcast_replicated_state(module, mesh)
    return {
        "weight": module.weight.detach().clone(),
        "replicated": module.replicated.to_local().detach().clone(),
        "sharded": module.sharded.to_local().detach().clone(),
        "counter": module.counter.clone(),
    }


def test_broadcast_copies_replicas_and_leaves_shards():
    first, second = run_on_ranks(_sync_each_layout)
    for name in ("weight", "replicated", "counter"):
        assert torch.equal(first[name], second[name]), name
        assert (first[name] == 1).all(), f"{name} must take rank 0's value"
    assert (first["sharded"] == 1).all() and (second["sharded"] == 2).all(), "each rank keeps its own shard"
