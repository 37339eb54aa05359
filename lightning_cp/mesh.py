"""The device mesh in one place: the data × context × tensor parallel sizes, names, and building of it.

Like torchtitan's ``parallel_dims.py``: sizes are resolved and checked here, the mesh is built here,
and submeshes are found here by name.

The mesh keeps Lightning's dimension names, so existing ``configure_model`` code keeps working, and
adds ``"context_parallel"`` plus the flattened ``"data_context_parallel"`` dimension (data × context)
over which FSDP2 shards parameters and gradients are reduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_cp.attention import flatten_mesh
from lightning_cp.attention.ulysses import UlyssesGroup

DATA_PARALLEL = "data_parallel"
CONTEXT_PARALLEL = "context_parallel"
TENSOR_PARALLEL = "tensor_parallel"
DATA_CONTEXT_PARALLEL = "data_context_parallel"
#: The dimensions of the hybrid-sharded (HSDP) mesh: replicas of the model, and the ranks one replica
#: is sharded over (data shard × context).
DATA_PARALLEL_REPLICATE = "data_parallel_replicate"
DATA_SHARD_CONTEXT_PARALLEL = "data_shard_context_parallel"

Size = int | Literal["auto"]


@dataclass(frozen=True)
class ParallelLayout:
    """How many ranks each kind of parallelism spans; their product is the world size."""

    data_parallel: int
    context_parallel: int
    tensor_parallel: int

    def describe(self) -> str:
        """One line for the logs, e.g. ``data_parallel=1 × context_parallel=2 × tensor_parallel=1``."""
        return (
            f"{DATA_PARALLEL}={self.data_parallel} × {CONTEXT_PARALLEL}={self.context_parallel}"
            f" × {TENSOR_PARALLEL}={self.tensor_parallel}"
        )


def validate_size(name: str, value: Size) -> None:
    """Refuse a parallel size that is neither ``"auto"`` nor a positive int, naming the argument."""
    if value != "auto" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"`{name}` must be a positive int or 'auto', got {value!r}.")


def resolve_layout(
    world_size: int,
    cp_size: Size,
    data_parallel_size: Size,
    tensor_parallel_size: Size,
    *,
    world_origin: str = "",
) -> ParallelLayout:
    """Fill in ``"auto"`` sizes and check that data × context × tensor parallel equals the world size.

    ``"auto"`` takes whatever the explicit sizes leave: the context-parallel size first (all ranks
    not used by data and tensor parallelism), else the data-parallel size. Tensor parallel ``"auto"``
    means 1. ``world_origin`` says where the world size comes from in messages (e.g.
    ``"devices=2 × num_nodes=1"``).
    """
    world = f"{world_size} processes: {world_origin}" if world_origin else f"{world_size} processes"
    for name, value in (("cp_size", cp_size), ("data_parallel_size", data_parallel_size)):
        validate_size(name, value)
    validate_size("tensor_parallel_size", tensor_parallel_size)
    tp = 1 if tensor_parallel_size == "auto" else tensor_parallel_size
    if cp_size == "auto":
        dp = 1 if data_parallel_size == "auto" else data_parallel_size
        cp = world_size // (dp * tp) if world_size % (dp * tp) == 0 else 0
    else:
        cp = cp_size
        if world_size % cp:
            raise ValueError(
                f"cp_size={cp} does not divide the world size ({world}). Choose a cp_size that"
                " divides the number of devices × nodes, or change `devices`."
            )
        dp = world_size // (cp * tp) if data_parallel_size == "auto" else data_parallel_size
    if dp * cp * tp != world_size or cp < 1:
        raise ValueError(
            f"data_parallel_size × cp_size × tensor_parallel_size = {dp} × {cp} × {tp} does not equal the world"
            f" size ({world}). Set the sizes so that their product is {world_size}, or leave"
            " data_parallel_size='auto'."
        )
    return ParallelLayout(dp, cp, tp)


def build_hsdp_mesh(mesh: DeviceMesh, replicate: int) -> DeviceMesh:
    """The (replicate, data shard × context, tensor) mesh over the ranks of ``mesh``, for HSDP.

    FSDP2 given its first two dimensions keeps ``replicate`` copies of the model, each sharded over the
    data-shard × context ranks: gradients are reduce-scattered within a copy and all-reduced across
    copies, which averages them over all data × context ranks, as plain FSDP2 over them would.
    """
    data, context, tensor = mesh.mesh.shape
    if replicate < 1 or data % replicate:
        raise ValueError(
            f"data_parallel_replicate_size={replicate} must divide the data-parallel size ({data}): each replica"
            f" of the model is sharded over data_parallel / replicate × cp = {data} / {replicate} × {context} ranks."
        )
    ranks = mesh.mesh.reshape(replicate, (data // replicate) * context, tensor)
    return DeviceMesh(
        mesh.device_type,
        ranks,
        mesh_dim_names=(DATA_PARALLEL_REPLICATE, DATA_SHARD_CONTEXT_PARALLEL, TENSOR_PARALLEL),
    )


def describe_rank(mesh: DeviceMesh, rank: int) -> str:
    """A global rank and its place in ``mesh``, for messages.

    E.g. ``rank 3 (data-parallel rank 1, context-parallel rank 1)``; the tensor-parallel rank when tp > 1.
    """
    data, context, tensor = (mesh.mesh == rank).nonzero()[0].tolist()
    tensor_part = f", tensor-parallel rank {tensor}" if mesh.mesh.size(2) > 1 else ""
    return f"rank {rank} (data-parallel rank {data}, context-parallel rank {context}{tensor_part})"


def build_device_mesh(layout: ParallelLayout, device: torch.device) -> tuple[DeviceMesh, DeviceMesh]:
    """Create the 3-D mesh (data, context, tensor) and its flattened data × context submesh."""
    mesh = init_device_mesh(
        device.type,
        (layout.data_parallel, layout.context_parallel, layout.tensor_parallel),
        mesh_dim_names=(DATA_PARALLEL, CONTEXT_PARALLEL, TENSOR_PARALLEL),
    )
    data_context_mesh = flatten_mesh(mesh[DATA_PARALLEL, CONTEXT_PARALLEL], DATA_CONTEXT_PARALLEL)
    return mesh, data_context_mesh


#: Names accepted for the context-parallel mesh dimension (ours first, then NeMo AutoModel's).
CP_DIM_NAMES: tuple[str, ...] = ("context_parallel", "cp")


def find_submesh(device_mesh: DeviceMesh | None, names: tuple[str, ...]) -> DeviceMesh | None:
    """Return the 1-D submesh whose dimension carries one of ``names``, or ``None``.

    A mesh that is itself 1-D and unnamed is not guessed at: CP must be asked for by name, so a plain
    data-parallel mesh never turns into a CP mesh by accident.
    """
    if device_mesh is None:
        return None
    dim_names = device_mesh.mesh_dim_names or ()
    for name in names:
        if name in dim_names:
            return device_mesh[name]
    return None


def cp_submesh(device_mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The context-parallel submesh of ``device_mesh`` ("context_parallel" or "cp"), or ``None``."""
    return find_submesh(device_mesh, CP_DIM_NAMES)


def mesh_size(mesh: DeviceMesh | None) -> int:
    """Number of ranks in ``mesh``; 1 for ``None`` (no parallelism along that dimension)."""
    return 1 if mesh is None else mesh.size()


@dataclass(frozen=True)
class ContextParallelGroups:
    """How one CP group is split for the hybrid (Note [hybrid layout] in :mod:`lightning_cp.sharding.sequence`).

    CP rank ``c`` sits in Ulysses group ``c // ulysses_size`` (consecutive CP ranks) at place
    ``c % ulysses_size``; the ring runs across the Ulysses groups, over the CP ranks with the same place.
    """

    #: The ranks that trade heads (all CP ranks for plain Ulysses).
    ulysses: UlyssesGroup
    #: The ring across Ulysses groups (``None`` for plain Ulysses).
    ring_mesh: DeviceMesh | None
    #: CP ranks (0 … cp-1) of this rank's Ulysses group, in order.
    ulysses_cp_ranks: tuple[int, ...]


def split_context_parallel(cp_mesh: DeviceMesh, ulysses_size: int) -> ContextParallelGroups:
    """Split ``cp_mesh`` into Ulysses groups of ``ulysses_size`` consecutive ranks and the ring across them.

    Every rank of the CP group must call it (it creates process groups; only the members of each
    group synchronise, so CP groups of different data-parallel ranks need not call it together).
    """
    cp_size = cp_mesh.size()
    if ulysses_size < 1 or cp_size % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} must divide the context-parallel size ({cp_size}).")
    ranks = cp_mesh.mesh.flatten().tolist()
    outer, inner = divmod(cp_mesh.get_local_rank(), ulysses_size)
    members = tuple(range(outer * ulysses_size, (outer + 1) * ulysses_size))
    if ulysses_size == cp_size:
        return ContextParallelGroups(UlyssesGroup(cp_mesh.get_group(), cp_size, inner), None, members)
    ulysses_group = dist.new_group([ranks[c] for c in members], use_local_synchronization=True)
    ring_ranks = ranks[inner::ulysses_size]
    ring_group = dist.new_group(ring_ranks, use_local_synchronization=True)
    ring_mesh = DeviceMesh.from_group(ring_group, cp_mesh.device_type, mesh=ring_ranks, mesh_dim_names=("ring",))
    return ContextParallelGroups(UlyssesGroup(ulysses_group, ulysses_size, inner), ring_mesh, members)
