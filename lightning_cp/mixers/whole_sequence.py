"""The ``"gather"`` mechanism: a sequence mixer run whole, on the whole row, by every rank of the CP group.

Every rank gathers the mixer's input rows (Note [mixer sequence order]), runs the model's own module on
them exactly as the plain model would, and keeps its own positions of the output. Exact for any module
that maps a row to a row (any scan, recurrence, convolution or kernel, in either direction), and the
fallback for mixers the head all-to-all cannot split. The price: that layer's activations and compute
are those of the whole sequence on every rank, and its input moves ``(cp - 1) / cp`` of the row to each
rank (its gradient comes back by an all-reduce). Parameter gradients are this rank's share (from its
own output positions); the strategies' gradient reduction sums them over the CP group as it does for
every replicated parameter.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_cp.mixers import switch
from lightning_cp.mixers.exchange import ordered_to_local, to_whole_row
from lightning_cp.validation import ContextParallelInputError

#: Keyword arguments that carry one entry per token (``[B, s]`` or ``[s]``): gathered with the input.
PER_TOKEN_KWARGS = ("position_ids", "cache_position", "attention_mask", "seq_idx")
_INPUT_NAMES = ("hidden_states", "input_states", "hidden_state", "x")
#: Local lengths of the mixers running whole, innermost last (the output goes back to this many positions).
_local_lengths: list[int] = []


def _gather_per_token(value: Any, local_len: int, exchange: Any) -> Any:
    if not isinstance(value, torch.Tensor) or value.ndim == 0 or value.size(-1) != local_len or value.ndim > 2:
        return value
    if value.ndim == 1:
        return to_whole_row(value[None], exchange)[0]
    return to_whole_row(value, exchange)


def whole_sequence_pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Before a ``"gather"`` mixer runs under CP: its inputs become whole rows (see the module docstring)."""
    exchange = switch.active_mixer_exchange()
    if exchange is None:
        return None
    if args:
        hidden, args = args[0], args[1:]
        local_len = hidden.size(1)
        args = (to_whole_row(hidden, exchange), *args)
    else:
        key = next(key for key in _INPUT_NAMES if key in kwargs)
        local_len = kwargs[key].size(1)
        kwargs[key] = to_whole_row(kwargs[key], exchange)
    for key in PER_TOKEN_KWARGS:
        if key in kwargs:
            kwargs[key] = _gather_per_token(kwargs[key], local_len, exchange)
    _local_lengths.append(local_len)
    switch.record("whole")
    return args, kwargs


def whole_sequence_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    """After a ``"gather"`` mixer ran under CP: each rank keeps its own positions of the output."""
    exchange = switch.active_mixer_exchange()
    if exchange is None:
        return None
    local_len = _local_lengths.pop()
    if isinstance(output, torch.Tensor):
        return ordered_to_local(output, exchange, local_len)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (ordered_to_local(output[0], exchange, local_len), *output[1:])
    raise ContextParallelInputError(
        f"Sequence mixer `{type(module).__name__}` returned {type(output).__name__}; context parallelism runs"
        " mixers that return the hidden states (a tensor, or a tuple starting with one)."
    )
