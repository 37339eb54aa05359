"""Gradient reduction over the data × context ranks, in every parameter layout.

All ranks of a CP group hold the same weights but see different shards of the sequence, so their
gradients are partial and must be combined, like data-parallel ones. FSDP2 applied over the flattened
data × context mesh does this itself (averaging); plain, replicated parameters, and parameters that
tensor parallelism alone distributes, are averaged here with one all-reduce per dtype right before
the optimizer step. The loss side multiplies each rank's gradient share by
the number of data × context ranks, so the average is exactly the gradient without CP.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lightning_cp.mesh import CONTEXT_PARALLEL, DATA_CONTEXT_PARALLEL, DATA_SHARD_CONTEXT_PARALLEL, TENSOR_PARALLEL


def spans_data_context(tensor: DTensor) -> bool:
    """Whether a DTensor is distributed over the data × context ranks (FSDP2 then reduces its gradient)."""
    dims = tensor.device_mesh.mesh_dim_names or ()
    return any(dim in dims for dim in (DATA_CONTEXT_PARALLEL, CONTEXT_PARALLEL, DATA_SHARD_CONTEXT_PARALLEL))


def check_sharded_parameters(module: nn.Module, cp_size: int) -> None:
    """Refuse DTensor parameters spread over data-parallel ranks but not over the context-parallel ones.

    Those would be reduced over the data ranks only, missing the other sequence shards. Parameters
    distributed over the tensor-parallel dimension alone are fine: their gradients are averaged over
    the data × context ranks here, like replicated ones.
    """
    if cp_size == 1:
        return
    for name, param in module.named_parameters():
        if isinstance(param, DTensor) and not spans_data_context(param):
            dims = param.device_mesh.mesh_dim_names or ()
            if set(dims) - {TENSOR_PARALLEL}:
                raise ValueError(
                    f"Parameter `{name}` is distributed over mesh dimensions {dims}, which do not include the"
                    " context-parallel ranks, so its gradient would miss the other sequence shards. Apply"
                    f" `fully_shard(..., mesh=device_mesh['{DATA_CONTEXT_PARALLEL}'])` (or leave it replicated)."
                )


@torch.no_grad()
def average_replicated_gradients(module: nn.Module, data_context_mesh: DeviceMesh) -> None:
    """Average, over the data × context ranks, the gradients that FSDP2 does not reduce, in place.

    Those of plain (replicated) parameters, and the local parts of parameters distributed over the
    tensor-parallel dimension only (each data × context rank holds the same piece of them).
    """
    if data_context_mesh.size() == 1:
        return
    by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for param in module.parameters():
        grad = param.grad
        if grad is None or (isinstance(param, DTensor) and spans_data_context(param)):
            continue
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        by_dtype.setdefault((local.dtype, local.device), []).append(local)
    for grads in by_dtype.values():
        flat = flatten_tensors(grads)
        dist.all_reduce(flat, group=data_context_mesh.get_group())
        flat /= data_context_mesh.size()
        copy_from_flat(grads, flat)


def flatten_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One contiguous 1-D tensor holding ``tensors`` (one dtype and device): one collective instead of many."""
    return torch.cat([tensor.reshape(-1) for tensor in tensors])


def copy_from_flat(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy the pieces of ``flat`` (made by :func:`flatten_tensors`) back into ``tensors``, in place."""
    pieces = flat.split([tensor.numel() for tensor in tensors])
    for tensor, piece in zip(tensors, pieces, strict=True):
        tensor.copy_(piece.view_as(tensor))
