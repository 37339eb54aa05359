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
    """Six float64 numbers on the batch's device that change with its tensors' keys, shapes and contents.

    Computed without leaving the device (no host sync), so checking every step costs one small
    all-gather and a few reductions over the batch.
    """
    tensors = [(key, batch[key]) for key in sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor))]
    device = tensors[0][1].device if tensors else torch.device("cpu")
    fingerprint = torch.zeros(6, dtype=torch.float64, device=device)
    for index, (key, tensor) in enumerate(tensors, start=1):
        values = tensor.detach().flatten().to(device=device, dtype=torch.float64)
        weights = torch.cos(torch.arange(values.numel(), device=device, dtype=torch.float64))
        shape = torch.tensor(tensor.shape, dtype=torch.float64, device=device)
        fingerprint[0] += index * len(key)
        fingerprint[1] += index * values.numel()
        fingerprint[2] += index * (shape * torch.arange(1, shape.numel() + 1, device=device)).sum()
        fingerprint[3] += values.sum()
        fingerprint[4] += (values * weights).sum()
        fingerprint[5] += index * (values * weights.flip(0)).sum()
    return fingerprint


def check_same_batch(batch: Mapping[str, Any], cp_mesh: DeviceMesh, step: int) -> None:
    """Raise ``RuntimeError`` on every rank of ``cp_mesh`` when the ranks' batches differ.

    Every rank sees every rank's fingerprint, so all of them agree on the verdict and raise together.
    """
    local = batch_fingerprint(batch)
    gathered = [torch.empty_like(local) for _ in range(cp_mesh.size())]
    dist.all_gather(gathered, local, group=cp_mesh.get_group())
    differing = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if differing:
        raise RuntimeError(
            f"The ranks of a context-parallel group received different batches at batch {step} (counted from 0"
            f" in this process): context-parallel rank(s) {differing} differ from rank 0. All ranks of the group"
            " must shard the same sequences, or the model trains on unrelated halves. Key the DataLoader's"
            " sampler on the data-parallel rank only (Lightning does this with `use_distributed_sampler=True`;"
            " a custom sampler should use `trainer.strategy.distributed_sampler_kwargs`), and make per-sample"
            " randomness (augmentation, shuffling) depend on the data-parallel rank and a shared seed, never on"
            " the global rank."
        )
