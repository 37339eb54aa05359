"""The ``"state_passing"`` mechanism: linear recurrences stitched across the CP group by their states.

Note [state passing]
--------------------
A gated delta rule and Mamba-2's SSD scan are affine in the state they start from: over a stretch of
positions, per batch row and head, ``S_out = A·S_in + B`` and every output is ``o = o⁰ + P·S_in``, where
``B`` and ``o⁰`` are what the stretch computes from a zero state. So each rank runs its own positions
only, and the CP group passes states instead of sequences:

1. Segments. A rank's shard is cut where its positions stop being consecutive in the original row
   (Note [mixer sequence order] in :mod:`lightning_cp.mixers.exchange`): head/tail rows give two
   segments per rank, packed rows one per piece of a document, padding belongs to none. The cut is
   read from the exchange, which knows every rank's positions, so every rank knows every segment.
   A rank's segments run side by side as rows of one call; a shorter segment is filled at its end
   with identity steps (a gated delta step with ``β = 0`` and ``g = 0``; a Mamba-2 step with
   ``dt = 0`` in the state's algebra), whose outputs are dropped.
2. The pair ``(A, B)`` of every segment. Gated delta net: the model's own function runs once with
   the values widened by ``d_k`` zero columns and the initial state ``[0 | I]``: both the output and
   the final state are linear in (values, initial state) jointly, so the first ``d_v`` columns are
   the zero-state run (``o⁰``, ``B``) and the last ``d_k`` are ``P`` and ``A`` (``d_k × d_k``).
   That costs a scan ``(d_v + d_k) / d_v`` as wide and is exact for any kernel that takes an
   initial state; composing the per-chunk transitions would need the kernel's internals.
   Mamba-2: ``A`` is a scalar per head, ``exp(Σ dt·a)``, so the model's function runs once from a
   zero state (``o⁰``) and ``B = Σ_t exp(Σ_{u>t} dt_u·a) dt_t x_t B_tᵀ`` and ``P`` are computed here
   from the same discretised ``dt`` (``softplus(dt + dt_bias)`` clamped to ``time_step_limit``).
3. The scan. An all-gather (autograd-aware: its backward sums every rank's gradient into the owner's
   pair) gives every rank every segment's pair; each rank runs the recurrence over the segments in
   the original row's order (:func:`scan_order`: per row, by their first position, not by rank) from
   a zero state, and keeps the incoming states of its own segments. Then ``o = o⁰ + P·S_in``.
   The backward of these torch ops carries the state's gradient back along the row to the ranks
   that produced it.
4. The causal convolution before the recurrence needs the ``kernel − 1`` inputs before each segment
   (zeros at the start of the row). Every rank all-gathers the last ``kernel − 1`` inputs of each of
   its segments; the places before a segment always lie in those windows of earlier segments
   (:func:`conv_halo`), and the model's own convolution runs on ``halo + segment``.

Bytes per rank and layer do not grow with the sequence: the pairs of the rank's segments (forward,
and their gradients in the backward), ``heads · d_k · (d_k + d_v)`` (gated delta net) or
``heads · (1 + d_head · d_state)`` (Mamba-2) numbers per row and segment, and the halos.

Packed documents: the state is carried across document boundaries, because the model's own torch
functions carry it (they take no ``cu_seqlens`` / ``seq_idx`` from ``position_ids``): state passing
computes what the plain model computes on the packed row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cp.mixers import switch
from lightning_cp.mixers.exchange import MixerExchange
from lightning_cp.sharding.sequence import gather_in_rank_order, take_positions
from lightning_cp.validation import ContextParallelInputError


@dataclass
class Segments:
    """Every rank's runs of consecutive original positions (Note [state passing], step 1).

    Rows: ``R`` is 1 when every row is laid out alike (unpacked rows), else the batch size.
    """

    #: Segments per rank and row (the most any rank has in any row; missing ones are empty).
    count: int
    #: Longest segment of this rank.
    longest: int
    #: ``[R, count * longest]``: the local place of each place of this rank's segments, laid side by side.
    take: torch.Tensor
    #: ``[R, count, longest]``: which of those places hold a position (the rest are identity steps).
    filled: torch.Tensor
    #: ``[R, local_len]``: where each local place sits in ``take``; ``kept`` says which places are positions.
    back: torch.Tensor
    kept: torch.Tensor
    #: ``[cp, R, count]``: first original position of every rank's segments and one past their last (0, 0 if empty).
    starts: torch.Tensor
    ends: torch.Tensor
    #: ``[cp, R, count]``: local place of every rank's segments' ends.
    end_places: torch.Tensor
    #: :func:`conv_halo`'s index for this rank, by kernel width minus one.
    halos: dict[int, torch.Tensor] = field(default_factory=dict)


def _sources(exchange: MixerExchange, local_len: int, rank: int) -> torch.Tensor:
    """``[R, local_len]``: the original position of each of ``rank``'s local places, ``-1`` for padding."""
    inverse = exchange.inverse if exchange.inverse.ndim == 2 else exchange.inverse[None]
    held = inverse.narrow(-1, rank * local_len, local_len)
    return torch.where(held < exchange.length, held, -1)


#: The segments of the latest exchanges (by identity): every mixer layer of a micro-batch reads the same.
_recent: list[tuple[MixerExchange, int, Segments]] = []


def segments_of(exchange: MixerExchange, local_len: int) -> Segments:
    """The :class:`Segments` of the micro-batch ``exchange`` describes (the same on every rank)."""
    for seen, length, segments in _recent:
        if seen is exchange and length == local_len:
            return segments
    segments = _segments(exchange, local_len)
    _recent[:] = [*_recent[-3:], (exchange, local_len, segments)]
    return segments


def _segments(exchange: MixerExchange, local_len: int) -> Segments:
    """Read every rank's segments off the exchange's order (Note [mixer sequence order])."""
    sources = [_sources(exchange, local_len, rank) for rank in range(exchange.size)]
    per_rank = [(_segment_starts(source), source) for source in sources]
    count = max(max(int(flags.sum(-1).max()), 1) for flags, _ in per_rank)
    shape = (exchange.size, per_rank[0][0].size(0), count)
    starts, ends, end_places = (torch.zeros(shape, dtype=torch.long) for _ in range(3))
    for rank, (flags, source) in enumerate(per_rank):
        ids = flags.cumsum(-1) - 1
        for row in range(source.size(0)):
            places = torch.nonzero(source[row] >= 0).flatten()
            segment = ids[row, places]
            starts[rank, row].scatter_reduce_(0, segment, source[row, places], "amin", include_self=False)
            ends[rank, row].scatter_reduce_(0, segment, source[row, places] + 1, "amax", include_self=False)
            end_places[rank, row].scatter_reduce_(0, segment, places + 1, "amax", include_self=False)
    flags, source = per_rank[exchange.rank]
    lengths = ends[exchange.rank] - starts[exchange.rank]
    longest = max(int(lengths.max()), 1)
    first = end_places[exchange.rank] - lengths
    step = torch.arange(longest)
    filled = step < lengths[..., None]
    take = torch.where(filled, first[..., None] + step, 0).flatten(1)
    ids = (flags.cumsum(-1) - 1).clamp(min=0)
    position = torch.arange(local_len) - first.gather(1, ids)
    kept = source >= 0
    back = torch.where(kept, ids * longest + position, 0)
    return Segments(count, longest, take, filled, back, kept, starts, ends, end_places)


def _segment_starts(source: torch.Tensor) -> torch.Tensor:
    """Flags of the places that start a segment: a position that does not follow the one before it."""
    valid = source >= 0
    follows = torch.zeros_like(valid)
    follows[:, 1:] = valid[:, :-1] & (source[:, 1:] == source[:, :-1] + 1)
    return valid & ~follows


def _rows(index: torch.Tensor) -> torch.Tensor:
    """A per-row index as :func:`take_positions` takes it: ``[S]`` when every row is alike."""
    return index[0] if index.size(0) == 1 else index


def to_segments(tensor: torch.Tensor, segments: Segments, seq_dim: int = 1) -> torch.Tensor:
    """``[B, local_len, ...]`` (sequence at ``seq_dim``) → ``[B·count, longest, ...]``, one segment per row."""
    laid = take_positions(tensor, _rows(segments.take), seq_dim)
    shape = list(laid.shape)
    shape[seq_dim : seq_dim + 1] = [segments.count, segments.longest]
    return laid.reshape(shape).movedim(seq_dim, 1).flatten(0, 1)


def from_segments(tensor: torch.Tensor, segments: Segments, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`to_segments`: back to this rank's places, zeros at its padding places."""
    batch = tensor.size(0) // segments.count
    laid = tensor.unflatten(0, (batch, segments.count)).movedim(1, seq_dim).flatten(seq_dim, seq_dim + 1)
    local = take_positions(laid, _rows(segments.back), seq_dim)
    shape = [1] * local.ndim
    shape[0], shape[seq_dim] = segments.kept.size(0), segments.kept.size(1)
    return local * segments.kept.reshape(shape).to(device=local.device, dtype=local.dtype)


def _filled(segments: Segments, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[B·count, longest]``: 1 where a segment holds a position, 0 at its identity steps."""
    return segments.filled.expand(batch, -1, -1).flatten(0, 1).to(device=device, dtype=dtype)


def scan_order(segments: Segments) -> list[list[tuple[int, int]]]:
    """Per row, the (rank, segment) pairs in the order the recurrence meets them: by first position."""
    orders = []
    for row in range(segments.starts.size(1)):
        starts, ends = segments.starts[:, row], segments.ends[:, row]
        present = [(int(starts[r, j]), r, j) for r in range(starts.size(0)) for j in range(segments.count)]
        orders.append([(r, j) for start, r, j in sorted(present) if ends[r, j] > start])
    return orders


def incoming_states(
    transitions: torch.Tensor,
    offsets: torch.Tensor,
    segments: Segments,
    carry: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    rank: int,
) -> torch.Tensor:
    """The state each of ``rank``'s segments starts from (Note [state passing], step 3).

    ``transitions`` and ``offsets``: ``[cp, B, count, ...]``, every segment's ``A`` and ``B``;
    ``carry(A, S)`` applies a transition. Returns ``[B, count, ...]`` like ``offsets[rank]``.
    """
    batch = offsets.size(1)
    rows = []
    for row, order in enumerate(scan_order(segments)):
        take = slice(None) if segments.starts.size(1) == 1 else slice(row, row + 1)
        state = torch.zeros_like(offsets[0, take, 0])
        mine: dict[int, torch.Tensor] = {}
        for r, j in order:
            if r == rank:
                mine[j] = state
            state = carry(transitions[r, take, j], state) + offsets[r, take, j]
        zero = torch.zeros_like(state)
        rows.append(torch.stack([mine.get(j, zero) for j in range(segments.count)], dim=1))
    states = torch.cat(rows) if len(rows) > 1 else rows[0]
    return states.expand(batch, *states.shape[1:])


def _pass_states(
    transitions: torch.Tensor,
    offsets: torch.Tensor,
    segments: Segments,
    exchange: MixerExchange,
    carry: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """All-gather every segment's pair (``[B·count, ...]`` here) and scan them: this rank's incoming states."""
    batch = offsets.size(0) // segments.count
    pairs = torch.cat([transitions.flatten(1), offsets.flatten(1)], dim=1).unflatten(0, (batch, segments.count))
    gathered = gather_in_rank_order(pairs[None], exchange.group, seq_dim=0)
    split = transitions[0].numel()
    all_transitions = gathered[..., :split].reshape(*gathered.shape[:3], *transitions.shape[1:])
    all_offsets = gathered[..., split:].reshape(*gathered.shape[:3], *offsets.shape[1:])
    states = incoming_states(all_transitions, all_offsets, segments, carry, exchange.rank)
    return states.flatten(0, 1)


def _exchange() -> MixerExchange:
    exchange = switch.active_mixer_exchange()
    assert exchange is not None
    return exchange


def _refuse_state(what: str, state: Any) -> None:
    if state is not None:
        raise ContextParallelInputError(
            f"{what} got a cache or an initial state under context parallelism (mixer_mode='state_passing'); CP"
            " trains and evaluates whole sequences and computes every incoming state itself. Generate outside"
            " the CP context, where the cache works as usual."
        )


def conv_halo(windows: torch.Tensor, segments: Segments, width: int, rank: int) -> torch.Tensor:
    """The ``width`` inputs before each of ``rank``'s segments, from every segment's last ``width`` inputs.

    ``windows``: ``[B, C, cp · count · width]``, every rank's windows in rank order. Returns
    ``[B, C, count · width]``, zeros before the start of the row (Note [state passing], step 4).
    """
    if width not in segments.halos:
        segments.halos[width] = _halo_index(segments, width, rank).to(windows.device)
    index = segments.halos[width]
    taken = take_positions(windows, _rows(index.clamp(min=0)), seq_dim=2)
    return taken * (index >= 0)[:, None].to(windows.dtype)


def _halo_index(segments: Segments, width: int, rank: int) -> torch.Tensor:
    """``[R, count · width]``: the window place holding each place before ``rank``'s segments, ``-1`` for none."""
    count = segments.count
    index = torch.full((segments.starts.size(1), count * width), -1, dtype=torch.long)
    for row in range(segments.starts.size(1)):
        starts, ends = segments.starts[:, row], segments.ends[:, row]
        for j in range(count):
            if ends[rank, j] <= starts[rank, j]:
                continue
            for d in range(width):
                place = int(starts[rank, j]) - width + d
                holder = ((starts <= place) & (place < ends)).nonzero()
                if place >= 0 and len(holder):
                    r, k = holder[0].tolist()
                    index[row, j * width + d] = (r * count + k) * width + place - (int(ends[r, k]) - width)
    return index


def causal_conv_by_state_passing(
    original: Callable[..., Any],
    conv1d: nn.Module,
    hidden_states: torch.Tensor,
    cache: Any = None,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """``causal_conv1d_forward`` on this rank's segments, each after its halo (Note [state passing], step 4)."""
    _refuse_state("`causal_conv1d_forward`", cache)
    exchange = _exchange()
    segments = segments_of(exchange, hidden_states.size(2))
    width = conv1d.kernel_size[0] - 1
    step = torch.arange(-width, 0)
    window = (segments.end_places[exchange.rank][..., None] + step).clamp(min=0).flatten(1)
    tails = take_positions(hidden_states, _rows(window), seq_dim=2)
    windows = gather_in_rank_order(tails, exchange.group, seq_dim=2)
    halo = conv_halo(windows, segments, width, exchange.rank)
    halo = halo.unflatten(2, (segments.count, width)).movedim(2, 1).flatten(0, 1)
    inputs = torch.cat([halo, to_segments(hidden_states, segments, seq_dim=2)], dim=2)
    out = original(conv1d, inputs, None, *args, **kwargs).narrow(2, width, segments.longest)
    switch.record("conv")
    return from_segments(out, segments, seq_dim=2)


def gated_delta_rule_by_state_passing(
    original: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``torch_chunk_gated_delta_rule`` (or its kernel) on this rank's segments, their states passed along the
    row (Note [state passing], steps 2 and 3)."""
    _refuse_state("The gated delta rule", kwargs.pop("initial_state", None))
    if kwargs.pop("cu_seqlens", None) is not None:
        raise ContextParallelInputError(
            "The gated delta rule got `cu_seqlens` under context parallelism; they describe the whole batch, not"
            " a shard. Pass packed documents as `position_ids` that restart per document, and lightning_cp lays"
            " them out."
        )
    exchange = _exchange()
    segments = segments_of(exchange, query.size(1))
    q, k, v, decay, rate = (to_segments(t, segments) for t in (query, key, value, g, beta))
    filled = _filled(segments, query.size(0), decay.dtype, decay.device)[..., None]
    decay, rate = decay * filled, rate * filled  # identity steps: no decay, no update
    rows, heads, d_k, d_v = v.size(0), v.size(2), k.size(-1), v.size(-1)
    widened = torch.cat([v, v.new_zeros(*v.shape[:-1], d_k)], dim=-1)
    start = torch.cat([v.new_zeros(d_k, d_v), torch.eye(d_k, dtype=v.dtype, device=v.device)], dim=-1)
    kwargs.update(initial_state=start.expand(rows, heads, d_k, d_v + d_k), output_final_state=True)
    out, final = original(q, k, widened, *args, g=decay, beta=rate, **kwargs)
    state_in = _pass_states(final[..., d_v:], final[..., :d_v], segments, exchange, torch.matmul)
    out = out[..., :d_v] + torch.einsum("xlhk,xhkv->xlhv", out[..., d_v:], state_in.to(out.dtype))
    switch.record("scan")
    return from_segments(out, segments), None


def mamba2_scan_by_state_passing(
    original: Callable[..., Any],
    module: nn.Module,
    hidden_states: torch.Tensor,
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    dt: torch.Tensor,
    cache: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """``mamba2_scan_forward`` on this rank's segments from a zero state, plus what the incoming states add
    (Note [state passing], steps 2 and 3)."""
    _refuse_state("The Mamba-2 scan", cache)
    exchange = _exchange()
    segments = segments_of(exchange, hidden_states.size(1))
    x, b, c, step = (to_segments(t, segments) for t in (hidden_states, B, C, dt))
    out = original(module, x, b, c, step, None, **kwargs)
    heads, groups = module.num_heads, module.n_groups
    filled = _filled(segments, hidden_states.size(0), torch.float32, x.device)[..., None]
    step = F.softplus(step.float() + module.dt_bias.float()).clamp(*module.time_step_limit) * filled
    log_decay = (step * -torch.exp(module.A_log.float())).cumsum(dim=1)  # [rows, longest, heads]
    x = x.float().unflatten(-1, (heads, -1))
    b, c = (t.float().unflatten(-1, (groups, -1)).repeat_interleave(heads // groups, dim=2) for t in (b, c))
    weight = torch.exp(log_decay[:, -1:] - log_decay) * step
    offsets = torch.einsum("xlh,xlhp,xlhn->xhpn", weight, x, b)
    state_in = _pass_states(
        torch.exp(log_decay[:, -1]), offsets, segments, exchange, lambda a, s: a[..., None, None] * s
    )
    added = torch.einsum("xlhn,xhpn->xlhp", c, state_in) * torch.exp(log_decay)[..., None]
    switch.record("scan")
    return from_segments(out + added.flatten(2).to(out.dtype), segments)


#: Mixer functions state passing runs, by name (the rest of a mixer is per position).
STATE_PASSING_ROUTES: dict[str, Callable[..., Any]] = {
    "causal_conv1d_forward": causal_conv_by_state_passing,
    "torch_chunk_gated_delta_rule": gated_delta_rule_by_state_passing,
    "mamba2_scan_forward": mamba2_scan_by_state_passing,
}
