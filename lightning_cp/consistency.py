"""Checking that every rank of a CP group holds the same batch, and the same model.

Ranks of one CP group must shard the *same* sequences; a sampler keyed on the global rank instead of
the data-parallel rank silently trains on a mix of unrelated shards. A checksum of the batch,
compared over the CP group, catches that for the price of one tiny all-gather.

They must also run their shards through the *same* weights. The strategies make sure of it (rank 0's
replicated weights are broadcast at setup, as DDP does); the functional API cannot, so it compares a
fingerprint of every replicated parameter over the CP group the first time a model runs under CP
(:func:`check_same_replicas`): a model built without a seed differs on every rank, and would train a
different replica on each, silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lightning_cp.validation import ContextParallelInputError

#: Relative difference between two ranks' fingerprints of a parameter above which its replicas differ. Far above
#: what summing the same values in another order gives (float64 sums of fp32 values: about 1e-15), far below
#: what two random initialisations give (order 1).
REPLICA_RTOL = 1e-6


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


def parameter_fingerprints(model: nn.Module) -> tuple[list[str], list[tuple[float, float, float]]]:
    """The replicated (plain, non-DTensor) parameters of ``model`` by name, each as three float64 numbers.

    The numbers are the sum, the sum of squares and the sum of absolute values of the parameter: one pass over
    each parameter on its device, one host copy per parameter. DTensor parameters (FSDP2 / TP shards) are left
    out: each rank holds its own piece of one model. Meta tensors (not materialised yet) are left out too.
    """
    names, fingerprints = [], []
    for name, param in model.named_parameters():
        if isinstance(param, DTensor) or param.is_meta:
            continue
        values = param.detach().to(torch.float64)
        stats = torch.stack([values.sum(), values.square().sum(), values.abs().sum()])
        names.append(name)
        fingerprints.append(tuple(stats.tolist()))
    return names, fingerprints


def _differ(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    scale = max(abs(a[2]), abs(b[2]), 1e-30)  # the sum of |x| bounds the sum's size (it may cancel to ~0)
    return abs(a[0] - b[0]) > REPLICA_RTOL * scale or any(
        abs(x - y) > REPLICA_RTOL * max(abs(x), abs(y), 1e-30) for x, y in zip(a[1:], b[1:], strict=True)
    )


def check_same_replicas(models: list[tuple[int, nn.Module]], cp_mesh: DeviceMesh) -> None:
    """Raise on every rank of ``cp_mesh`` when a model's replicated parameters differ between its ranks.

    ``models`` are ``(key, model)`` pairs, the key naming a model alike on every rank (the order in which the
    models were hooked). One ``all_gather_object`` over the CP group, which every rank of the group must enter;
    every rank sees every rank's fingerprints, so all of them reach the same verdict and raise together
    (a :class:`~lightning_cp.validation.ContextParallelInputError`). Models present on some ranks only are
    compared where present.
    """
    local = {key: (type(model).__name__, *parameter_fingerprints(model)) for key, model in models}
    gathered: list[Any] = [None] * cp_mesh.size()
    dist.all_gather_object(gathered, local, group=cp_mesh.get_group())
    for key, (model_name, names, first) in sorted(gathered[0].items()):
        for cp_rank, by_key in enumerate(gathered[1:], start=1):
            if key not in by_key:
                continue
            _, other_names, other = by_key[key]
            if other_names != names:
                raise ContextParallelInputError(
                    f"`{model_name}` has other replicated parameters on context-parallel rank {cp_rank} than on"
                    f" rank 0 ({len(other_names)} against {len(names)}): every rank of a CP group must build the"
                    " same model."
                )
            differing = [index for index, (a, b) in enumerate(zip(first, other, strict=True)) if _differ(a, b)]
            if differing:
                raise ContextParallelInputError(_replicas_message(model_name, names, first, other, differing, cp_rank))


def _replicas_message(
    model_name: str,
    names: list[str],
    first: list[tuple[float, float, float]],
    other: list[tuple[float, float, float]],
    differing: list[int],
    cp_rank: int,
) -> str:
    index = differing[0]
    return (
        f"The replicas of `{model_name}` differ across the context-parallel group: {len(differing)} of its"
        f" {len(names)} replicated parameters differ between context-parallel ranks 0 and {cp_rank}, e.g."
        f" `{names[index]}` sums to {first[index][0]:.6g} (sum of squares {first[index][1]:.6g}) on rank 0 and to"
        f" {other[index][0]:.6g} (sum of squares {other[index][1]:.6g}) on rank {cp_rank}. Under context"
        " parallelism each rank runs its shard of the sequence through its own copy of the model, so the copies"
        " must be equal, or each rank trains a different model. torch seeds every process differently: a model"
        " built without a seed differs on every rank. Fix: call `torch.manual_seed(0)` (any seed, the same on"
        " every rank) before building the model, or, once built and sharded, copy rank 0's weights on every rank"
        " with `lightning_cp.broadcast_replicated_state(model)`."
    )
