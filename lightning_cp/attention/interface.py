"""Hugging Face's attention interface, seen through context parallelism.

A transformers attention module picks its attention function at every call:
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``, a name
looked up in its modeling module. :func:`route_attention_interface` puts a view of that registry
there, so every function the module picks — SDPA, its own eager function with softcapping or sinks —
comes back wrapped by :func:`_through_cp`. Outside CP, and for modules the hooks did not prepare, the
wrapper calls the function unchanged; under CP it runs the function through the active mechanism:

* ring: the function as it is (its SDPA call is the ring's) for plain causal SDPA; plain causal eager, flex or
  flash attention on SDPA's ring; a sliding window shorter than the sequence, softcapping or sinks on the masked
  ring instead, unpacked rows and packed documents alike (Note [windowed ring];
  :mod:`~lightning_cp.attention.ring_variants` says which functions it reproduces, and refuses the rest);
* Ulysses: the function on whole sequences for this rank's heads (Note [Ulysses]);
* hybrid: Ulysses inside the group, then the function's SDPA call (or SDPA called in its place) runs the ring
  across groups (or, for the variants above, the masked ring across groups on this rank's heads).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cp.attention.ledger import record_mechanism_call
from lightning_cp.attention.masked_ring import AttentionVariant, masked_ring_attention
from lightning_cp.attention.ring_variants import ring_variant
from lightning_cp.attention.switch import ActiveContextParallel, active_context_parallel
from lightning_cp.attention.ulysses import (
    back_to_shards,
    run_attention_function,
    to_whole_sequences,
)

#: Set on attention modules the hooks prepared; the interface leaves every other module alone.
HOOKED_MARK = "_lightning_cp_hooked"
_REGISTRY_NAME = "ALL_ATTENTION_FUNCTIONS"


def sliding_window_of(module: nn.Module) -> int | None:
    """The sliding-window size an attention module applies, or ``None`` for full causal attention.

    Reads the module's own ``sliding_window`` (Qwen2-style, per layer) or else its config's
    (Mistral-style, every layer; per layer when the config lists ``layer_types``).
    """
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if window is not None and layer_types is not None and layer_idx is not None:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    return window


def uses_attention_interface(module: nn.Module) -> bool:
    """Whether ``module``'s modeling code picks its attention function from transformers' registry."""
    modeling = sys.modules.get(type(module).__module__)
    return modeling is not None and hasattr(modeling, _REGISTRY_NAME)


def route_attention_interface(module: nn.Module) -> None:
    """Make the attention functions ``module``'s modeling code picks go through CP (once per modeling module)."""
    modeling: ModuleType | None = sys.modules.get(type(module).__module__)
    registry = getattr(modeling, _REGISTRY_NAME, None)
    if registry is not None and not isinstance(registry, _ContextParallelRegistry):
        setattr(modeling, _REGISTRY_NAME, _ContextParallelRegistry(registry))


class _ContextParallelRegistry:
    """transformers' ``AttentionInterface`` with every function it hands out wrapped by :func:`_through_cp`."""

    def __init__(self, registry: Any) -> None:
        self._registry = registry
        self._wrapped: dict[tuple[int, str], Callable[..., Any]] = {}

    def get_interface(self, attn_implementation: str, default: Callable[..., Any]) -> Callable[..., Any]:
        return self._wrap(self._registry.get_interface(attn_implementation, default), attn_implementation)

    def __getitem__(self, attn_implementation: str) -> Callable[..., Any]:
        return self._wrap(self._registry[attn_implementation], attn_implementation)

    def __contains__(self, attn_implementation: object) -> bool:
        return attn_implementation in self._registry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)

    def _wrap(self, function: Callable[..., Any], implementation: str) -> Callable[..., Any]:
        key = (id(function), implementation)
        if key not in self._wrapped:
            self._wrapped[key] = _through_cp(function, implementation)
        return self._wrapped[key]


def _through_cp(original: Callable[..., Any], implementation: str) -> Callable[..., Any]:
    def attention(module: nn.Module, query: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if active_context_parallel() is None or not getattr(module, HOOKED_MARK, False):
            return original(module, query, *args, **kwargs)
        return _run_under_cp(original, implementation, module, query, *args, **kwargs)

    return attention


@torch.compiler.disable
def _run_under_cp(
    original: Callable[..., Any],
    implementation: str,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> Any:
    """Run a hooked module's attention function through the active mechanism (see the module docstring)."""
    active = active_context_parallel()
    assert active is not None
    window = kwargs["sliding_window"] if "sliding_window" in kwargs else sliding_window_of(module)
    if active.mechanism != "ulysses":
        variant = ring_variant(original, implementation, module, query, window, kwargs, active.global_seq_len)
        if variant is not None and variant.plain:
            return _sdpa_ring(variant.scale, query, key, value), None
        if variant is not None:
            return _masked_ring(active, variant, module, query, key, value), None
    if active.mechanism == "ring":  # the function's SDPA call is the ring's, which records itself
        return original(module, query, key, value, attention_mask, **kwargs)
    assert active.ulysses is not None
    return run_attention_function(original, implementation, active.ulysses, window, module, query, key, value, **kwargs)


def _sdpa_ring(scale: float, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``[B, s, H, D]``: plain causal attention of ``[B, H, s, D]`` shards by the SDPA that CP switched on (the
    ring, the document-masked ring, or the hybrid's Ulysses around them), for a function that does not call SDPA
    itself (eager, flex_attention, flash attention): the same attention, computed by the ring's kernels."""
    gqa = query.size(1) != key.size(1)
    return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa).transpose(
        1, 2
    )


def _masked_ring(
    active: ActiveContextParallel,
    variant: AttentionVariant,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
) -> torch.Tensor:
    """``[B, s, H, D]``: the masked ring over the ring ranks (Note [windowed ring]); in the hybrid, on the
    heads Ulysses gives this rank (Note [hybrid layout]), with their sinks."""
    assert active.ring_group is not None
    record_mechanism_call()
    if active.ulysses is None:
        out = masked_ring_attention(
            query, key, value, variant, active.ring_group, active.load_balance, active.documents
        )
        return out.transpose(1, 2)
    exchange = active.ulysses
    q, k, v = to_whole_sequences(query, key, value, exchange, f"`{type(module).__name__}`")
    if variant.sinks is not None:
        local = q.size(1)
        variant = replace(variant, sinks=variant.sinks.narrow(0, exchange.group.rank * local, local))
    out = masked_ring_attention(q, k, v, variant, active.ring_group, active.load_balance, active.documents)
    return back_to_shards(out.transpose(1, 2), exchange)
