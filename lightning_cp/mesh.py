"""Finding the context- and tensor-parallel dimensions of a device mesh by name."""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh

#: Names accepted for the context-parallel mesh dimension (ours first, then NeMo AutoModel's).
CP_DIM_NAMES: tuple[str, ...] = ("context_parallel", "cp")
#: Names accepted for the tensor-parallel mesh dimension.
TP_DIM_NAMES: tuple[str, ...] = ("tensor_parallel", "tp")


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


def tp_submesh(device_mesh: DeviceMesh | None) -> DeviceMesh | None:
    """The tensor-parallel submesh of ``device_mesh`` ("tensor_parallel" or "tp"), or ``None``."""
    return find_submesh(device_mesh, TP_DIM_NAMES)


def mesh_size(mesh: DeviceMesh | None) -> int:
    """Number of ranks in ``mesh``; 1 for ``None`` (no parallelism along that dimension)."""
    return 1 if mesh is None else mesh.size()
