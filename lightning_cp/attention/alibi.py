"""Hand-written ALiBi attention (Bloom, MPT) under context parallelism: the module's core replaced while CP is on.

Note [hand-written ALiBi]
-------------------------
Bloom's and MPT's attention modules compute attention by hand: ``scale · q·kᵀ`` plus a per-head linear bias
``slope_h · k`` of the key's position, the causal mask, an fp32 softmax and ``p·v``. They call neither SDPA nor
transformers' attention interface, and their model builds the bias from the positions of the tensor it is given
— under CP, a shard. So while CP is on, :func:`prepare_alibi_attention` runs the module's own projections and
then attention with the model's own slopes (read from its modeling module's ALiBi function) over global
positions; softmax ignores a per-row constant, so ``slope_h · (k - q)`` is used (bounded at long context):

* ring: the masked ring with the bias from global positions (Note [windowed ring]);
* Ulysses: the whole sequence for this rank's heads, with *those heads'* slopes;
* hybrid: Ulysses inside the group, the masked ring across groups on the rank's heads.

Outside CP the module runs as it is. Packed documents are refused: without CP these models attend across a
packed row (their bias counts positions in the row), which no per-document mechanism reproduces.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_cp.attention.ledger import record_mechanism_call
from lightning_cp.attention.masked_ring import AttentionVariant, masked_ring_attention
from lightning_cp.attention.switch import active_context_parallel
from lightning_cp.attention.ulysses import back_to_shards, to_whole_sequences
from lightning_cp.validation import ContextParallelInputError

_PREPARED_MARK = "_lightning_cp_alibi"


def _bloom_slopes(module: nn.Module) -> torch.Tensor:
    """Bloom's slopes from its own ``build_alibi_tensor`` (``slope · position`` for positions 0 and 1)."""
    build = sys.modules[type(module).__module__].build_alibi_tensor
    return build(torch.ones(1, 2), module.num_heads, torch.float32)[:, 0, 1]


def _mpt_slopes(module: nn.Module) -> torch.Tensor:
    """MPT's slopes from its own ``build_mpt_alibi_tensor`` (``slope · (j - (len - 1))`` for a length of 2)."""
    build = sys.modules[type(module).__module__].build_mpt_alibi_tensor
    return -build(module.n_heads, 2)[:, 0, 0].float()


def _attend(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, slopes: torch.Tensor
) -> torch.Tensor:
    """``[B, s, H, D]``: causal ALiBi attention of this rank's ``[B, H, s, D]`` shards by the active mechanism."""
    active = active_context_parallel()
    assert active is not None
    if active.documents is not None:
        raise ContextParallelInputError(
            f"`{type(module).__name__}` (hand-written ALiBi attention) got packed documents under context parallelism."
            " Without CP it attends across the whole packed row (its bias counts positions in the row), which"
            " per-document attention would not reproduce. Train it on unpacked rows."
        )
    record_mechanism_call()
    slopes = slopes.to(query.device)
    if active.ulysses is None:  # the ring
        assert active.ring_group is not None
        variant = AttentionVariant(scale, alibi_slopes=slopes)
        return masked_ring_attention(query, key, value, variant, active.ring_group, active.load_balance).transpose(1, 2)
    exchange = active.ulysses
    q, k, v = to_whole_sequences(query, key, value, exchange, f"`{type(module).__name__}`")
    variant = AttentionVariant(scale, alibi_slopes=local_slopes(slopes, exchange.group.rank, exchange.group.size))
    group = active.ring_group if active.mechanism == "hybrid" else None
    out = masked_ring_attention(q, k, v, variant, group, active.load_balance)
    return back_to_shards(out.transpose(1, 2), exchange)


def local_slopes(slopes: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The slopes of the heads Ulysses gives rank ``rank`` of ``size`` (Note [Ulysses]: consecutive heads)."""
    local = slopes.numel() // size
    return slopes.narrow(0, rank * local, local)


def _refuse_cache_and_dropout(module: nn.Module, cache: Any, dropout: float) -> None:
    name = type(module).__name__
    if cache is not None and cache.get_seq_length(module.layer_idx) > 0:
        raise ContextParallelInputError(
            f"`{name}` got a cache holding tokens under context parallelism; run CP training without past keys."
        )
    if dropout and module.training:
        raise ContextParallelInputError(
            f"`{name}` uses attention dropout ({dropout}) under context parallelism; set it to 0."
        )


def _bloom_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    residual: torch.Tensor,
    alibi: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    layer_past: Any = None,
    use_cache: bool = False,
    output_attentions: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``BloomAttention.forward`` under CP (transformers 5.25): its projections, then :func:`_attend`."""
    _refuse_cache_and_dropout(module, layer_past, module.attention_dropout.p)
    if module.pretraining_tp > 1 and module.slow_but_exact:
        raise ContextParallelInputError("Bloom's `slow_but_exact` output projection is not run under CP; unset it.")
    batch, length, _ = hidden_states.shape
    query, key, value = module._reshape(module.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    context = _attend(module, query, key, value, module.inv_norm_factor, _bloom_slopes(module))
    output = module.dense(context.reshape(batch, length, -1))
    dropout_add = sys.modules[type(module).__module__].dropout_add
    return dropout_add(output, residual, module.hidden_dropout, module.training), None


def _mpt_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    position_bias: torch.Tensor | None = None,
    cache: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``MptAttention.forward`` under CP (transformers 5.25): its projections, then :func:`_attend`."""
    _refuse_cache_and_dropout(module, cache, module.attn_dropout_p)
    batch, length = hidden_states.shape[:2]
    mixed = module.Wqkv(hidden_states)
    if module.clip_qkv:
        mixed = mixed.clamp(min=-module.clip_qkv, max=module.clip_qkv)
    query, key, value = (
        t.reshape(batch, length, module.n_heads, module.head_dim).transpose(1, 2) for t in mixed.chunk(3, dim=2)
    )
    if cache is not None:
        key, value = cache.update(key, value, module.layer_idx, kwargs=kwargs)
    context = _attend(module, query, key, value, module.softmax_scale, _mpt_slopes(module))
    return module.out_proj(context.reshape(batch, length, -1)), None


#: The hand-written ALiBi attention classes and their forward under CP.
_FORWARDS: dict[str, Callable[..., tuple[torch.Tensor, None]]] = {
    "BloomAttention": _bloom_forward,
    "MptAttention": _mpt_forward,
}


def is_alibi_attention(module: nn.Module) -> bool:
    """Whether ``module`` is a hand-written ALiBi attention that :func:`prepare_alibi_attention` runs under CP."""
    return type(module).__name__ in _FORWARDS and type(module).__module__.startswith("transformers.models.")


def alibi_heads(module: nn.Module) -> int:
    """The query (= key/value) heads of a hand-written ALiBi attention module."""
    return module.num_heads if hasattr(module, "num_heads") else module.n_heads


def prepare_alibi_attention(module: nn.Module) -> None:
    """Make ``module`` attend through the active CP mechanism while CP is on (Note [hand-written ALiBi]); once."""
    if getattr(module, _PREPARED_MARK, False):
        return
    original = module.forward
    under_cp = _FORWARDS[type(module).__name__]

    @functools.wraps(original)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if active_context_parallel() is None:
            return original(*args, **kwargs)
        return under_cp(module, *args, **kwargs)

    module.forward = forward
    setattr(module, _PREPARED_MARK, True)
