"""Document-masked ring attention: packed documents under CP, on any device.

torch's ring only knows plain causal attention over one sequence. Here each rank keeps its query
shard, the key/value shards of the CP group are gathered, and attention runs block by block — one
block per (this rank's queries, one rank's keys) pair — with the part of the document mask that
belongs to that block: a query attends to a key when both are in the same document (and, causal,
the key does not come after it). Blocks with no allowed pair are skipped. Partial results merge
through their log-sum-exp in fp32, so the result equals attention over every document on its own.

The backward recomputes each block from the saved output and log-sum-exp (the flash-attention
recurrence) and sends every key/value gradient back to the rank that holds that shard. The blocks
are plain matrix products, so the same code runs on CPU with gloo and on GPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lightning_cp.sharding.packing import PackedLayout


def _block_mask(
    query_documents: torch.Tensor,
    query_positions: torch.Tensor,
    key_documents: torch.Tensor,
    key_positions: torch.Tensor,
    is_causal: bool,
) -> torch.Tensor | None:
    """``[batch, 1, q, k]`` allowed (query, key) pairs of one block, or ``None`` when none is allowed."""
    allowed = query_documents[:, :, None] == key_documents[:, None, :]
    if is_causal:
        allowed &= key_positions[:, None, :] <= query_positions[:, :, None]
    return allowed.unsqueeze(1) if bool(allowed.any()) else None


def _expand_heads(tensor: torch.Tensor, groups: int) -> torch.Tensor:
    return tensor if groups == 1 else tensor.repeat_interleave(groups, dim=1)


def _fold_heads(grad: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return grad
    batch, heads, seq, dim = grad.shape
    return grad.view(batch, heads // groups, groups, seq, dim).sum(2)


def _gather_shards(tensor: torch.Tensor, group: dist.ProcessGroup) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return parts


class _DocumentMaskedRing(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        masks: list[torch.Tensor | None],
        scale: float,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        groups = query.size(1) // key.size(1)
        keys, values = _gather_shards(key, group), _gather_shards(value, group)
        q = query.float()
        out = torch.zeros_like(q)
        lse = torch.full(q.shape[:-1], -math.inf, dtype=torch.float32, device=q.device)
        for mask, k, v in zip(masks, keys, values, strict=True):
            if mask is None:
                continue
            scores = (q @ _expand_heads(k, groups).float().transpose(-1, -2)) * scale
            scores = scores.masked_fill(~mask, -math.inf)
            block_lse = scores.logsumexp(dim=-1)
            probs = torch.exp(scores - block_lse.unsqueeze(-1)).nan_to_num(0.0)
            block_out = probs @ _expand_heads(v, groups).float()
            merged = torch.logaddexp(lse, block_lse)
            keep = torch.exp(lse - merged).nan_to_num(0.0).unsqueeze(-1)
            take = torch.exp(block_lse - merged).nan_to_num(0.0).unsqueeze(-1)
            out = out * keep + block_out * take
            lse = merged
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.masks, ctx.scale, ctx.group, ctx.groups = masks, scale, group, groups
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        # A backward called inside an autocast region runs with autocast on: keep its products in fp32 too.
        with torch.autocast(grad_out.device.type, enabled=False):
            return _document_masked_backward(ctx, grad_out)


def _document_masked_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    """Gradients of :class:`_DocumentMaskedRing`: each block recomputed from the saved output and log-sum-exp."""
    query, key, value, out, lse = ctx.saved_tensors
    groups, scale, group = ctx.groups, ctx.scale, ctx.group
    keys, values = _gather_shards(key, group), _gather_shards(value, group)
    q, d_out = query.float(), grad_out.float()
    delta = (d_out * out).sum(dim=-1, keepdim=True)
    d_query = torch.zeros_like(q)
    d_keys = torch.zeros((len(keys), *key.shape), dtype=torch.float32, device=key.device)
    d_values = torch.zeros_like(d_keys)
    for rank, (mask, k, v) in enumerate(zip(ctx.masks, keys, values, strict=True)):
        if mask is None:
            continue
        k, v = _expand_heads(k, groups).float(), _expand_heads(v, groups).float()
        scores = (q @ k.transpose(-1, -2)) * scale
        probs = torch.exp(scores.masked_fill(~mask, -math.inf) - lse.unsqueeze(-1))
        d_values[rank] = _fold_heads(probs.transpose(-1, -2) @ d_out, groups)
        d_scores = probs * (d_out @ v.transpose(-1, -2) - delta)
        d_query += (d_scores @ k) * scale
        d_keys[rank] = _fold_heads((d_scores.transpose(-1, -2) @ q) * scale, groups)
    dist.all_reduce(d_keys, group=group)
    dist.all_reduce(d_values, group=group)
    own = dist.get_rank(group)
    return (
        d_query.to(query.dtype),
        d_keys[own].to(key.dtype),
        d_values[own].to(value.dtype),
        None,
        None,
        None,
    )


class DocumentMaskedAttention:
    """Document-masked ring attention for one packed batch, callable like SDPA on this rank's shards.

    The mask blocks depend only on the batch's layout, so they are built on the first call and shared
    by every attention layer after it (and by their backward passes, which keep them anyway).
    """

    def __init__(self, layout: PackedLayout, group: dist.ProcessGroup) -> None:
        self.layout, self.group = layout, group
        self._masks: dict[tuple[bool, torch.device], list[torch.Tensor | None]] = {}

    def _block_masks(self, is_causal: bool, device: torch.device) -> list[torch.Tensor | None]:
        if (is_causal, device) not in self._masks:
            layout, rank = self.layout, dist.get_rank(self.group)
            query_documents, query_positions = layout.documents(rank).to(device), layout.positions(rank).to(device)
            self._masks[is_causal, device] = [
                _block_mask(
                    query_documents,
                    query_positions,
                    layout.documents(source).to(device),
                    layout.positions(source).to(device),
                    is_causal,
                )
                for source in range(layout.cp_size)
            ]
        return self._masks[is_causal, device]

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        is_causal: bool = True,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Attention of this rank's ``[batch, heads, local, dim]`` shards over the documents of the layout.

        ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention). Differentiable;
        every rank of the group must call it together, in the same order.
        """
        local_len = self.layout.shard_index.size(-1)
        if query.size(2) != local_len or key.size(2) != local_len:
            raise ValueError(
                f"Document-masked ring attention got {query.size(2)} query and {key.size(2)} key positions, but"
                f" this rank's shard of the packed batch holds {local_len}: pass the sharded batch to the model."
            )
        if query.size(1) % key.size(1):
            raise ValueError(f"{query.size(1)} query heads cannot share {key.size(1)} key/value heads evenly.")
        masks = self._block_masks(is_causal, query.device)
        scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
        return _DocumentMaskedRing.apply(query, key, value, masks, scale, self.group)
