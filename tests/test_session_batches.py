"""What the session hands to ``training_step``: only the keys the batch had, sharded (2 gloo ranks)."""

from __future__ import annotations

import torch
from distributed_harness import run_on_ranks
from models import lm_batch

from lightning_cp.mesh import ParallelLayout, build_device_mesh
from lightning_cp.session import ContextParallelSession


def _shard_and_call_a_model_without_kwargs(rank: int, world_size: int) -> list[str]:
    mesh, data_context_mesh = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
    session = ContextParallelSession(mesh, data_context_mesh)
    batch = lm_batch(seq_len=64)

    def forward(input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return input_ids.float().mean()  # a model of the user's own, no **kwargs

    with session.step(batch):
        forward(**batch)
    return sorted(batch)


def test_the_sharded_batch_gains_no_key_a_custom_forward_would_refuse():
    for keys in run_on_ranks(_shard_and_call_a_model_without_kwargs):
        assert keys == ["input_ids", "labels", "position_ids"]
