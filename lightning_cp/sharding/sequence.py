"""Cutting a sequence into per-rank shards and putting it back together.

Note [head/tail layout]
-----------------------
Under causal attention, a query attends to every key before it, so the last positions of a sequence
cost the most. Cut contiguously (rank ``r`` keeps chunk ``r`` of ``cp``), the last rank would do most
of the work. Cut load balanced instead: ``2 * cp`` equal chunks, rank ``r`` keeps chunks ``r`` and
``2 * cp - 1 - r`` (a cheap head and an expensive tail), so every rank attends the same number of
(query, key) pairs. For cp = 2 (chunks ``c0 … c3``; chunk ``i`` attends to ``i + 1`` chunks):

==========  =============  ===========  =============  ===========
layout      rank 0 holds   rank 0 work  rank 1 holds   rank 1 work
==========  =============  ===========  =============  ===========
head/tail   c0, c3         1 + 4 = 5    c1, c2         2 + 3 = 5
contiguous  c0, c1         1 + 2 = 3    c2, c3         3 + 4 = 7
==========  =============  ===========  =============  ===========

It is what torch's ring (``_HeadTailLoadBalancer``) expects, and the same as Transformer Engine's
dual-chunk swap. Packed rows apply it to every document on its own (``sharding.packing``), which is
Transformer Engine's THD partitioning (``sharding.thd``), or, for lightning_cp's document ring, only to
the documents too long to stay whole on one rank (Note [whole-document placement]). The sequence
must be a multiple of ``2 * cp`` (``cp`` contiguous); lightning_cp pads it.

Note [hybrid layout]
--------------------
The hybrid runs Ulysses inside groups of ``u`` consecutive CP ranks and torch's ring across the
``r = cp / u`` groups, on the same head/tail layout as the ring over all ``cp`` ranks. Group ``g`` holds
chunks ``g·u … g·u + u - 1`` and their mirror images ``2·cp - (g+1)·u … 2·cp - 1 - g·u`` of the ``2·cp``
chunks: together, chunk ``g`` and chunk ``2·r - 1 - g`` of a ``2·r``-chunk split, which is exactly rank
``g``'s shard of the head/tail layout over ``r`` ranks. So after Ulysses' all-to-all inside the group
and a sort of the positions it gathered (:mod:`lightning_cp.sharding.ulysses`), each rank holds the
ring's shard for ``H/u`` heads, and torch's load-balanced ring runs across the groups unchanged. Packed
rows work the same way document by document. Every mechanism shares one layout, so nothing else
(gathering outputs, losses, checkpoints) depends on the mechanism.

Sharding is out of place and differentiable, so tensors that require grad (``inputs_embeds`` from a
vision tower, say) still pass gradients back to what produced them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def shard_multiple(cp_size: int, load_balance: bool) -> int:
    """The sequence length must be a multiple of this for ``cp_size`` ranks in the given layout."""
    return 2 * cp_size if load_balance else cp_size


#: On CUDA, torch's efficient SDPA kernel pads its log-sum-exp to a multiple of this many queries.
EFFICIENT_LSE_BLOCK = 32


def ring_pad_multiple(cp_size: int, load_balance: bool, device: torch.device | str) -> int:
    """Pad a sequence for torch's SDPA ring to a multiple of this: every query block of the ring stays exact.

    On CUDA the efficient kernel (the one fp32 runs) returns its log-sum-exp padded to a multiple of
    32 queries (torch's meta registration of ``_scaled_dot_product_efficient_attention``), and torch's
    ring merge combines it with the output block as is, and takes the second half of it for a
    load-balanced tail block. Both need every query block (a half shard with load balancing, the whole
    shard without) to be a multiple of 32. Other devices need only :func:`shard_multiple`.
    """
    multiple = shard_multiple(cp_size, load_balance)
    return multiple * EFFICIENT_LSE_BLOCK if torch.device(device).type == "cuda" else multiple


def shard_positions(seq_len: int, cp_size: int, cp_rank: int, load_balance: bool) -> torch.Tensor:
    """Global sequence positions held by ``cp_rank``, in the order its shard stores them."""
    multiple = shard_multiple(cp_size, load_balance)
    if seq_len % multiple:
        raise ValueError(f"Sequence length {seq_len} is not a multiple of {multiple} (cp_size={cp_size}).")
    if not load_balance:
        chunk = seq_len // cp_size
        return torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    chunk = seq_len // (2 * cp_size)
    head = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    tail_chunk = 2 * cp_size - 1 - cp_rank
    tail = torch.arange(tail_chunk * chunk, (tail_chunk + 1) * chunk)
    return torch.cat([head, tail])


def shard_sequence(tensor: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int, load_balance: bool) -> torch.Tensor:
    """This rank's shard of ``tensor`` along ``seq_dim``: a new tensor, differentiable."""
    index = shard_positions(tensor.size(seq_dim), cp_size, cp_rank, load_balance).to(tensor.device)
    return tensor.index_select(seq_dim, index)


def restore_order(gathered: torch.Tensor, seq_dim: int, cp_size: int, load_balance: bool) -> torch.Tensor:
    """Turn rank-ordered concatenated shards back into sequence order (inverse of the shard layout)."""
    if not load_balance:
        return gathered
    seq_len = gathered.size(seq_dim)
    held = torch.cat([shard_positions(seq_len, cp_size, rank, load_balance) for rank in range(cp_size)])
    return gathered.index_select(seq_dim, torch.argsort(held).to(gathered.device))


class _AllGatherSequence(torch.autograd.Function):
    """All-gather along a dimension; the backward sums the incoming gradients over the group."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, seq_dim: int, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.seq_dim, ctx.group, ctx.local_len = seq_dim, group, local.size(seq_dim)
        parts = [
            torch.empty_like(local, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))
        ]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=seq_dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        return grad.narrow(ctx.seq_dim, rank * ctx.local_len, ctx.local_len), None, None


def gather_in_rank_order(local: torch.Tensor, group: dist.ProcessGroup, seq_dim: int) -> torch.Tensor:
    """Every rank's ``local`` concatenated along ``seq_dim`` in rank order; differentiable (see below)."""
    return _AllGatherSequence.apply(local, seq_dim, group)


def gather_sequence(local: torch.Tensor, cp_mesh: DeviceMesh, seq_dim: int, load_balance: bool) -> torch.Tensor:
    """Collect every rank's shard of a sequence tensor and return the whole sequence, in order.

    Differentiable: the gradient reaching a shard is the sum of the gradients that every rank's copy
    of the full sequence received (the usual all-gather convention).
    """
    gathered = _AllGatherSequence.apply(local, seq_dim, cp_mesh.get_group())
    return restore_order(gathered, seq_dim, cp_mesh.size(), load_balance)


def take_positions(tensor: torch.Tensor, order: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """``tensor`` (batch first) with its sequence taken in ``order`` (``[S]``, or ``[B, S]`` per row).

    ``index_select`` (a row at a time for per-row orders): a gather with a broadcast index costs about
    four times as much, forward and backward.
    """
    order = order.to(tensor.device)
    if order.ndim == 1:
        return tensor.index_select(seq_dim, order)
    return torch.stack([row.index_select(seq_dim - 1, row_order) for row, row_order in zip(tensor, order, strict=True)])
