"""Making the ranks that should hold the same weights hold them, whatever the user seeded.

torch seeds every fresh process differently, so a model built without a seed differs on every rank.
DDP hides this by broadcasting the parameters from rank 0 when it wraps a model; the CP strategies
give the same guarantee at setup, for every layout they support:

- a plain (replicated) tensor lives whole on every rank: it is broadcast from global rank 0;
- a DTensor is replicated along the mesh dimensions whose placement is ``Replicate()`` (e.g. the
  data dimension of HSDP, or a layer norm under tensor parallelism): its local tensor is broadcast
  along each of those dimensions from the dimension's first rank. Along ``Shard`` dimensions each
  rank holds a different piece of one tensor, so nothing is sent there;
- a DTensor whose mesh leaves out the data × context ranks (tensor parallelism alone) is one copy per
  data × context rank: its local piece is broadcast over them from their first rank.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate

from lightning_cp.strategies.gradients import copy_from_flat, flatten_tensors, spans_data_context


def _module_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _broadcast_flat(tensors: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Broadcast ``tensors`` from the group's first rank with one collective per dtype, in place."""
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group_tensors in by_dtype.values():
        flat = flatten_tensors(group_tensors)
        if group is None:
            dist.broadcast(flat, src=0)
        else:
            dist.broadcast(flat, group=group, group_src=0)
        copy_from_flat(group_tensors, flat)


@torch.no_grad()
def broadcast_replicated_state(module: nn.Module, data_context_mesh: DeviceMesh | None = None) -> None:
    """Give every replica of ``module``'s parameters and buffers the values of its first replica.

    Call on every rank, after the model is sharded (FSDP2 / TP) and moved to its device, before the
    optimizer takes its first step. Sharded pieces are left alone: together they already form one model.
    Plain tensors take global rank 0's values (one broadcast over all ranks per dtype). With the functional
    API, ``lightning_cp.broadcast_replicated_state(model)`` makes an unseeded model the same on every rank;
    ``data_context_mesh`` (the data × context ranks) is needed only for DTensors whose mesh leaves those
    ranks out (tensor parallelism alone), which are otherwise left as they are.
    """
    plain: list[torch.Tensor] = []
    replicated: dict[int, tuple[dist.ProcessGroup, list[torch.Tensor]]] = {}
    for tensor in _module_tensors(module):
        if not isinstance(tensor, DTensor):
            plain.append(tensor.data)
            continue
        if data_context_mesh is not None and not spans_data_context(tensor) and data_context_mesh.size() > 1:
            group = data_context_mesh.get_group()
            replicated.setdefault(id(group), (group, []))[1].append(tensor.to_local())
        mesh = tensor.device_mesh
        for dim, placement in enumerate(tensor.placements):
            if isinstance(placement, Replicate) and mesh.size(dim) > 1:
                group = mesh.get_group(dim)
                replicated.setdefault(id(group), (group, []))[1].append(tensor.to_local())
    if dist.get_world_size() > 1:
        _broadcast_flat(plain, group=None)
    for group, tensors in replicated.values():
        _broadcast_flat(tensors, group=group)
