"""Ulysses' view of a sharded batch: where the gathered positions go, and the documents of each row.

Ulysses gathers the shards of its group in rank order (Note [Ulysses] in
:mod:`lightning_cp.attention.ulysses`). Whatever layout sharded the batch — head/tail chunks, packed
documents laid out one by one — sorting the gathered positions gives the tokens in sequence order, so
every mechanism shares one layout. Under the hybrid (Note [hybrid layout] in
:mod:`lightning_cp.sharding.sequence`) the sorted positions of one Ulysses group are exactly the shard
torch's ring expects from that group's place in the ring.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from lightning_cp.sharding.packing import PackedLayout
from lightning_cp.sharding.sequence import shard_positions


def gathered_order(held: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``argsort`` of the positions held by a group's ranks, concatenated in rank order (``[S]`` or ``[B, S]``).

    ``gathered.take_along_dim(order)`` puts what the group gathered in sequence order. ``None`` when it
    arrives in order already (contiguous shards).
    """
    positions = torch.cat(list(held), dim=-1)
    order = positions.argsort(dim=-1)
    in_order = bool((order == torch.arange(order.size(-1))).all())
    return None if in_order else order


def held_positions(padded_len: int, cp_size: int, load_balance: bool, cp_ranks: Sequence[int]) -> list[torch.Tensor]:
    """The positions of an unpacked sequence that each of ``cp_ranks`` holds, in its storage order."""
    return [shard_positions(padded_len, cp_size, rank, load_balance) for rank in cp_ranks]


def held_packed_positions(layout: PackedLayout, cp_ranks: Sequence[int]) -> list[torch.Tensor]:
    """The ``[B, local]`` positions of the padded packed rows that each of ``cp_ranks`` holds."""
    return [layout.positions(rank) for rank in cp_ranks]


def document_spans(layout: PackedLayout) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Per row, ``(start, end)`` of every document of the padded rows; padding forms documents of its own."""
    rows = []
    for document in layout.document:
        starts = [0, *((document.diff() != 0).nonzero().flatten() + 1).tolist(), document.numel()]
        rows.append(tuple(zip(starts[:-1], starts[1:], strict=True)))
    return tuple(rows)


def padding_spans(seq_len: int, padded_len: int) -> tuple[tuple[tuple[int, int], ...], ...] | None:
    """The spans of a padded unpacked row: the sequence, then its padding as a document of its own.

    Causal attention never lets a real token see the padding after it anyway; bidirectional attention
    would. ``None`` (one sequence per row, for every row) when nothing was padded.
    """
    if padded_len == seq_len:
        return None
    return (((0, seq_len), (seq_len, padded_len)),)


def ring_layout(layout: PackedLayout, ulysses_size: int) -> PackedLayout:
    """``layout`` as the ring of the hybrid sees it: each Ulysses group's positions sorted, as one rank's."""
    groups = layout.cp_size // ulysses_size
    shard_index = torch.stack(
        [
            torch.cat([layout.positions(rank) for rank in range(g * ulysses_size, (g + 1) * ulysses_size)], -1)
            .sort(dim=-1)
            .values
            for g in range(groups)
        ]
    )
    return replace(layout, cp_size=groups, shard_index=shard_index)
