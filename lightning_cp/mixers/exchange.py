"""How the whole sequence is put together from a CP group's shards, for the sequence mixers.

Note [mixer sequence order]
---------------------------
A recurrence, a scan or a causal convolution reads the sequence in order, and the plain model runs it
over the row exactly as the batch gave it. Under CP each rank holds some positions of every row, in
whatever layout the batch was sharded (head/tail chunks, packed documents placed whole, padding).
Concatenating the group's shards in rank order and taking them in :attr:`MixerExchange.order` gives the
row as the plain model saw it: the first :attr:`MixerExchange.length` places are the original tokens in
their original order, padding comes after them. A mechanism runs the model's own mixer there, on the
original row (padding cut off, so nothing the plain model did not see can leak in, whatever the
direction of the mixer), and sends each rank back its positions through the inverse permutation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from lightning_cp.attention.ulysses import UlyssesGroup
from lightning_cp.sharding.packing import PackedLayout
from lightning_cp.sharding.sequence import gather_in_rank_order, shard_positions, take_positions


@dataclass(frozen=True)
class MixerExchange:
    """One micro-batch's view of the whole CP group for the sequence mixers (Note [mixer sequence order])."""

    group: dist.ProcessGroup
    size: int
    rank: int
    #: ``[S]`` or ``[B, S]``: which rank-ordered gathered place comes at each place of the row.
    order: torch.Tensor
    #: Tokens of the original row (the gathered rows are longer by the padding).
    length: int

    @property
    def ulysses(self) -> UlyssesGroup:
        """The whole CP group, as the all-to-all of :mod:`lightning_cp.attention.ulysses` takes it."""
        return UlyssesGroup(self.group, self.size, self.rank)

    @functools.cached_property
    def inverse(self) -> torch.Tensor:
        """Where each rank-ordered gathered place sits in the ordered row (``argsort`` of :attr:`order`)."""
        return self.order.argsort(dim=-1)


def _order_of(sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """``argsort`` of the original-row index of every gathered place, padding (``-1``) last."""
    source = torch.cat(list(sources), dim=-1)
    padded = torch.where(source < 0, torch.iinfo(source.dtype).max, source)
    return padded.argsort(dim=-1, stable=True)


def unpacked_exchange(
    group: dist.ProcessGroup, cp_size: int, cp_rank: int, seq_len: int, padded_len: int, load_balance: bool
) -> MixerExchange:
    """The exchange of unpacked rows of ``seq_len`` tokens padded to ``padded_len`` and sharded for ``cp_size``."""
    held = [shard_positions(padded_len, cp_size, rank, load_balance) for rank in range(cp_size)]
    sources = [torch.where(positions < seq_len, positions, -1) for positions in held]
    return MixerExchange(group, cp_size, cp_rank, _order_of(sources), seq_len)


def packed_exchange(group: dist.ProcessGroup, cp_rank: int, layout: PackedLayout) -> MixerExchange:
    """The exchange of packed rows laid out by ``layout`` (documents placed per rank, padded per document)."""
    sources = [layout.sources(rank) for rank in range(layout.cp_size)]
    length = int((layout.source[0] >= 0).sum())
    return MixerExchange(group, layout.cp_size, cp_rank, _order_of(sources), length)


def batch_exchange(
    group: dist.ProcessGroup,
    cp_size: int,
    cp_rank: int,
    *,
    seq_len: int,
    padded_len: int,
    load_balance: bool,
    layout: PackedLayout | None,
) -> MixerExchange:
    """The exchange of one sharded micro-batch: :func:`packed_exchange` for a packed ``layout``, else
    :func:`unpacked_exchange` (the session and the functional API shard batches alike)."""
    if layout is not None:
        return packed_exchange(group, cp_rank, layout)
    return unpacked_exchange(group, cp_size, cp_rank, seq_len, padded_len, load_balance)


def to_whole_row(local: torch.Tensor, exchange: MixerExchange, *, seq_dim: int = 1) -> torch.Tensor:
    """This rank's shard (batch first) → the whole original row on every rank (Note [mixer sequence order]).

    Differentiable: the gradient that reaches the shard is the sum of what every rank's copy received.
    """
    return ordered_from_rank_order(gather_in_rank_order(local, exchange.group, seq_dim), exchange, seq_dim=seq_dim)


def ordered_to_local(whole: torch.Tensor, exchange: MixerExchange, local_len: int, *, seq_dim: int = 1) -> torch.Tensor:
    """The original row (or rows, batch first) → this rank's positions of it, zeros at its padding positions."""
    whole = _with_padding(whole, exchange, seq_dim)
    mine = exchange.inverse.narrow(-1, exchange.rank * local_len, local_len)
    return take_positions(whole, mine, seq_dim)


def ordered_from_rank_order(gathered: torch.Tensor, exchange: MixerExchange, *, seq_dim: int = 1) -> torch.Tensor:
    """A tensor whose sequence arrived in rank order (after an all-to-all) → the original row, padding cut."""
    return take_positions(gathered, exchange.order, seq_dim).narrow(seq_dim, 0, exchange.length)


def rank_order_from_ordered(whole: torch.Tensor, exchange: MixerExchange, *, seq_dim: int = 1) -> torch.Tensor:
    """The original row → the rank-ordered sequence an all-to-all sends back (zeros at padding positions)."""
    return take_positions(_with_padding(whole, exchange, seq_dim), exchange.inverse, seq_dim)


def _with_padding(whole: torch.Tensor, exchange: MixerExchange, seq_dim: int) -> torch.Tensor:
    """The original row followed by zeros at the padding places, as long as the gathered rows."""
    padding = exchange.order.size(-1) - whole.size(seq_dim)
    if not padding:
        return whole
    shape = list(whole.shape)
    shape[seq_dim] = padding
    return torch.cat([whole, whole.new_zeros(shape)], dim=seq_dim)
