"""Ring attention for CPU tensors: teaches torch's context-parallel dispatcher the CPU SDPA op.

Why extend torch's dispatcher instead of writing our own ring:

* torch 2.13's CP routes only the CUDA flash / efficient / cuDNN SDPA ops to its ring. On CPU,
  ``F.scaled_dot_product_attention`` lowers to ``aten._scaled_dot_product_flash_attention_for_cpu``,
  which has no CP handler and fails with "no sharding strategy".
* That CPU op has exactly the contract torch's ring needs: the forward returns ``(out, logsumexp)``
  with ``logsumexp`` in fp32 and shape ``[B, H, S]``, and its backward takes ``out`` and
  ``logsumexp``. So torch's own ``_templated_ring_attention`` (the same merge, rotation and
  head/tail load-balancing code that runs on GPU) computes the exact ring result on CPU too.
* Registering one more entry in torch's table of CP op handlers means the CUDA path is untouched:
  torch's flash / efficient / cuDNN ring stays in charge there, and both ``context_parallel()``
  and torch's module-wrapper mode pick the CPU handler up, because torch copies that table into
  DTensor's dispatcher each time CP is switched on and removes it when CP is switched off.

The cost is a dependency on private torch names, checked once by :func:`install_cpu_ring`, which
fails with a clear message on a torch whose CP internals moved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.tensor import DTensor, Shard

from lightning_cp.attention import _torch
from lightning_cp.validation import check_ring_supported

_aten = torch.ops.aten
CPU_SDPA_FORWARD = _aten._scaled_dot_product_flash_attention_for_cpu.default
CPU_SDPA_BACKWARD = _aten._scaled_dot_product_flash_attention_for_cpu_backward.default

#: Sequence dimension of Q/K/V at the SDPA call: ``[batch, heads, seq, head_dim]``.
SDPA_SEQ_DIM = 2
_SEQ_PLACEMENT = (Shard(SDPA_SEQ_DIM),)
_FORWARD_ARG_NAMES = ("query", "key", "value", "dropout_p", "is_causal")
_BACKWARD_ARG_NAMES = ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal")


def _bind(arg_names: tuple[str, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(arg_names, args, strict=False))
    bound.update(kwargs)
    return bound


def _local_shard(name: str, tensor: Any) -> torch.Tensor:
    if not isinstance(tensor, DTensor) or tuple(tensor.placements) != _SEQ_PLACEMENT:
        raise ValueError(
            f"Context-parallel SDPA expects `{name}` sharded on the sequence dimension (Shard(2)) over the"
            f" context-parallel mesh; got {type(tensor).__name__}"
            f"{'' if not isinstance(tensor, DTensor) else ' with placements ' + str(tensor.placements)}."
        )
    return tensor.to_local()


def _as_seq_sharded(local: torch.Tensor, like: DTensor) -> DTensor:
    return _torch.sharded_dtensor(local, like.device_mesh, _SEQ_PLACEMENT)


def _check_supported(bound: dict[str, Any]) -> None:
    check_ring_supported(
        bound.get("attn_mask"),
        bound.get("dropout_p", 0.0),
        bound.get("is_causal", False),
        _torch.load_balance_enabled(),
    )


def _ring_forward(op_call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[DTensor, DTensor]:
    bound = _bind(_FORWARD_ARG_NAMES, args, kwargs)
    _check_supported(bound)
    query = bound["query"]
    out, logsumexp = _torch.ring_forward(
        query.device_mesh.get_group(),
        SDPA_SEQ_DIM,
        CPU_SDPA_FORWARD,
        query=_local_shard("query", query),
        key=_local_shard("key", bound["key"]),
        value=_local_shard("value", bound["value"]),
        is_causal=bound.get("is_causal", False),
        dropout_p=0.0,
        scale=bound.get("scale"),
    )
    return _as_seq_sharded(out, query), _as_seq_sharded(logsumexp, query)


def _ring_backward(op_call: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[DTensor, ...]:
    bound = _bind(_BACKWARD_ARG_NAMES, args, kwargs)
    _check_supported(bound)
    query = bound["query"]
    grads = _torch.ring_backward(
        query.device_mesh.get_group(),
        SDPA_SEQ_DIM,
        CPU_SDPA_BACKWARD,
        grad_out=_local_shard("grad_out", bound["grad_out"]),
        grad_out_name="grad_out",
        query=_local_shard("query", query),
        key=_local_shard("key", bound["key"]),
        value=_local_shard("value", bound["value"]),
        out=_local_shard("out", bound["out"]),
        logsumexp=_local_shard("logsumexp", bound["logsumexp"]),
        is_causal=bound["is_causal"],
        dropout_p=0.0,
        scale=bound.get("scale"),
    )
    return tuple(_as_seq_sharded(grad, query) for grad in grads[:3])


def install_cpu_ring() -> None:
    """Register the CPU SDPA ring handlers with torch's context-parallel dispatcher (idempotent).

    Called when :mod:`lightning_cp` is imported, so ``context_parallel()`` from torch works on CPU
    tensors over a gloo group from then on. The handlers are only consulted while CP is switched on.
    """
    _torch.check_torch_internals()
    _torch.register_cp_op_handler(CPU_SDPA_FORWARD, _ring_forward)
    _torch.register_cp_op_handler(CPU_SDPA_BACKWARD, _ring_backward)
