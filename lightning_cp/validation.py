"""Input rules that CP checks up front, so bad input fails with a clear message before any collective.

Every rule raises on each rank alike (they see the same batch and model), so no rank is left waiting
in a ring. The rules of this module, of batches, of packed documents and of the model hooks raise a
:class:`ContextParallelInputError`, whose traceback :mod:`lightning_cp.rank_errors` then shows once
instead of once per rank. Where each rule is enforced:

* here: query / key / value must share a dtype (``check_qkv``), tensor parallelism must divide the attention heads
  (``check_tensor_parallel_heads``), and what the ring cannot compute (``check_ring_supported``:
  explicit masks, dropout, non-causal attention with load balancing);
* :func:`lightning_cp.sharding.batch.validate_cp_batch`: input ids or embeddings, labels, agreeing lengths
  and batch sizes, empty batches, right-padding-only attention masks;
* :func:`lightning_cp.sharding.packing.document_lengths`: packed documents that cover their rows exactly;
* :mod:`lightning_cp.hooks`: sliding windows, non-SDPA attention, missing ``position_ids``;
* :func:`lightning_cp.mesh.resolve_layout`: cp / dp / tp sizes that multiply to the world size;
* :func:`lightning_cp.consistency.check_same_batch`: every rank of a CP group holds the same batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class ContextParallelInputError(ValueError):
    """Input that context parallelism refuses: a model, an attention call or a batch it would get wrong.

    Raised on every rank of a CP group alike (they hold the same model and batch) and before any
    collective, so :mod:`lightning_cp.rank_errors` shows its traceback once, on the group's first rank.
    """


class ContextParallelBatchError(ContextParallelInputError):
    """A batch that context parallelism cannot shard without changing the result."""


def ring_refusal(attn_mask: Any, dropout_p: float, is_causal: bool, load_balance: bool) -> str | None:
    """Why the ring cannot compute this SDPA call, or ``None`` when it can."""
    if attn_mask is not None:
        return (
            "Context-parallel attention cannot apply an explicit `attn_mask`: each rank holds only a shard of"
            " the sequence. Use causal attention (`is_causal=True`); `attach_context_parallel_hooks(model)`"
            " makes Hugging Face attention modules drop their masks and run causal."
        )
    if dropout_p:
        return "Context-parallel attention does not support attention dropout; set `dropout_p=0`."
    if not is_causal and load_balance:
        return (
            "Context parallelism with load balancing needs causal attention (`is_causal=True`): the head/tail"
            " layout only balances a causal mask. Turn load balancing off for non-causal attention."
        )
    return None


def check_ring_supported(attn_mask: Any, dropout_p: float, is_causal: bool, load_balance: bool) -> None:
    """Refuse what the ring cannot compute (see :func:`ring_refusal`), before any collective."""
    reason = ring_refusal(attn_mask, dropout_p, is_causal, load_balance)
    if reason is not None:
        raise ContextParallelInputError(reason)


def refuse_together(reason: str | None, group: dist.ProcessGroup) -> None:
    """Raise on every rank of ``group`` when any of them has a ``reason`` to refuse; else return.

    For checks whose outcome depends on a rank's own shard (a model that builds a mask only where the
    shard's positions jump): refusing on some ranks only would leave the others waiting in the next
    collective until the timeout. One all-gather of a flag per rank decides for all.
    """
    flags = torch.zeros(dist.get_world_size(group), dtype=torch.int32, device=_group_device(group))
    flags[dist.get_rank(group)] = reason is not None
    dist.all_reduce(flags, group=group)
    refusing = flags.nonzero().flatten().tolist()
    if not refusing:
        return
    if reason is None:
        reason = f"context-parallel rank(s) {refusing} of this group refused the call (their error says why)."
    raise ContextParallelInputError(f"{reason} [refused on context-parallel rank(s) {refusing}; all ranks stop]")


def _group_device(group: dist.ProcessGroup) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Refuse query / key / value of different dtypes (the ring's kernels and merges need one)."""
    if not query.dtype == key.dtype == value.dtype:
        raise ContextParallelInputError(
            f"Context-parallel attention needs query, key and value of one dtype; got {query.dtype},"
            f" {key.dtype} and {value.dtype}. Cast them to one dtype (mixed precision under autocast is handled)."
        )


def check_tensor_parallel_heads(model: nn.Module, tensor_parallel_size: int) -> None:
    """Refuse a tensor-parallel size that does not divide the attention (and key/value) heads."""
    if tensor_parallel_size == 1:
        return
    for module in model.modules():
        config = getattr(module, "config", None)
        for name in ("num_attention_heads", "num_key_value_heads"):
            heads = getattr(config, name, None)
            if isinstance(heads, int) and heads % tensor_parallel_size:
                raise ContextParallelInputError(
                    f"tensor_parallel_size={tensor_parallel_size} does not divide the model's {name} ({heads}):"
                    " tensor parallelism splits attention by heads. Choose a tensor_parallel_size that divides it."
                )
