"""Document-masked ring attention: packed documents under CP, in memory linear in the sequence.

Note [document rectangles]
--------------------------
A rank's shard of a packed row is a few *segments*: runs of tokens of one document at consecutive
positions (a whole document, or a head or tail chunk of a split one; sharding.packing). Take this
rank's queries and the keys of one source rank. A query attends to a key when both are in the same
document (and, causal, the key is not after it), so the allowed part of the block is, for every
pair of a query segment and a key segment of the same document, at most three rectangles: keys all
before the queries (fully visible), the stretch where both cover the same positions (the causal
diagonal: equal lengths, aligned at the top left as SDPA's ``is_causal`` is), and queries after all
the keys (fully visible). Pairs of different documents, and keys after every query, are nothing.

Each rectangle runs through the fused SDPA kernel that also returns the log-sum-exp (CPU flash,
CUDA efficient; ``_torch.attention_with_lse``), and the partial outputs merge in fp32 through their
log-sum-exps. No score matrix and no mask are ever built: memory is the kernels' own (linear)
plus fp32 accumulators the size of the query shard.

A source rank sends only the key/value tokens some query of this rank attends to (a document kept
whole on one rank costs no communication at all; Note [whole-document placement] in
:mod:`lightning_cp.sharding.packing`), point to point. The backward gets them again, runs each
rectangle's kernel backward with the *merged* output and log-sum-exp (the flash-attention identity:
the gradient of the whole attention is the sum of the rectangles' gradients computed that way),
accumulates dq, dk, dv in fp32 and sends the key/value gradients back to the ranks that own them.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_cp.attention import _torch
from lightning_cp.sharding.packing import PackedLayout


@dataclass(frozen=True)
class _Segment:
    """Tokens ``[start, start + length)`` of batch row ``row`` of a shard: one document, consecutive positions."""

    row: int
    start: int
    length: int
    document: int
    #: Position of its first token in the padded row.
    position: int


@dataclass(frozen=True)
class KeyRange:
    """Tokens ``[start, start + length)`` of batch row ``row`` of a source rank's key/value shard."""

    row: int
    start: int
    length: int


@dataclass(frozen=True)
class Rectangle:
    """One kernel call: queries ``[query_start, +query_len)`` of this rank's batch row ``row`` against keys
    ``[key_start, +key_len)`` of row ``key_row`` of the source's keys; all pairs, or the causal diagonal."""

    row: int
    query_start: int
    query_len: int
    key_row: int
    key_start: int
    key_len: int
    is_causal: bool

    @property
    def pairs(self) -> int:
        """The (query, key) pairs it attends."""
        return self.query_len * (self.query_len + 1) // 2 if self.is_causal else self.query_len * self.key_len


@dataclass(frozen=True)
class Block:
    """This rank's queries against one source rank's keys (Note [document rectangles])."""

    source: int
    #: What the source sends (its own block: nothing, the rectangles read the local shard).
    needed: tuple[KeyRange, ...]
    rectangles: tuple[Rectangle, ...]


@dataclass(frozen=True)
class RingPlan:
    """Everything one rank computes and communicates for a layout: the same for every attention layer."""

    rank: int
    #: Blocks with at least one rectangle, one per source rank.
    blocks: tuple[Block, ...]
    #: For every other rank that needs some of this rank's keys, which ones.
    sends: dict[int, tuple[KeyRange, ...]]

    @property
    def attended_pairs(self) -> int:
        """(query, key) pairs this rank's kernels attend: its share of the work."""
        return sum(rect.pairs for block in self.blocks for rect in block.rectangles)

    @property
    def received_tokens(self) -> int:
        """Key (and as many value) tokens this rank receives per attention call."""
        return sum(span.length for block in self.blocks for span in block.needed)


def _segments(documents: torch.Tensor, positions: torch.Tensor) -> list[_Segment]:
    """The segments of a ``[batch, local]`` shard, given each token's document and padded-row position."""
    segments = []
    for row, (document, position) in enumerate(zip(documents, positions, strict=True)):
        breaks = (document.diff() != 0) | (position.diff() != 1)
        starts = [0, *(breaks.nonzero().flatten() + 1).tolist(), document.numel()]
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            segments.append(_Segment(row, start, end - start, int(document[start]), int(position[start])))
    return segments


def _rectangles(
    query: _Segment, key_position: int, key_len: int, key_row: int, key_start: int, is_causal: bool
) -> list[Rectangle]:
    """Rectangles of ``query`` against keys at positions ``[key_position, +key_len)`` of its document."""

    def rectangle(q0: int, q1: int, k0: int, k1: int, causal: bool) -> Rectangle:
        query_start, key_offset = query.start + q0 - query.position, key_start + k0 - key_position
        return Rectangle(query.row, query_start, q1 - q0, key_row, key_offset, k1 - k0, causal)

    q_begin, q_end, k_begin, k_end = query.position, query.position + query.length, key_position, key_position + key_len
    if not is_causal:
        return [rectangle(q_begin, q_end, k_begin, k_end, False)]
    rectangles = []
    low, high = max(q_begin, k_begin), min(q_end, k_end)
    if low < high:  # both cover [low, high): earlier keys in full, then the diagonal
        if k_begin < low:
            rectangles.append(rectangle(low, high, k_begin, low, False))
        rectangles.append(rectangle(low, high, low, high, True))
    after = max(q_begin, k_end)
    if after < q_end:  # queries after every key see them all
        rectangles.append(rectangle(after, q_end, k_begin, k_end, False))
    return rectangles


def _block(queries: list[_Segment], keys: list[_Segment], source: int, own: bool, is_causal: bool) -> Block:
    """The block of ``queries`` against one source's ``keys``, reading its keys where they will be."""
    by_document: dict[tuple[int, int], list[_Segment]] = defaultdict(list)
    for segment in queries:
        by_document[segment.row, segment.document].append(segment)
    needed, rectangles, offset = [], [], 0
    for key in keys:
        partners = by_document.get((key.row, key.document), [])
        if not partners:
            continue
        length = key.length
        if is_causal:  # keys after this document's last query here are never attended
            length = min(length, max(q.position + q.length for q in partners) - key.position)
        if length <= 0:
            continue
        if own:
            key_row, key_start = key.row, key.start
        else:
            needed.append(KeyRange(key.row, key.start, length))
            key_row, key_start = 0, offset
            offset += length
        for query in partners:
            rectangles += _rectangles(query, key.position, length, key_row, key_start, is_causal)
    return Block(source, tuple(needed), tuple(rectangles))


def plan_document_ring(layout: PackedLayout, rank: int, is_causal: bool) -> RingPlan:
    """What ``rank`` computes and exchanges for ``layout`` (Note [document rectangles]); pure index work."""
    shards = [_segments(layout.documents(r), layout.positions(r)) for r in range(layout.cp_size)]
    blocks = [_block(shards[rank], shards[src], src, src == rank, is_causal) for src in range(layout.cp_size)]
    sends = {}
    for destination in range(layout.cp_size):
        if destination != rank:
            needed = _block(shards[destination], shards[rank], rank, False, is_causal).needed
            if needed:
                sends[destination] = needed
    return RingPlan(rank, tuple(block for block in blocks if block.rectangles), sends)


def _pick(tensor: torch.Tensor, spans: tuple[KeyRange, ...]) -> torch.Tensor:
    """``[heads, tokens, dim]``: the tokens of ``spans`` of a ``[batch, heads, local, dim]`` shard, in order."""
    return torch.cat([tensor[span.row, :, span.start : span.start + span.length] for span in spans], dim=1)


def point_to_point_exchange(
    outgoing: dict[int, torch.Tensor], incoming: dict[int, torch.Tensor], group: dist.ProcessGroup
) -> dict[int, torch.Tensor]:
    """Send ``outgoing[rank]`` to every such rank and fill ``incoming[rank]`` from it, all at once."""
    operations = [dist.P2POp(dist.isend, tensor, group=group, group_peer=peer) for peer, tensor in outgoing.items()]
    operations += [dist.P2POp(dist.irecv, tensor, group=group, group_peer=peer) for peer, tensor in incoming.items()]
    if operations:
        for work in dist.batch_isend_irecv(operations):
            work.wait()
    return incoming


def _exchange_kv(
    key: torch.Tensor, value: torch.Tensor, plan: RingPlan, group: dist.ProcessGroup
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per remote source, ``[1, kv_heads, tokens, dim]`` keys and values of the tokens this rank needs."""
    outgoing = {peer: torch.stack([_pick(key, spans), _pick(value, spans)]) for peer, spans in plan.sends.items()}
    incoming = {
        block.source: key.new_empty((2, key.size(1), sum(span.length for span in block.needed), key.size(3)))
        for block in plan.blocks
        if block.needed
    }
    return {source: (kv[0:1], kv[1:2]) for source, kv in point_to_point_exchange(outgoing, incoming, group).items()}


def _return_kv_grads(
    grad_key: torch.Tensor,
    grad_value: torch.Tensor,
    remote: dict[int, tuple[torch.Tensor, torch.Tensor]],
    plan: RingPlan,
    group: dist.ProcessGroup,
) -> None:
    """Send the gradients of received keys/values back to their owners; add those of this rank's into its own."""
    outgoing = {source: torch.cat([dk, dv]) for source, (dk, dv) in remote.items()}
    incoming = {
        peer: grad_key.new_empty((2, grad_key.size(1), sum(span.length for span in spans), grad_key.size(3)))
        for peer, spans in plan.sends.items()
    }
    for peer, grads in point_to_point_exchange(outgoing, incoming, group).items():
        offset = 0
        for span in plan.sends[peer]:
            window = slice(span.start, span.start + span.length)
            grad_key[span.row, :, window] += grads[0, :, offset : offset + span.length]
            grad_value[span.row, :, window] += grads[1, :, offset : offset + span.length]
            offset += span.length


def _queries(tensor: torch.Tensor, rect: Rectangle) -> torch.Tensor:
    return tensor[rect.row : rect.row + 1, :, rect.query_start : rect.query_start + rect.query_len]


def _keys(tensor: torch.Tensor, rect: Rectangle) -> torch.Tensor:
    return tensor[rect.key_row : rect.key_row + 1, :, rect.key_start : rect.key_start + rect.key_len]


def _merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor) -> None:
    """Fold one rectangle's ``(out, lse)`` into the fp32 accumulators ``out`` and ``lse`` (views), in place."""
    merged = torch.logaddexp(lse, block_lse)
    out.mul_(torch.exp(lse - merged).unsqueeze(-1))
    out.add_(block_out.float() * torch.exp(block_lse - merged).unsqueeze(-1))
    lse.copy_(merged)


class _DocumentMaskedRing(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        plan: RingPlan,
        scale: float,
        group: dist.ProcessGroup,
    ) -> torch.Tensor:
        remote = _exchange_kv(key, value, plan, group)
        out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
        lse = torch.full(query.shape[:-1], -math.inf, dtype=torch.float32, device=query.device)
        for block in plan.blocks:
            keys, values = remote.get(block.source, (key, value))
            for rect in block.rectangles:
                block_out, block_lse = _torch.attention_with_lse(
                    _queries(query, rect), _keys(keys, rect), _keys(values, rect), rect.is_causal, scale
                )
                _merge(_queries(out, rect), _queries(lse, rect), block_out, block_lse)
        out = out.to(query.dtype)
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.plan, ctx.scale, ctx.group = plan, scale, group
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        # A backward called inside an autocast region runs with autocast on: keep the kernels' dtypes as given.
        with torch.autocast(grad_out.device.type, enabled=False):
            return _document_masked_backward(ctx, grad_out)


def _document_masked_backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
    """Gradients of :class:`_DocumentMaskedRing`: each rectangle's kernel backward with the merged out and lse."""
    query, key, value, out, lse = ctx.saved_tensors
    plan, scale, group = ctx.plan, ctx.scale, ctx.group
    grad_out = grad_out.to(query.dtype)
    remote = _exchange_kv(key, value, plan, group)
    grad_query = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    grad_key = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
    grad_value = torch.zeros_like(grad_key)
    remote_grads = {
        source: (torch.zeros(k.shape, dtype=torch.float32, device=k.device), torch.zeros_like(v, dtype=torch.float32))
        for source, (k, v) in remote.items()
    }
    for block in plan.blocks:
        keys, values = remote.get(block.source, (key, value))
        dk, dv = remote_grads.get(block.source, (grad_key, grad_value))
        for rect in block.rectangles:
            q_grad, k_grad, v_grad = _torch.attention_with_lse_backward(
                _queries(grad_out, rect),
                _queries(query, rect),
                _keys(keys, rect),
                _keys(values, rect),
                _queries(out, rect),
                _queries(lse, rect),
                rect.is_causal,
                scale,
            )
            _queries(grad_query, rect).add_(q_grad)
            _keys(dk, rect).add_(k_grad)
            _keys(dv, rect).add_(v_grad)
    _return_kv_grads(grad_key, grad_value, remote_grads, plan, group)
    return grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype), None, None, None


class DocumentMaskedAttention:
    """Document-masked ring attention for one packed batch, callable like SDPA on this rank's shards.

    The plan (Note [document rectangles]) depends only on the batch's layout, so it is made on the
    first call and shared by every attention layer after it.
    """

    def __init__(self, layout: PackedLayout, group: dist.ProcessGroup) -> None:
        self.layout, self.group = layout, group
        self._plans: dict[bool, RingPlan] = {}

    def plan(self, is_causal: bool) -> RingPlan:
        """This rank's :class:`RingPlan` for the layout (made once per ``is_causal``)."""
        if is_causal not in self._plans:
            self._plans[is_causal] = plan_document_ring(self.layout, dist.get_rank(self.group), is_causal)
        return self._plans[is_causal]

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
        scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
        return _DocumentMaskedRing.apply(query, key, value, self.plan(is_causal), scale, self.group)
