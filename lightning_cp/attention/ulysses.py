"""Ulysses: context parallelism by an all-to-all of attention heads (DeepSpeed-Ulysses).

Note [Ulysses]
--------------
Each of the ``u`` ranks of a Ulysses group holds ``1/u`` of the sequence, for every head.
Attention mixes positions but never heads, so an all-to-all that trades "my positions, all heads" for
"all positions, my heads" lets each rank run ordinary attention over the whole sequence for ``H/u``
heads; a second all-to-all trades the output back. Because the attention itself is the model's own
function on whole sequences, anything it does per head is exact: masks, sliding windows, logit
softcapping, attention sinks, scaling, any kernel. The all-to-all's gradient is the reverse all-to-all.

Heads. Query head ``h`` uses key/value head ``h // (H / H_kv)``. Rank ``j`` receives query heads
``[j·H/u, (j+1)·H/u)``. With ``H_kv ≥ u`` the key/value heads are split the same way (``H_kv`` must be a
multiple of ``u``); with ``H_kv < u`` each key/value head is first repeated ``u / H_kv`` times, so every
rank receives the one head its queries use, and autograd sums the copies' gradients back. Parameters an
attention function reads per head from its module (gpt-oss's sinks) are narrowed to the rank's heads.

Order. The shards arrive in rank order, in whatever layout the batch was sharded (head/tail chunks,
packed documents); sorting the gathered positions (:attr:`UlyssesExchange.order`) puts the whole
sequence in order, and the output goes back through the inverse permutation. So every mechanism
shares one batch layout.

Masks. The mask a model builds under CP describes its own shard and is dropped. It is rebuilt for the
whole sequence from positions alone: causal, the layer's sliding window, and documents (padding is a
document of its own), in the form the model's attention implementation takes:

* ``sdpa`` and ``eager``: a row is attended one document at a time (:data:`Spans`), so memory stays linear
  in the row; a mask exists only where the attention needs one (a window shorter than the document as a
  boolean mask, or eager attention's additive mask, which it adds to its scores);
* ``flash_attention_*``: one document at a time with no mask; the kernel applies causality and the window
  (the layer passes its ``sliding_window``), and the shard's ``position_ids`` / ``cu_seq_lens`` are dropped;
* ``flex_attention``: every document of the rows at once, under a block mask built from the global positions
  (causal, window, same document), so one compiled kernel sees every row whatever its documents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lightning_cp.attention.ledger import inside_hooked_module, record_mechanism_call
from lightning_cp.sharding.sequence import take_positions
from lightning_cp.validation import ContextParallelInputError, refuse_together

#: Flash-attention implementations: the kernel applies causality and the window itself and takes no dense mask.
FLASH_ATTN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")

#: Hugging Face attention implementations whose attention function Ulysses can run on whole sequences.
ULYSSES_ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", *FLASH_ATTN_IMPLEMENTATIONS)

#: Keyword arguments that describe this rank's shard to flash attention (packed rows found from position ids):
#: under Ulysses each call gets one whole document instead.
SHARD_LAYOUT_KWARGS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

#: Per row (or one entry for all rows), the ``(start, end)`` spans of the documents of the ordered sequence.
Spans = tuple[tuple[tuple[int, int], ...], ...]


@dataclass(frozen=True)
class UlyssesGroup:
    """The ranks that trade heads for positions, and this rank's place among them."""

    group: dist.ProcessGroup
    size: int
    rank: int


class _AllToAll(torch.autograd.Function):
    """Split ``tensor`` into ``size`` chunks along ``scatter_dim``, send chunk ``j`` to rank ``j`` and
    concatenate what arrives along ``gather_dim`` in rank order; the backward is the reverse trade."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, tensor: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup
    ) -> torch.Tensor:
        ctx.scatter_dim, ctx.gather_dim, ctx.group = scatter_dim, gather_dim, group
        return _all_to_all(tensor, scatter_dim, gather_dim, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return _all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


def _all_to_all(tensor: torch.Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    send = torch.stack(tensor.chunk(size, dim=scatter_dim)).contiguous()
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def sequence_to_heads(tensor: torch.Tensor, ulysses: UlyssesGroup, *, head_dim: int, seq_dim: int) -> torch.Tensor:
    """This rank's positions of every head → every position of this rank's heads (Note [Ulysses])."""
    return _AllToAll.apply(tensor, head_dim, seq_dim, ulysses.group)


def heads_to_sequence(tensor: torch.Tensor, ulysses: UlyssesGroup, *, head_dim: int, seq_dim: int) -> torch.Tensor:
    """Every position of this rank's heads → this rank's positions of every head (inverse of the above)."""
    return _AllToAll.apply(tensor, seq_dim, head_dim, ulysses.group)


def ulysses_sizes_that_work(query_heads: int, kv_heads: int, limit: int) -> list[int]:
    """Ulysses group sizes up to ``limit`` that split ``query_heads`` and ``kv_heads`` exactly."""
    return [size for size in range(1, limit + 1) if ulysses_head_error(query_heads, kv_heads, size) is None]


def ulysses_head_error(
    query_heads: int, kv_heads: int, size: int, names: tuple[str, str] = ("query heads", "key/value heads")
) -> str | None:
    """Why ``size`` ranks cannot share these heads under Ulysses, or ``None`` when they can.

    ``names`` says what the two head counts are (a gated delta net's value and key heads, a Mamba-2 layer's
    heads and groups: the all-to-all of :mod:`lightning_cp.mixers.heads` shares them by the same rule).
    """
    many, few = names
    if query_heads % kv_heads:
        return f"{query_heads} {many} cannot share {kv_heads} {few} evenly"
    if query_heads % size:
        return f"{query_heads} {many} do not split over {size} ranks"
    if kv_heads % size and size % kv_heads:
        return f"{kv_heads} {few} neither split over {size} ranks nor divide it"
    return None


def check_ulysses_heads(query_heads: int, kv_heads: int, size: int, where: str) -> None:
    """Refuse heads that ``size`` Ulysses ranks cannot share, naming the sizes that would work."""
    error = ulysses_head_error(query_heads, kv_heads, size)
    if error is not None:
        sizes = ulysses_sizes_that_work(query_heads, kv_heads, max(query_heads, size))
        raise ContextParallelInputError(
            f"{where}: {error}, so Ulysses cannot give each rank whole heads. Ulysses sizes that work for"
            f" {query_heads} query / {kv_heads} key/value heads: {sizes}. Use one of them (the hybrid mode"
            " runs the ring over the rest: `cp_mode='hybrid', ulysses_size=...`), or `cp_mode='ring'`."
        )


def _spread_kv_heads(tensor: torch.Tensor, size: int, head_dim: int) -> torch.Tensor:
    """Repeat key/value heads so that ``size`` ranks each receive the ones their query heads use."""
    heads = tensor.size(head_dim)
    return tensor if heads % size == 0 else tensor.repeat_interleave(size // heads, dim=head_dim)


class _LocalHeadsView:
    """An attention module as its attention function must see it on a rank holding ``H/u`` heads."""

    def __init__(self, module: nn.Module, ulysses: UlyssesGroup, query_heads: int, local_groups: int) -> None:
        self._module = module
        self.num_key_value_groups = local_groups
        local = query_heads // ulysses.size
        for name, parameter in module.named_parameters(recurse=False):
            if parameter.ndim >= 1 and parameter.size(0) == query_heads:  # per-head, e.g. gpt-oss's sinks
                setattr(self, name, parameter.narrow(0, ulysses.rank * local, local))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _local_head_kwargs(kwargs: dict[str, Any], ulysses: UlyssesGroup, query_heads: int) -> dict[str, Any]:
    """``kwargs`` with per-head tensors (gpt-oss passes its sinks as ``s_aux``) narrowed to this rank's heads."""
    local = query_heads // ulysses.size
    return {
        name: value.narrow(0, ulysses.rank * local, local)
        if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.size(0) == query_heads
        else value
        for name, value in kwargs.items()
    }


def span_mask(
    length: int, *, causal: bool, window: int | None, additive_dtype: torch.dtype | None, device: torch.device
) -> torch.Tensor | None:
    """The ``[1, 1, length, length]`` mask of one document, or ``None`` where plain attention needs none.

    Key ``k`` is visible to query ``q`` when ``k ≤ q`` (causal) and ``q - k < window`` (Hugging Face's
    sliding window). ``additive_dtype`` asks for the additive form eager attention adds to its scores
    (0 or the dtype's minimum; always given when causal, since eager attention masks nothing by itself);
    otherwise a boolean mask, or ``None`` when ``is_causal`` alone says it all.
    """
    windowed = window is not None and window < length
    if not windowed and (additive_dtype is None or not causal):
        return None
    query = torch.arange(length, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = torch.ones(length, length, dtype=torch.bool, device=device)
    if causal:
        allowed &= key <= query
    if windowed:
        allowed &= (query - key).abs() < window
    allowed = allowed.view(1, 1, length, length)
    if additive_dtype is None:
        return allowed
    return torch.zeros((), dtype=additive_dtype, device=device).masked_fill(~allowed, torch.finfo(additive_dtype).min)


def _row_groups(spans: Spans | None, batch_size: int, seq_len: int) -> list[tuple[slice, tuple[tuple[int, int], ...]]]:
    """Rows that share their document spans, as (row slice, spans) pairs: one pair when all rows agree.

    ``spans`` has one entry per row, or a single entry for every row (``None``: the whole sequence).
    """
    if spans is None:
        return [(slice(0, batch_size), ((0, seq_len),))]
    if len(spans) not in (1, batch_size):
        raise ValueError(f"Ulysses got document spans for {len(spans)} rows, but the batch has {batch_size}.")
    if all(row == spans[0] for row in spans):
        return [(slice(0, batch_size), spans[0])]
    return [(slice(row, row + 1), row_spans) for row, row_spans in enumerate(spans)]


_inside_heads_sharded = False


@contextmanager
def _heads_sharded() -> Iterator[None]:
    """While open, SDPA calls come from a function already running on whole sequences: leave them alone."""
    global _inside_heads_sharded
    outer, _inside_heads_sharded = _inside_heads_sharded, True
    try:
        yield
    finally:
        _inside_heads_sharded = outer


def to_whole_sequences(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, exchange: UlyssesExchange, where: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``[B, H, s, D]`` shards → ``[B, H/u, S, D]`` whole sequences in sequence order (Note [Ulysses])."""
    check_ulysses_heads(query.size(1), key.size(1), exchange.group.size, where)
    key, value = (_spread_kv_heads(t, exchange.group.size, head_dim=1) for t in (key, value))
    traded = [sequence_to_heads(t, exchange.group, head_dim=1, seq_dim=2) for t in (query, key, value)]
    if exchange.order is not None:
        traded = [take_positions(t, exchange.order, seq_dim=2) for t in traded]
    return traded[0], traded[1], traded[2]


def back_to_shards(out: torch.Tensor, exchange: UlyssesExchange) -> torch.Tensor:
    """``[B, S, H/u, D]`` in sequence order → this rank's ``[B, s, H, D]`` shard."""
    if exchange.order is not None:
        out = take_positions(out, exchange.order.argsort(dim=-1), seq_dim=1)
    return heads_to_sequence(out, exchange.group, head_dim=2, seq_dim=1)


@dataclass(frozen=True)
class UlyssesExchange:
    """One micro-batch's Ulysses trade: the group, and how what it gathers lines up with the sequence."""

    group: UlyssesGroup
    #: ``[S]`` or ``[B, S]``: which gathered position comes at each place of the sequence (``argsort`` of
    #: the gathered positions), ``None`` when they arrive in order (contiguous shards).
    order: torch.Tensor | None = None
    #: The documents of every row of the ordered sequence (``None``: one sequence per row).
    spans: Spans | None = None


def run_attention_function(
    original: Callable[..., tuple[torch.Tensor, Any]],
    implementation: str,
    exchange: UlyssesExchange,
    window: int | None,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Run the model's attention function ``original`` by Ulysses (Note [Ulysses]).

    Takes what a Hugging Face attention function takes, without the model's mask (it describes a shard;
    the whole sequence's is rebuilt from ``exchange`` and the layer's sliding ``window``): ``module``,
    ``[B, H, s, D]`` shards and keyword arguments. Returns ``([B, s, H, D], None)``: attention weights do
    not exist per shard.
    """
    q, k, v = to_whole_sequences(query, key, value, exchange, f"`{type(module).__name__}`")
    view = _LocalHeadsView(module, exchange.group, query.size(1), q.size(1) // k.size(1))
    kwargs = _local_head_kwargs(kwargs, exchange.group, query.size(1))
    requested = kwargs.pop("is_causal", None)
    causal = bool(getattr(module, "is_causal", True)) if requested is None else bool(requested)

    def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, mask: Any) -> torch.Tensor:
        with _heads_sharded():
            out, _ = original(view, qs, ks, vs, mask, is_causal=causal, **kwargs)
        return out  # [B, S, H/u, D]

    # The mask in the form each implementation takes (Note [Ulysses], Masks).
    match implementation:
        case "sdpa":
            out = _attend_spans(attend, q, k, v, exchange.spans, causal, window, None)
        case "eager":
            out = _attend_spans(attend, q, k, v, exchange.spans, causal, window, q.dtype)
        case "flex_attention":
            out = attend(q, k, v, _flex_block_mask(exchange.spans, q.size(0), q.size(2), causal, window, q.device))
        case _ if implementation in FLASH_ATTN_IMPLEMENTATIONS:
            kwargs = {name: value for name, value in kwargs.items() if name not in SHARD_LAYOUT_KWARGS}
            out = _attend_spans(attend, q, k, v, exchange.spans, causal, None, None)
        case _:
            raise ContextParallelInputError(
                f"`{type(module).__name__}` attends with attn_implementation={implementation!r}; Ulysses runs"
                f" {ULYSSES_ATTN_IMPLEMENTATIONS} attention. Build the model with `attn_implementation='sdpa'`."
            )
    record_mechanism_call()
    return back_to_shards(out, exchange), None


def _document_ids(spans: Spans | None, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    """``[B, S]``: the index of the document each position of the ordered rows belongs to."""
    ids = []
    for row_slice, row_spans in _row_groups(spans, batch_size, seq_len):
        lengths = torch.tensor([end - start for start, end in row_spans], device=device)
        row = torch.repeat_interleave(torch.arange(len(row_spans), device=device), lengths)
        ids.append(row.expand(row_slice.stop - row_slice.start, seq_len))
    return torch.cat(ids)


def _flex_block_mask(
    spans: Spans | None, batch_size: int, seq_len: int, causal: bool, window: int | None, device: torch.device
) -> Any:
    """The ``BlockMask`` of the whole ordered rows: same document, causal, and the sliding window."""
    from torch.nn.attention.flex_attention import create_block_mask

    documents = _document_ids(spans, batch_size, seq_len, device)

    def visible(batch: torch.Tensor, head: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        allowed = documents[batch, query] == documents[batch, key]
        if causal:
            allowed = allowed & (key <= query)
        if window is not None:
            allowed = allowed & ((query - key).abs() < window)
        return allowed

    # Compiled, as transformers builds its own: uncompiled, the mask is evaluated as a dense S × S grid first.
    return create_block_mask(visible, batch_size, None, seq_len, seq_len, device=device, _compile=True)


def _attend_spans(
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spans: Spans | None,
    causal: bool,
    window: int | None,
    additive: torch.dtype | None,
) -> torch.Tensor:
    """Per document, ``attend`` on ``[B, H, S, D]`` inputs whose outputs come back ``[B, S, H, D]``."""
    rows = []
    for row_slice, row_spans in _row_groups(spans, q.size(0), q.size(2)):
        pieces = [
            attend(
                q[row_slice, :, start:end],
                k[row_slice, :, start:end],
                v[row_slice, :, start:end],
                span_mask(end - start, causal=causal, window=window, additive_dtype=additive, device=q.device),
            )
            for start, end in row_spans
        ]
        rows.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)


def _refuse_mask(attn_mask: torch.Tensor | None, group: UlyssesGroup) -> None:
    """Refuse an explicit mask given to SDPA (it describes one shard), agreed by all ranks when unhooked."""
    reason = None
    if attn_mask is not None:
        reason = (
            "`F.scaled_dot_product_attention` got an explicit `attn_mask` under Ulysses context parallelism."
            " A mask built by the model describes one rank's shard, not the sequence. Attach the hooks"
            " (`attach_context_parallel_hooks(model)`; the strategies do it) so attention modules drop it."
        )
    if inside_hooked_module():
        if reason is not None:
            raise ContextParallelInputError(reason)
    else:  # a model without hooks may build a mask on some shards only (see refuse_together)
        refuse_together(reason, group.group)


def ulysses_sdpa(inner: Callable[..., torch.Tensor], exchange: UlyssesExchange) -> Callable[..., torch.Tensor]:
    """An ``F.scaled_dot_product_attention`` replacement that runs ``inner`` by Ulysses on whole sequences.

    For attention that calls SDPA itself (not through Hugging Face's attention interface): masks are
    not taken (the hooks drop the model's, which describe a shard), and key/value given with one head for
    several query heads (multi-query attention relying on broadcasting, as Falcon's) are spread like
    grouped-query heads. Calls made from inside :func:`run_attention_function` go straight to ``inner``.
    """

    def ulysses_scaled_dot_product_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if _inside_heads_sharded:
            return inner(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        _refuse_mask(attn_mask, exchange.group)
        q, k, v = to_whole_sequences(query, key, value, exchange, "`F.scaled_dot_product_attention`")
        gqa = q.size(1) != k.size(1)

        def attend(qs: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            with _heads_sharded():
                out = inner(qs, ks, vs, None, dropout_p, is_causal, scale=scale, enable_gqa=gqa)
            return out.transpose(1, 2)

        out = _attend_spans(attend, q, k, v, exchange.spans, False, None, None)
        record_mechanism_call()
        return back_to_shards(out, exchange).transpose(1, 2)

    return ulysses_scaled_dot_product_attention
