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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lightning_cp.attention.document_ring import point_to_point_exchange
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


@dataclass(frozen=True)
class FetchPlan:
    """What one rank of the ring receives and sends for one layout and window (index work only)."""

    #: This rank's global positions, in the order its shard stores them.
    positions: torch.Tensor
    #: Per source rank whose keys are attended: the indices into that source's shard of the keys needed.
    needed: dict[int, torch.Tensor]
    #: Per destination rank that attends some of this rank's keys: the indices into this shard it needs.
    sends: dict[int, torch.Tensor]
    #: Global positions of the concatenated keys (own shard first, then each needed source in order).
    key_positions: torch.Tensor
    #: Source ranks other than this one whose keys are all outside every window (no data, no compute).
    skipped: tuple[int, ...]

    @property
    def received_tokens(self) -> int:
        """Key (and as many value) tokens this rank receives per attention call."""
        return sum(index.numel() for index in self.needed.values())


def _attended(queries: torch.Tensor, keys: torch.Tensor, window: int | None) -> torch.Tensor:
    """Indices of ``keys`` (global positions) that some causal query of ``queries`` attends within ``window``."""
    ordered = queries.sort().values
    first_after = torch.searchsorted(ordered, keys)  # the first query at or after each key
    present = first_after < ordered.numel()
    nearest = ordered[first_after.clamp(max=ordered.numel() - 1)]
    seen = present if window is None else present & (nearest - keys < window)
    return seen.nonzero().flatten()


@functools.lru_cache(maxsize=64)
def plan_fetch(seq_len: int, ring_size: int, rank: int, load_balance: bool, window: int | None) -> FetchPlan:
    """This rank's :class:`FetchPlan` for a ``seq_len``-position sequence over ``ring_size`` ranks.

    Pure index work on the shard layout (every rank computes every rank's part alike); made once per
    layout and window, shared by every layer of that window.
    """
    shards = [shard_positions(seq_len, ring_size, r, load_balance) for r in range(ring_size)]
    mine = shards[rank]
    needed, sends, skipped = {}, {}, []
    for other in range(ring_size):
        if other == rank:
            continue
        wanted = _attended(mine, shards[other], window)
        if wanted.numel():
            needed[other] = wanted
        else:
            skipped.append(other)
        given = _attended(shards[other], mine, window)
        if given.numel():
            sends[other] = given
    key_positions = torch.cat([mine, *(shards[source][index] for source, index in needed.items())])
    return FetchPlan(mine, needed, sends, key_positions, tuple(skipped))


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


def visible(query_positions: torch.Tensor, key_positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[s, T]``: whether each query attends each key (causal, within ``window``), from global positions."""
    distance = query_positions[:, None] - key_positions[None, :]
    allowed = distance >= 0
    return allowed if window is None else allowed & (distance < window)


def masked_ring_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    variant: AttentionVariant,
    group: dist.ProcessGroup | None,
    load_balance: bool,
) -> torch.Tensor:
    """Causal attention of this rank's ``[B, H, s, D]`` shards over the whole sequence (Note [windowed ring]).

    ``key``/``value`` may have fewer heads than ``query`` (grouped-query attention). Every rank of ``group``
    must call it together with the same ``variant`` (window, softcap and sinks of the same layer); the
    shards are laid out over ``group`` as :func:`~lightning_cp.sharding.sequence.shard_positions` says.
    ``group=None``: the whole sequence is here, in order (Ulysses). Differentiable; returns ``[B, H, s, D]`` in
    ``query``'s dtype.
    """
    if query.size(1) % key.size(1):
        raise ValueError(f"{query.size(1)} query heads cannot share {key.size(1)} key/value heads evenly.")
    ring_size, rank = (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))
    plan = plan_fetch(query.size(2) * ring_size, ring_size, rank, load_balance and group is not None, variant.window)
    with torch.autocast(query.device.type, enabled=False):  # fp32 scores and softmax, whatever the caller's dtype
        kv = torch.stack([key, value])
        kv = (kv if group is None else _FetchKeys.apply(kv, plan, group)).float()
        scores = _grouped_scores(query.float() * variant.scale, kv[0])
        if variant.softcap is not None:
            scores = torch.tanh(scores / variant.softcap) * variant.softcap
        query_positions, key_positions = plan.positions.to(query.device), plan.key_positions.to(query.device)
        if variant.alibi_slopes is not None:
            distance = (key_positions[None, :] - query_positions[:, None]).float()
            scores = scores + variant.alibi_slopes.float().view(1, -1, 1, 1) * distance
        scores = scores.masked_fill(~visible(query_positions, key_positions, variant.window), -math.inf)
        if variant.sinks is not None:
            sinks = variant.sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
            probs = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        return _grouped_output(probs, kv[1]).to(query.dtype)
