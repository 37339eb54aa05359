"""Switching ring attention on and off: torch's CP dispatcher plus the process-wide state we keep.

torch's context-parallel options (load balancing, rotate method) are process-wide globals. The
context manager here sets them for its duration and puts every one of them back on exit, also when
the body raises, so a later non-CP call in the same process is unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.cpu_ring import _cp_attention_module

ROTATE_METHODS: tuple[str, ...] = ("allgather", "alltoall")


@dataclass(frozen=True)
class ActiveContextParallel:
    """What the model hooks need to know about the ring attention that is switched on."""

    mesh: DeviceMesh
    load_balance: bool
    #: Length of the whole (padded) sequence across the CP group, when the batch was sharded by us.
    global_seq_len: int | None


_active: ActiveContextParallel | None = None


def active_context_parallel() -> ActiveContextParallel | None:
    """The ring attention currently switched on in this process, or ``None``."""
    return _active


def validate_rotate_method(rotate_method: str) -> str:
    """Return ``rotate_method`` if torch's ring knows it, else raise a ``ValueError`` naming the choices."""
    if rotate_method not in ROTATE_METHODS:
        raise ValueError(f"`rotate_method` must be one of {ROTATE_METHODS}, got {rotate_method!r}.")
    return rotate_method


@contextmanager
def ring_attention(
    cp_mesh: DeviceMesh,
    *,
    load_balance: bool = True,
    rotate_method: str = "allgather",
    global_seq_len: int | None = None,
) -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` through the ring over ``cp_mesh`` while open.

    Q/K/V given to SDPA are taken as this rank's sequence shards. ``load_balance`` must match how the
    inputs were sharded (head/tail chunks when ``True``, contiguous chunks when ``False``). Backward
    passes must run inside the context: the ring's backward is dispatched through it as well.
    """
    global _active
    if _active is not None:
        raise RuntimeError(
            "Ring attention is already switched on in this process; context-parallel contexts do not nest."
        )
    attention = _cp_attention_module()
    options = attention._cp_options
    saved = (options.enable_load_balance, options.rotate_method, attention._dispatch_mode)
    try:
        attention._dispatch_mode = attention._DispatchMode.MONKEY_PATCH
        options.enable_load_balance = load_balance
        attention.set_rotate_method(validate_rotate_method(rotate_method))
        attention._enable_context_parallel_dispatcher_impl(seq_dim=2, mesh=cp_mesh)
        _active = ActiveContextParallel(cp_mesh, load_balance, global_seq_len)
        yield
    finally:
        _active = None
        attention._disable_context_parallel_dispatcher_impl()
        options.enable_load_balance, options.rotate_method, attention._dispatch_mode = saved
