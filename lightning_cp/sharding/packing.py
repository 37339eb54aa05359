"""Packed batches under CP: several documents in one row, each attending only within itself.

A row's documents are delimited by ``cu_seqlens`` / ``seq_lens`` (the Transformer Engine and NeMo
convention) or by ``position_ids`` that restart (Hugging Face's padding-free convention: a document
starts wherever the position does not go up by one). For CP every row is laid out anew:

* with load balancing each document is padded to a multiple of ``2 * cp`` and laid out head/tail on
  its own (Note [head/tail layout] in :mod:`lightning_cp.sharding.sequence`) — Transformer Engine's THD
  partitioning, so the causal work stays even document by document;
* with load balancing and ``whole_documents`` (what lightning_cp's own document ring gets), short
  documents stay whole on one rank and only the long ones are split head/tail (Note [whole-document
  placement]);
* without load balancing the row is padded to a multiple of ``cp`` and cut into ``cp`` contiguous pieces.

Padding forms documents of its own, so no real token ever attends to it. :class:`PackedLayout`
records where every rank's tokens sit and which document they belong to: all that the
document-masked ring needs to plan its blocks.

Note [whole-document placement]
-------------------------------
A document that lives on one rank needs no keys from any other rank: no communication, and no
blocks that pair ranks. So the planner keeps documents whole where the work still balances:

1. documents are taken longest first and each goes, whole, to the rank with the fewest attended
   (query, key) pairs so far among the ranks with room for it (room: an even share of the row's
   tokens plus :data:`TOKEN_SLACK`, less the ranks' share of the split documents);
2. a document with no room anywhere is split instead, as is the longest whole document of the
   busiest rank when any rank's pairs (causal or bidirectional) exceed the mean by more than
   :data:`WORK_TOLERANCE`; then step 1 starts again. Every split is head/tail over all ranks (padded
   to ``2 * cp``), which gives each rank the same tokens and pairs of it, so this ends: at worst with
   every document split, Transformer Engine's layout;
3. every rank is filled up to the same number of tokens with padding, a document of its own per rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.sharding.batch import (
    IGNORE_INDEX,
    MIN_SHARD_TOKENS,
    SEQUENCE_KEYS,
    ContextParallelBatchError,
    pad_value_for,
    padded_length,
    primary_input_key,
    validate_cp_batch,
)
from lightning_cp.sharding.sequence import gather_sequence
from lightning_cp.sharding.thd import thd_partitioned_indices

#: Batch keys that delimit the documents of a packed row; they do not go into the model.
PACKING_KEYS: tuple[str, ...] = ("cu_seqlens", "cu_seqlens_padded", "seq_lens", "seq_lens_padded")
#: Entries of ``seq_lens`` / ``cu_seqlens`` rows with this value are padding of the lengths tensor itself.
SEQ_LENS_PADDING_VALUE = -1000
#: Whole-document placement: the most attended pairs one rank may have, as a multiple of the mean.
WORK_TOLERANCE = 1.05
#: Whole-document placement: how far a rank's tokens may exceed an even share (filled with padding).
TOKEN_SLACK = 1 / 32


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether ``batch`` packs several documents per row (by its keys, or by restarting ``position_ids``)."""
    if any(isinstance(batch.get(key), torch.Tensor) for key in PACKING_KEYS):
        return True
    position_ids = batch.get("position_ids")
    return (
        isinstance(position_ids, torch.Tensor)
        and position_ids.ndim == 2
        and position_ids.size(1) > 1
        and bool((position_ids.diff(dim=1) != 1).any())
    )


def _rows(tensor: torch.Tensor, batch_size: int, name: str) -> list[torch.Tensor]:
    if tensor.ndim == 1:
        if batch_size != 1:
            raise ContextParallelBatchError(
                f"A 1-D `{name}` describes one packed row, but the batch has {batch_size} rows: give one row of"
                f" `{name}` per batch row (pad short rows with {SEQ_LENS_PADDING_VALUE})."
            )
        return [tensor]
    if tensor.ndim != 2 or tensor.size(0) != batch_size:
        raise ContextParallelBatchError(
            f"`{name}` must have shape [batch, n] with one row per batch row ({batch_size}); got {tuple(tensor.shape)}."
        )
    return list(tensor)


def _lengths_from_cu_seqlens(row: torch.Tensor, seq_len: int, name: str) -> list[int]:
    values = row[row != SEQ_LENS_PADDING_VALUE].tolist()
    if len(values) < 2 or values[0] != 0:
        raise ContextParallelBatchError(f"`{name}` must start at 0 and hold at least two entries; got {values}.")
    lengths = [end - start for start, end in zip(values[:-1], values[1:], strict=True)]
    if any(length < 0 for length in lengths):
        raise ContextParallelBatchError(f"`{name}` must not decrease; got {values}.")
    if values[-1] != seq_len:
        raise ContextParallelBatchError(
            f"`{name}` ends at {values[-1]} but the packed row holds {seq_len} tokens; the documents must cover"
            " the row exactly."
        )
    return [length for length in lengths if length]


def _lengths_from_seq_lens(row: torch.Tensor, seq_len: int, name: str) -> list[int]:
    lengths = row[row != SEQ_LENS_PADDING_VALUE].tolist()
    if any(length < 0 for length in lengths):
        raise ContextParallelBatchError(f"`{name}` holds a negative length: {lengths}.")
    if sum(lengths) != seq_len:
        raise ContextParallelBatchError(
            f"`{name}` add up to {sum(lengths)} tokens but the packed row holds {seq_len}; the documents must cover"
            " the row exactly."
        )
    return [length for length in lengths if length]


def _lengths_from_position_ids(row: torch.Tensor) -> list[int]:
    starts = [0, *((row.diff() != 1).nonzero().flatten() + 1).tolist(), row.numel()]
    return [end - start for start, end in zip(starts[:-1], starts[1:], strict=True)]


def document_lengths(batch: dict[str, Any]) -> list[list[int]]:
    """The lengths of the documents of every row, in order; they add up to the row length.

    Read from (first found) ``cu_seqlens_padded``, ``cu_seqlens``, ``seq_lens_padded``, ``seq_lens``
    (entries equal to ``-1000`` are skipped), else from where ``position_ids`` restart. Raises
    :class:`ContextParallelBatchError` when they do not delimit the rows consistently.
    """
    primary = batch[primary_input_key(batch)]
    batch_size, seq_len = primary.size(0), primary.size(1)
    for name, parse in (
        ("cu_seqlens_padded", _lengths_from_cu_seqlens),
        ("cu_seqlens", _lengths_from_cu_seqlens),
        ("seq_lens_padded", _lengths_from_seq_lens),
        ("seq_lens", _lengths_from_seq_lens),
    ):
        value = batch.get(name)
        if isinstance(value, torch.Tensor):
            return [parse(row.to("cpu", torch.long), seq_len, name) for row in _rows(value, batch_size, name)]
    position_ids = batch["position_ids"].to("cpu").expand(batch_size, -1)
    return [_lengths_from_position_ids(row) for row in position_ids]


def document_ids(lengths: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """``[batch, seq]`` document number (0, 1, ...) of every token of the original rows."""
    rows = [torch.repeat_interleave(torch.arange(len(row)), torch.tensor(row, dtype=torch.long)) for row in lengths]
    return torch.stack(rows).to(device)


def next_token_labels_within_documents(labels: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """Next-token labels aligned with their positions; a document's last token gets ``-100``.

    The last token of one document must not learn to predict the first token of the next.
    """
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    same_document = torch.cat(
        [documents[:, 1:] == documents[:, :-1], torch.zeros_like(documents[:, :1], dtype=torch.bool)], dim=1
    )
    return shifted.masked_fill(~same_document.expand_as(shifted), IGNORE_INDEX)


@dataclass(frozen=True)
class PackedLayout:
    """Where every CP rank's tokens sit in the padded packed rows, and which document holds them."""

    cp_size: int
    load_balance: bool
    #: Per row, the lengths of its documents (padding not included).
    lengths: tuple[tuple[int, ...], ...]
    #: Length of every row after padding its documents (the same for all rows).
    padded_len: int
    #: ``[batch, padded_len]``: index of each padded position in the original row, ``-1`` for padding.
    source: torch.Tensor
    #: ``[batch, padded_len]``: document of each padded position; padding has documents of its own.
    document: torch.Tensor
    #: ``[cp, batch, padded_len // cp]``: padded positions each rank holds, in the order it stores them.
    shard_index: torch.Tensor
    #: Short documents kept whole on one rank (Note [whole-document placement]), not split head/tail.
    whole_documents: bool = False

    @property
    def num_documents(self) -> int:
        """Documents in all rows together, padding not counted."""
        return sum(len(row) for row in self.lengths)

    def padded_lengths(self) -> list[list[int]]:
        """Per row, the lengths of its documents with their padding (the rows' trailing filler not included)."""
        owners = torch.where(self.document < 0, -self.document - 1, self.document)
        return [
            torch.bincount(owner, minlength=len(row))[: len(row)].tolist()
            for owner, row in zip(owners, self.lengths, strict=True)
        ]

    @property
    def longest_document(self) -> int:
        """The longest document, padding included: no attention span is longer."""
        return max(max(row) for row in self.padded_lengths())

    def positions(self, rank: int) -> torch.Tensor:
        """``[batch, local_len]`` positions in the padded rows of ``rank``'s tokens."""
        return self.shard_index[rank]

    def documents(self, rank: int) -> torch.Tensor:
        """``[batch, local_len]`` document of each of ``rank``'s tokens."""
        return self.document.gather(1, self.shard_index[rank])

    def sources(self, rank: int) -> torch.Tensor:
        """``[batch, local_len]`` original-row index of each of ``rank``'s tokens (``-1`` for padding)."""
        return self.source.gather(1, self.shard_index[rank])


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _pad_documents(lengths: Sequence[Sequence[int]], cp_size: int, load_balance: bool) -> list[list[int]]:
    """Document lengths padded to a multiple of ``2 * cp`` with load balancing (as they are without)."""
    multiple = 2 * cp_size if load_balance else 1
    return [[_ceil_to(length, multiple) for length in row] for row in lengths]


def plan_packed_layout(
    lengths: Sequence[Sequence[int]], cp_size: int, load_balance: bool, *, whole_documents: bool = False
) -> PackedLayout:
    """Lay the documents of every row out for ``cp_size`` ranks (see the module docstring).

    ``whole_documents`` (with ``load_balance``) keeps short documents whole on one rank, which saves the
    document ring communication (Note [whole-document placement]); Transformer Engine's THD partitioning
    needs it off, every document split head/tail.
    """
    if load_balance and whole_documents:
        return _plan_whole_documents(lengths, cp_size)
    padded_lengths = _pad_documents(lengths, cp_size, load_balance)
    longest = max(sum(row) for row in padded_lengths)
    padded_len = padded_length(longest, cp_size, 2 * cp_size if load_balance else cp_size)
    sources, documents, shards = [], [], []
    for row, padded_row in zip(lengths, padded_lengths, strict=True):
        source: list[int] = []
        document: list[int] = []
        spans = list(padded_row)
        start = 0
        for number, (length, padded) in enumerate(zip(row, padded_row, strict=True)):
            source += range(start, start + length)
            source += [-1] * (padded - length)
            # real tokens keep the document number; the padding after them is document -(number + 1)
            document += [number] * length + [-(number + 1)] * (padded - length)
            start += length
        filler = padded_len - sum(padded_row)
        if filler:
            spans.append(filler)
            source += [-1] * filler
            document += [-(len(row) + 1)] * filler
        sources.append(torch.tensor(source, dtype=torch.long))
        documents.append(torch.tensor(document, dtype=torch.long))
        shards.append(_row_shards(spans, padded_len, cp_size, load_balance))
    return PackedLayout(
        cp_size=cp_size,
        load_balance=load_balance,
        lengths=tuple(tuple(row) for row in lengths),
        padded_len=padded_len,
        source=torch.stack(sources),
        document=torch.stack(documents),
        shard_index=torch.stack(shards, dim=1),
    )


def _row_shards(spans: list[int], padded_len: int, cp_size: int, load_balance: bool) -> torch.Tensor:
    if not load_balance:
        return torch.arange(padded_len).view(cp_size, -1)
    cu_seqlens = torch.tensor([0, *spans]).cumsum(0)
    return torch.stack([thd_partitioned_indices(cu_seqlens, cp_size, rank) for rank in range(cp_size)])


def attended_pairs(length: int, is_causal: bool) -> int:
    """(query, key) pairs that attention within one document of ``length`` tokens computes."""
    return length * (length + 1) // 2 if is_causal else length * length


def _split_share(lengths: Sequence[int], split: set[int], cp_size: int) -> tuple[int, dict[bool, float]]:
    """Tokens and attended pairs (causal, bidirectional) every rank gets of the documents split head/tail."""
    padded = [_ceil_to(lengths[doc], 2 * cp_size) for doc in split]
    pairs = {causal: sum(attended_pairs(length, causal) for length in padded) / cp_size for causal in (True, False)}
    return sum(padded) // cp_size, pairs


def _try_whole_placement(lengths: Sequence[int], cp_size: int, split: set[int]) -> tuple[list[int | None], int | None]:
    """Step 1 of Note [whole-document placement]: each document's rank (``None``: split), or a document to split."""
    share_tokens, share_pairs = _split_share(lengths, split, cp_size)
    whole = sorted((doc for doc in range(len(lengths)) if doc not in split), key=lambda doc: (-lengths[doc], doc))
    even_share = (sum(lengths[doc] for doc in whole) + share_tokens * cp_size) / cp_size
    room = math.ceil(even_share * (1 + TOKEN_SLACK)) - share_tokens
    placement: list[int | None] = [None] * len(lengths)
    tokens = [0] * cp_size
    pairs = {causal: [share_pairs[causal]] * cp_size for causal in (True, False)}
    for doc in whole:
        ranks = [rank for rank in range(cp_size) if tokens[rank] + lengths[doc] <= room]
        if not ranks:
            return placement, doc
        rank = min(ranks, key=lambda r: (pairs[True][r], r))
        placement[doc] = rank
        tokens[rank] += lengths[doc]
        for causal in (True, False):
            pairs[causal][rank] += attended_pairs(lengths[doc], causal)
    for per_rank in pairs.values():
        busiest = max(range(cp_size), key=per_rank.__getitem__)
        if per_rank[busiest] > WORK_TOLERANCE * sum(per_rank) / cp_size:
            return placement, next(doc for doc in whole if placement[doc] == busiest)
    return placement, None


def place_whole_documents(lengths: Sequence[int], cp_size: int) -> list[int | None]:
    """The rank that keeps each document of a row whole, ``None`` for one split head/tail over all ranks.

    Note [whole-document placement]: documents are kept whole while the ranks' tokens and attended
    pairs (causal and bidirectional) stay even, and split otherwise.
    """
    split: set[int] = set()
    while True:
        placement, to_split = _try_whole_placement(lengths, cp_size, split)
        if to_split is None:
            return placement
        split.add(to_split)


def _rank_positions(lengths: Sequence[int], placement: list[int | None], cp_size: int) -> list[list[int]]:
    """Padded-row positions each rank holds when the documents are laid out one after another."""
    held: list[list[int]] = [[] for _ in range(cp_size)]
    start = 0
    for length, rank in zip(lengths, placement, strict=True):
        if rank is not None:
            held[rank] += range(start, start + length)
            start += length
            continue
        padded = _ceil_to(length, 2 * cp_size)
        chunk = padded // (2 * cp_size)
        for r in range(cp_size):
            held[r] += range(start + r * chunk, start + (r + 1) * chunk)
            tail = 2 * cp_size - 1 - r
            held[r] += range(start + tail * chunk, start + (tail + 1) * chunk)
        start += padded
    return held


def _plan_whole_documents(lengths: Sequence[Sequence[int]], cp_size: int) -> PackedLayout:
    """:func:`plan_packed_layout` with Note [whole-document placement]."""
    placements = [place_whole_documents(row, cp_size) for row in lengths]
    held = [_rank_positions(row, placement, cp_size) for row, placement in zip(lengths, placements, strict=True)]
    local_len = max(MIN_SHARD_TOKENS, *(len(positions) for row in held for positions in row))
    sources, documents, shards = [], [], []
    for row, placement, row_held in zip(lengths, placements, held, strict=True):
        source: list[int] = []
        document: list[int] = []
        start = 0
        for number, (length, rank) in enumerate(zip(row, placement, strict=True)):
            padding = 0 if rank is not None else _ceil_to(length, 2 * cp_size) - length
            source += [*range(start, start + length), *[-1] * padding]
            document += [number] * length + [-(number + 1)] * padding
            start += length
        for rank, positions in enumerate(row_held):
            filler = local_len - len(positions)
            positions += range(len(source), len(source) + filler)
            source += [-1] * filler
            document += [-(len(row) + 1 + rank)] * filler  # each rank's filler is a document of its own
        sources.append(torch.tensor(source, dtype=torch.long))
        documents.append(torch.tensor(document, dtype=torch.long))
        shards.append(torch.tensor(row_held, dtype=torch.long))
    return PackedLayout(
        cp_size=cp_size,
        load_balance=True,
        lengths=tuple(tuple(row) for row in lengths),
        padded_len=local_len * cp_size,
        source=torch.stack(sources),
        document=torch.stack(documents),
        shard_index=torch.stack(shards, dim=1),
        whole_documents=True,
    )


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor, pad_value: int | bool = 0) -> torch.Tensor:
    """Per row ``b`` (dimension 0), entries ``index[b]`` of ``tensor`` along ``dim``; ``-1`` picks ``pad_value``."""
    pad_shape = list(tensor.shape)
    pad_shape[dim] = 1
    padded = torch.cat([tensor, tensor.new_full(pad_shape, pad_value)], dim=dim)
    index = torch.where(index < 0, tensor.size(dim), index).to(tensor.device)
    rows = [padded[b].index_select(dim - 1, index[b]) for b in range(index.size(0))]
    return torch.stack(rows)


def shard_packed(tensor: torch.Tensor, layout: PackedLayout, cp_rank: int, seq_dim: int = 1) -> torch.Tensor:
    """``cp_rank``'s shard of a ``[batch, ..., seq, ...]`` tensor of packed rows (padding is zeros); differentiable."""
    return _take(tensor, seq_dim, layout.sources(cp_rank))


def gather_packed(local: torch.Tensor, layout: PackedLayout, cp_mesh: DeviceMesh, seq_dim: int = 1) -> torch.Tensor:
    """Every rank's shard of packed rows, put back in the original token order, padding removed.

    The inverse of :func:`shard_packed` (differentiable, like :func:`lightning_cp.sharding.gather_sequence`).
    """
    gathered = gather_sequence(local, cp_mesh, seq_dim, load_balance=False)
    sources = torch.cat([layout.sources(rank) for rank in range(layout.cp_size)], dim=1)
    seq_len = int((sources[0] >= 0).sum())
    order = torch.where(sources < 0, sources.size(1), sources).argsort(dim=1)[:, :seq_len]
    return _take(gathered, seq_dim, order)


def _document_positions(layout: PackedLayout) -> torch.Tensor:
    """Position of every padded token within its document (0, 1, ...), for rows without ``position_ids``."""
    document = layout.document
    starts = torch.cat([torch.ones_like(document[:, :1], dtype=torch.bool), document[:, 1:] != document[:, :-1]], 1)
    index = torch.arange(document.size(1)).expand_as(document)
    start_index = torch.where(starts, index, 0).cummax(dim=1).values
    return index - start_index


def _relayout(batch: dict[str, Any], index: torch.Tensor, padding_token_id: int) -> dict[str, torch.Tensor]:
    """The sequence fields of ``batch`` at the original-row indices ``index`` (``-1``: padding)."""
    batch_size = index.size(0)
    out = {}
    for key in SEQUENCE_KEYS:
        tensor = batch.get(key)
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.ndim == 3 and key == "position_ids":
            raise ContextParallelBatchError("Packed batches with 3-D (mRoPE) `position_ids` are not supported.")
        shape = list(tensor.shape)
        shape[0] = batch_size
        out[key] = _take(tensor.expand(shape), 1, index, pad_value_for(key, padding_token_id))
    return out


def padded_rows(batch: dict[str, Any], layout: PackedLayout, padding_token_id: int = 0) -> dict[str, torch.Tensor]:
    """The sequence fields of ``batch`` with every document padded as ``layout`` says (not sharded)."""
    return _relayout(batch, layout.source, padding_token_id)


def plan_packed_batch(
    batch: dict[str, Any],
    cp_size: int,
    load_balance: bool,
    *,
    require_labels: bool,
    shift_labels: bool = False,
    whole_documents: bool = False,
) -> tuple[dict[str, Any], PackedLayout]:
    """Check a packed ``batch`` and lay its documents out; with ``shift_labels``, shift its labels per document.

    Returns the batch (a new dict when the labels were shifted) and its :class:`PackedLayout`
    (``whole_documents`` as in :func:`plan_packed_layout`).
    """
    validate_cp_batch(batch, require_labels=require_labels)
    lengths = document_lengths(batch)
    labels = batch.get("labels")
    if shift_labels and isinstance(labels, torch.Tensor) and "shift_labels" not in batch:
        batch = {**batch, "labels": next_token_labels_within_documents(labels, document_ids(lengths, labels.device))}
    return batch, plan_packed_layout(lengths, cp_size, load_balance, whole_documents=whole_documents)


def shard_packed_batch(
    batch: dict[str, Any], layout: PackedLayout, cp_rank: int, *, padding_token_id: int = 0
) -> dict[str, Any]:
    """This rank's part of a packed ``batch`` laid out by ``layout``; the input is not modified.

    The packing keys and ``attention_mask`` are dropped (the documents are in ``layout``); missing
    ``position_ids`` restart at 0 in every document. Padding gets ignored labels, ``padding_token_id``
    and a ``True`` padding mask.
    """
    out = {key: value for key, value in batch.items() if key not in PACKING_KEYS and key != "attention_mask"}
    out.update(_relayout(out, layout.sources(cp_rank), padding_token_id))
    if not isinstance(out.get("position_ids"), torch.Tensor):
        device = out[primary_input_key(out)].device
        out["position_ids"] = _document_positions(layout).gather(1, layout.shard_index[cp_rank]).to(device)
    return out
