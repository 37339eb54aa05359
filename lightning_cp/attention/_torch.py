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


#: On CUDA, the efficient SDPA kernel returns its log-sum-exp padded to a multiple of this many queries.
_EFFICIENT_LSE_BLOCK = 32


def _repeat_kv_heads(query: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Key/value heads repeated to the query heads (grouped-query attention, as ``enable_gqa`` means it)."""
    groups = query.size(1) // tensor.size(1)
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _fold_kv_heads(grad: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The gradient of repeated key/value heads summed back onto the ``kv_heads`` heads they came from."""
    batch, heads, seq, dim = grad.shape
    return grad if heads == kv_heads else grad.view(batch, kv_heads, heads // kv_heads, seq, dim).sum(2)


def _unsupported_device(device: torch.device) -> RuntimeError:
    return RuntimeError(
        f"The document-masked ring runs on CPU (torch's CPU flash kernel) and CUDA (the efficient kernel), not on"
        f" {device.type!r}: both return the log-sum-exp its merge needs. Train packed batches on CPU or CUDA, or"
        " pass unpacked rows."
    )


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused SDPA of one ``[1, heads, len, dim]`` block: ``(out, logsumexp)``, the log-sum-exp fp32 ``[1, heads, q]``.

    CPU: torch's CPU flash kernel (takes fewer key/value heads). CUDA: the efficient kernel with
    ``compute_log_sumexp`` (key/value heads repeated; its log-sum-exp cut back from its padding to 32
    queries). ``is_causal`` is top-left aligned, as in SDPA. Written from torch 2.13's op schemas; the
    CUDA branch has not run on a GPU yet.
    """
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, scale=scale
        )
    if query.device.type == "cuda":
        out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, _repeat_kv_heads(query, key), _repeat_kv_heads(query, value), None, True, 0.0, is_causal, scale=scale
        )
        return out, lse[..., : query.size(2)]
    raise _unsupported_device(query.device)


def attention_with_lse_backward(
    grad_out: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    is_causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`attention_with_lse` for one block, from ``out`` and ``lse``.

    ``out`` and ``lse`` may be those of a larger attention the block is part of (merged over several
    blocks): the kernel then returns this block's share of that attention's gradients.
    """
    if query.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, lse, 0.0, is_causal, scale=scale
        )
    if query.device.type == "cuda":
        padding = -query.size(2) % _EFFICIENT_LSE_BLOCK
        lse = torch.nn.functional.pad(lse, (0, padding)).contiguous()
        unused_rng = torch.empty((), dtype=torch.int64, device=query.device)  # read only with dropout
        dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out,
            query,
            _repeat_kv_heads(query, key),
            _repeat_kv_heads(query, value),
            None,
            out,
            lse,
            unused_rng,
            unused_rng,
            0.0,
            [True, True, True, False],
            is_causal,
            scale=scale,
        )
        return dq, _fold_kv_heads(dk, key.size(1)), _fold_kv_heads(dv, value.size(1))
    raise _unsupported_device(query.device)
