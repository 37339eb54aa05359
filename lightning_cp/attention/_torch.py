"""Every private torch name lightning_cp uses, in one module, checked when the package is imported.

torch's context parallelism is experimental: its ring (``_templated_ring_attention``), its options,
its dispatcher switch and table of op handlers, and the DTensor internals needed to build a sharded
result are private and move between releases. Nothing else in the package touches them (a test
enforces it), so a torch upgrade breaks this module only, and :func:`check_torch_internals` says so
at import time instead of deep inside a training step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_global_tensor_info
from torch.distributed.tensor.experimental._context_parallel import _attention as _cp

_NEEDED = (
    "_templated_ring_attention",
    "_templated_ring_attention_backward",
    "_cp_options",
    "custom_ops",
    "_dispatch_mode",
    "_DispatchMode",
    "_enable_context_parallel_dispatcher_impl",
    "_disable_context_parallel_dispatcher_impl",
    "set_rotate_method",
)


def check_torch_internals() -> None:
    """Fail with an ``ImportError`` naming the torch release when torch's CP internals have moved."""
    missing = [name for name in _NEEDED if not hasattr(_cp, name)]
    if missing:  # pragma: no cover - depends on the torch release
        raise ImportError(
            f"lightning_cp needs torch's context-parallel internals as of torch 2.13; torch {torch.__version__}"
            f" lacks {missing}. Install a torch version within lightning_cp's supported range."
        )


def register_cp_op_handler(op: Any, handler: Callable[..., Any]) -> None:
    """Route ``op`` to ``handler`` while torch's CP dispatcher is on (its table of custom op handlers)."""
    _cp.custom_ops[op] = handler


def ring_forward(group: Any, seq_dim: int, op: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """torch's ring attention forward over ``group`` with the SDPA ``op`` computing each block."""
    return _cp._templated_ring_attention(group, seq_dim, op, **kwargs)


def ring_backward(group: Any, seq_dim: int, op: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
    """torch's ring attention backward over ``group`` with the SDPA backward ``op`` for each block."""
    return _cp._templated_ring_attention_backward(group, seq_dim, op, **kwargs)


def load_balance_enabled() -> bool:
    """Whether torch's ring currently expects head/tail load-balanced shards."""
    return bool(_cp._cp_options.enable_load_balance)


def rotate_method() -> str:
    """torch's process-wide ring rotation ("allgather" or "alltoall"), as a string."""
    method = _cp._cp_options.rotate_method
    return "allgather" if method == _cp._RotateMethod.ALL_GATHER else "alltoall"


def set_rotate_method(name: str) -> None:
    """Set torch's process-wide ring rotation ("allgather" or "alltoall")."""
    _cp.set_rotate_method(name)


@contextmanager
def ring_dispatcher(cp_mesh: DeviceMesh, seq_dim: int, load_balance: bool, rotate: str) -> Iterator[None]:
    """Switch torch's CP dispatcher on over ``cp_mesh`` (SDPA monkey-patched) with these options.

    Every process-wide option is put back on exit, also when the body raises. The ring merges partial
    results in fp32 (bf16 merges drift as the ring grows).
    """
    options = _cp._cp_options
    saved = (options.enable_load_balance, options.rotate_method, options.convert_to_f32, _cp._dispatch_mode)
    try:
        _cp._dispatch_mode = _cp._DispatchMode.MONKEY_PATCH
        options.enable_load_balance = load_balance
        options.convert_to_f32 = True
        _cp.set_rotate_method(rotate)
        _cp._enable_context_parallel_dispatcher_impl(seq_dim=seq_dim, mesh=cp_mesh)
        yield
    finally:
        _cp._disable_context_parallel_dispatcher_impl()
        options.enable_load_balance, options.rotate_method, options.convert_to_f32, _cp._dispatch_mode = saved


@contextmanager
def counting_ring_calls() -> Iterator[dict[str, int]]:
    """Count the calls of torch's ring forward while open (the doctor checks attention really used it)."""
    counts = {"ring": 0}
    original = _cp._templated_ring_attention

    def counted(*args: Any, **kwargs: Any) -> Any:
        counts["ring"] += 1
        return original(*args, **kwargs)

    _cp._templated_ring_attention = counted
    try:
        yield counts
    finally:
        _cp._templated_ring_attention = original


def sharded_dtensor(local: torch.Tensor, mesh: DeviceMesh, placements: tuple[Any, ...]) -> DTensor:
    """A DTensor over ``mesh`` with ``placements`` whose local part is ``local``, without communicating.

    ``DTensor.from_local`` would infer the same spec but records an autograd edge the CP op handlers
    must not add (they run inside the dispatcher, below autograd).
    """
    shape, stride = compute_global_tensor_info(local, mesh, list(placements))
    spec = DTensorSpec(mesh, placements, tensor_meta=TensorMeta(torch.Size(shape), tuple(stride), local.dtype))
    return DTensor(local, spec, requires_grad=local.requires_grad)


def flatten_mesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The 1-D mesh over all ranks of a (sub)mesh, named ``name`` (how FSDP2 shards over data × context)."""
    return mesh._flatten(name)


def compiled_autograd() -> Any:
    """torch's context manager that turns compiled autograd on (the NeMo-compatible train context's option)."""
    return torch._dynamo.utils.maybe_enable_compiled_autograd(True)
