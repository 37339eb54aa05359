"""The masked ring: attention variants the SDPA ring cannot run, computed block by block from global positions.

Note [windowed ring]
--------------------
torch's ring runs plain causal SDPA. Sliding windows shorter than the sequence, logit softcapping (Gemma 2)
and attention sinks (gpt-oss) change the scores or the softmax, so under the ring (and across the groups of
the hybrid) they run here instead, on unpacked rows in the head/tail (or contiguous) layout of
:mod:`lightning_cp.sharding.sequence`.

Positions. Rank ``g`` of ``r`` ring ranks holds the global positions ``shard_positions(S, r, g)`` (two
chunks with load balancing), and so does every other rank: each rank knows every rank's positions
without communicating. A query at ``q`` attends to a key at ``k`` when ``k ≤ q`` and ``q - k < window``
(Hugging Face's sliding window; no window: every earlier key).

Fetch only what is attended. For each source rank, the keys some query of this rank attends to are
known from positions alone (:func:`plan_fetch`); a source none of whose keys is attended — every key
after this rank's queries, or before all their windows — is a skipped block: nothing is sent, nothing is
computed. The keys and values a rank needs arrive point to point, so the K/V moved falls with the window
(:attr:`FetchPlan.received_tokens`: about ``2·window`` per chunk boundary instead of the whole shard); the
backward sends their gradients back the same way (:class:`_FetchKeys`).

The block kernel. The blocks (this rank's own keys and each fetched part) are concatenated along the key
axis and attended with plain torch ops under autograd in fp32: scores ``scale · q·kᵀ``, softcapped
(``tanh(s/c)·c``) when the module softcaps, masked by global positions, then one softmax over every
visible key — plus, with sinks, a per-head logit in each row's denominator (a column of the softmax that
is dropped after it, as gpt-oss's eager attention does). One softmax over the concatenated blocks is the
log-sum-exp merge of per-block softmaxes, done once; autograd gives the exact backward (softcap's tanh
included). Memory is that of eager attention on this rank's queries: ``local × fetched keys`` scores.

Packed documents. With a packed layout (:class:`~lightning_cp.sharding.packing.PackedLayout`), each token
has a position in its padded row and a document, per row, and a query also needs the key in its own
document: the visibility above plus "same row, same document". Documents are contiguous runs of positions,
so the nearest query at or after a key attends it exactly when that query is in the key's row and document
(and within the window): the same search as unpacked rows, on ``row · padded_len + position`` codes. The
rows of a shard are sliced together, so a source sends the union over rows of the keys some query needs.
Inside one document, distances between padded-row positions are distances in the document, so windows and
ALiBi see what they would see on the document alone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from lightning_cp.attention.document_ring import point_to_point_exchange
from lightning_cp.sharding.packing import PackedLayout
from lightning_cp.sharding.sequence import shard_positions


@dataclass(frozen=True)
class AttentionVariant:
    """What one attention call computes beyond plain causal softmax attention (Note [windowed ring])."""

    scale: float
    #: Hugging Face's sliding window (a key is visible when ``q - k < window``); ``None``: every earlier key.
    window: int | None = None
    #: Logit softcapping ``c``: scores become ``tanh(s / c) · c``.
    softcap: float | None = None
    #: ``[heads]`` per-head sink logits added to each row's softmax denominator (gpt-oss).
    sinks: torch.Tensor | None = None
    #: ``[heads]`` ALiBi slopes: ``slope · (k - q)`` added to the scores (Bloom, MPT; Note [hand-written ALiBi]).
    alibi_slopes: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """Plain causal softmax attention (only a scale): what SDPA's ring computes."""
        return self.window is None and self.softcap is None and self.sinks is None and self.alibi_slopes is None


@dataclass(frozen=True)
class FetchPlan:
    """What one rank of the ring receives and sends for one layout and window (index work only).

    Positions and documents are ``[rows, tokens]``: one row shared by every batch row (unpacked rows), or
    one per batch row (packed documents).
    """

    #: This rank's positions in the (padded) row, in the order its shard stores them.
    positions: torch.Tensor
    #: Per source rank whose keys are attended: the indices into that source's shard of the keys needed.
    needed: dict[int, torch.Tensor]
    #: Per destination rank that attends some of this rank's keys: the indices into this shard it needs.
    sends: dict[int, torch.Tensor]
    #: Positions of the concatenated keys (own shard first, then each needed source in order).
    key_positions: torch.Tensor
    #: Source ranks other than this one whose keys are all outside every window (no data, no compute).
    skipped: tuple[int, ...]
    #: The document of each of this rank's tokens, and of each concatenated key (all 0 on unpacked rows).
    documents: torch.Tensor
    key_documents: torch.Tensor

    @property
    def received_tokens(self) -> int:
        """Key (and as many value) tokens this rank receives per attention call."""
        return sum(index.numel() for index in self.needed.values())


@dataclass(frozen=True)
class _Shard:
    """``[rows, tokens]`` positions in the row and documents of one rank's tokens."""

    positions: torch.Tensor
    documents: torch.Tensor

    def pick(self, index: torch.Tensor) -> _Shard:
        return _Shard(self.positions[:, index], self.documents[:, index])


def _attended(queries: _Shard, keys: _Shard, row_len: int, window: int | None) -> torch.Tensor:
    """Indices of ``keys`` that some causal query of ``queries`` attends within ``window``, in any row.

    The nearest query at or after a key (by ``row · row_len + position``) attends it when it is in the
    key's row and document (documents are contiguous) and inside the window (Note [windowed ring]).
    """
    rows = torch.arange(queries.positions.size(0)).unsqueeze(1)
    query_codes, order = (rows * row_len + queries.positions).flatten().sort()
    query_documents = queries.documents.flatten()[order]
    key_codes = (rows * row_len + keys.positions).flatten()
    first_after = torch.searchsorted(query_codes, key_codes)
    present = first_after < query_codes.numel()
    nearest = first_after.clamp(max=query_codes.numel() - 1)
    distance = query_codes[nearest] - key_codes
    same_row = query_codes[nearest] // row_len == key_codes // row_len
    seen = present & same_row & (query_documents[nearest] == keys.documents.flatten())
    if window is not None:
        seen &= distance < window
    return seen.view_as(keys.positions).any(dim=0).nonzero().flatten()


def _plan(shards: list[_Shard], rank: int, row_len: int, window: int | None) -> FetchPlan:
    """This rank's :class:`FetchPlan` given every rank's tokens (each rank computes every rank's part alike)."""
    mine = shards[rank]
    needed, sends, skipped = {}, {}, []
    for other, theirs in enumerate(shards):
        if other == rank:
            continue
        wanted = _attended(mine, theirs, row_len, window)
        if wanted.numel():
            needed[other] = wanted
        else:
            skipped.append(other)
        given = _attended(theirs, mine, row_len, window)
        if given.numel():
            sends[other] = given
    keys = [mine, *(shards[source].pick(index) for source, index in needed.items())]
    key_positions = torch.cat([key.positions for key in keys], dim=1)
    key_documents = torch.cat([key.documents for key in keys], dim=1)
    return FetchPlan(mine.positions, needed, sends, key_positions, tuple(skipped), mine.documents, key_documents)


@functools.lru_cache(maxsize=64)
def plan_fetch(seq_len: int, ring_size: int, rank: int, load_balance: bool, window: int | None) -> FetchPlan:
    """This rank's :class:`FetchPlan` for a ``seq_len``-position sequence over ``ring_size`` ranks.

    Pure index work on the shard layout; made once per layout and window, shared by every layer of that window.
    """
    shards = []
    for other in range(ring_size):
        positions = shard_positions(seq_len, ring_size, other, load_balance).unsqueeze(0)
        shards.append(_Shard(positions, torch.zeros_like(positions)))
    return _plan(shards, rank, seq_len, window)


def plan_document_fetch(layout: PackedLayout, rank: int, window: int | None) -> FetchPlan:
    """This rank's :class:`FetchPlan` for the packed rows of ``layout`` (Note [windowed ring], packed documents).

    Index work linear in the batch's tokens, made per call: the layout changes with every batch.
    """
    shards = [_Shard(layout.positions(other), layout.documents(other)) for other in range(layout.cp_size)]
    return _plan(shards, rank, layout.padded_len, window)


class _FetchKeys(torch.autograd.Function):
    """``[2, B, H_kv, local, D]`` stacked keys/values → own ones followed by the needed ones of each source.

    The backward returns the fetched keys' gradients to their owners, who add them into their own.
    """

    @staticmethod
    def forward(ctx: Any, kv: torch.Tensor, plan: FetchPlan, group: dist.ProcessGroup) -> torch.Tensor:  # type: ignore[override]
        ctx.plan, ctx.group, ctx.local = plan, group, kv.size(3)
        outgoing = {dest: kv.index_select(3, index.to(kv.device)).contiguous() for dest, index in plan.sends.items()}
        incoming = {
            source: kv.new_empty((*kv.shape[:3], index.numel(), kv.size(4))) for source, index in plan.needed.items()
        }
        received = point_to_point_exchange(outgoing, incoming, group)
        return torch.cat([kv, *(received[source] for source in plan.needed)], dim=3)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        plan: FetchPlan = ctx.plan
        own, *remote = grad.split([ctx.local, *(index.numel() for index in plan.needed.values())], dim=3)
        outgoing = {source: part.contiguous() for source, part in zip(plan.needed, remote, strict=True)}
        incoming = {
            dest: grad.new_empty((*grad.shape[:3], index.numel(), grad.size(4))) for dest, index in plan.sends.items()
        }
        returned = point_to_point_exchange(outgoing, incoming, ctx.group)
        grad_kv = own.clone()
        for dest, index in plan.sends.items():
            grad_kv.index_add_(3, index.to(grad.device), returned[dest])
        return grad_kv, None, None


def _grouped_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``[B, H, s, T]`` scores ``q·kᵀ`` with query head ``h`` using key head ``h // (H / H_kv)`` (GQA)."""
    batch, heads, length, dim = query.shape
    kv_heads = keys.size(1)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, length, dim)
    return (grouped @ keys.unsqueeze(2).transpose(-1, -2)).reshape(batch, heads, length, keys.size(2))


def _grouped_output(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``[B, H, s, D]`` output ``p·v`` with the grouping of :func:`_grouped_scores`."""
    batch, heads, length, keys = probs.shape
    kv_heads = values.size(1)
    grouped = probs.reshape(batch, kv_heads, heads // kv_heads, length, keys)
    return (grouped @ values.unsqueeze(2)).reshape(batch, heads, length, values.size(-1))


def visible(plan: FetchPlan, window: int | None) -> torch.Tensor:
    """``[rows, 1, s, T]``: whether each query attends each key (same document, causal, within ``window``)."""
    distance = plan.positions[:, :, None] - plan.key_positions[:, None, :]
    allowed = (distance >= 0) & (plan.documents[:, :, None] == plan.key_documents[:, None, :])
    return (allowed if window is None else allowed & (distance < window)).unsqueeze(1)


def masked_ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    variant: AttentionVariant,
    group: dist.ProcessGroup | None,
    load_balance: bool,
    documents: PackedLayout | None = None,
) -> torch.Tensor:
    """Causal attention of this rank's ``[B, H, s, D]`` shards over the whole sequence (Note [windowed ring]).

    ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention). Every rank of ``group``
    must call it together with the same ``variant`` (window, softcap and sinks of the same layer); the
    shards are laid out over ``group`` as :func:`~lightning_cp.sharding.sequence.shard_positions` says, or as
    ``documents`` (packed rows sharded over ``group``) says. ``group=None``: the whole sequence is here, in
    order (Ulysses). Differentiable; returns ``[B, H, s, D]`` in ``query``'s dtype.
    """
    if query.size(1) % key.size(1):
        raise ValueError(f"{query.size(1)} query heads cannot share {key.size(1)} key/value heads evenly.")
    ring_size, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    if documents is None:
        balanced = load_balance and group is not None
        plan = plan_fetch(query.size(2) * ring_size, ring_size, rank, balanced, variant.window)
    else:
        if documents.cp_size != ring_size or documents.shard_index.size(-1) != query.size(2):
            raise ValueError(
                f"The packed layout holds {documents.shard_index.size(-1)} tokens on each of {documents.cp_size}"
                f" ranks, but the masked ring got {query.size(2)} on each of {ring_size}: pass the sharded batch."
            )
        plan = plan_document_fetch(documents, rank, variant.window)
    with torch.autocast(query.device.type, enabled=False):  # fp32 scores and softmax, whatever the caller's dtype
        kv = torch.stack([key, value])
        kv = (kv if group is None else _FetchKeys.apply(kv, plan, group)).float()
        scores = _grouped_scores(query.float() * variant.scale, kv[0])
        if variant.softcap is not None:
            scores = torch.tanh(scores / variant.softcap) * variant.softcap
        plan = _on_device(plan, query.device)
        if variant.alibi_slopes is not None:
            distance = (plan.key_positions[:, None, :] - plan.positions[:, :, None]).float().unsqueeze(1)
            scores = scores + variant.alibi_slopes.float().view(1, -1, 1, 1) * distance
        scores = scores.masked_fill(~visible(plan, variant.window), -math.inf)
        if variant.sinks is not None:
            sinks = variant.sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
            probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        return _grouped_output(probs, kv[1]).to(query.dtype)


def _on_device(plan: FetchPlan, device: torch.device) -> FetchPlan:
    """``plan`` with the positions and documents the mask reads on ``device`` (the index maps stay on the CPU)."""
    fields = ("positions", "key_positions", "documents", "key_documents")
    return replace(plan, **{name: getattr(plan, name).to(device) for name in fields})
