"""Checking that every rank of a CP group holds the same batch.

Ranks of one CP group must shard the *same* sequences; a sampler keyed on the global rank instead of
the data-parallel rank silently trains on a mix of unrelated shards. A checksum of the batch,
compared over the CP group, catches that for the price of one tiny all-gather.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def batch_fingerprint(batch: Mapping[str, Any]) -> torch.Tensor:
    """Four float64 numbers that change with the keys, shapes and contents of the batch's tensors."""
    fingerprint = torch.zeros(4, dtype=torch.float64)
    for index, key in enumerate(sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor))):
        values = batch[key].detach().flatten().to(torch.float64)
        weights = torch.cos(torch.arange(values.numel(), device=values.device, dtype=torch.float64))
        fingerprint += torch.tensor(
            [index + 1, values.numel(), values.sum().item(), (values * weights).sum().item()], dtype=torch.float64
        )
    return fingerprint


def check_same_batch(batch: Mapping[str, Any], cp_mesh: DeviceMesh, device: torch.device) -> None:
    """Raise ``RuntimeError`` on every rank of ``cp_mesh`` when the ranks' batches differ."""
    local = batch_fingerprint(batch).to(device)
    gathered = [torch.empty_like(local) for _ in range(cp_mesh.size())]
    dist.all_gather(gathered, local, group=cp_mesh.get_group())
    if any(not torch.equal(other, gathered[0]) for other in gathered[1:]):
        raise RuntimeError(
            "The ranks of a context-parallel group received different batches; they must all shard the same"
            " sequences. Key the DataLoader's sampler on the data-parallel rank only (Lightning does this with"
            " `use_distributed_sampler=True`; a custom sampler should use"
            " `trainer.strategy.distributed_sampler_kwargs`), and use the same seed on every rank."
        )
