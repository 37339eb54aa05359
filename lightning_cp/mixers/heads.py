"""The ``"all_to_all"`` mechanism: sequence mixers run on whole sequences for this rank's heads or channels.

Note [mixer all-to-all]
-----------------------
A scan, a recurrence or a depthwise convolution mixes positions but never heads (a gated delta rule,
Mamba-2's SSD scan) or channels (the causal convolution before them). So, as Ulysses does for attention
(Note [Ulysses] in :mod:`lightning_cp.attention.ulysses`), an all-to-all trades "my positions, every
head" for "every position, my heads", the model's own function runs on the whole original row in order
(Note [mixer sequence order] in :mod:`lightning_cp.mixers.exchange`), and a second all-to-all trades
the output back. Each rank moves ``(cp - 1) / cp²`` of the mixer's inputs and outputs, and holds the
scan's activations for ``1/cp`` of the heads.

Transformers (5.x) calls these functions by name from the modeling module of each family
(``causal_conv1d_forward``, ``torch_chunk_gated_delta_rule``, ``chunk_kimi_delta_attention``,
``mamba2_scan_forward``, ``mamba_scan_forward``; each a kernel from the hub on CUDA or the torch fallback,
chosen inside the call). :func:`route_mixer_functions`
replaces each name there by a router that runs it through CP, so whichever kernel the model picked
runs, on whole sequences (inside a mixer run by ``mixer_mode="state_passing"``, the router runs the
function on the rank's own positions instead: Note [state passing] in :mod:`lightning_cp.mixers.state_passing`).
The fused Mamba-2 kernel (convolution, scan, norm and projection at once) is
told to step aside under CP (it returns ``None``, as its torch fallback does), so the model takes the
path whose parts go through CP. Parameters read per head (``A_log``, ``D``, ``dt_bias``) or per channel
(the convolution's weight) are narrowed to the rank's heads, so gradients reach the full parameters.

Heads. Value head ``h`` reads key head ``h // (H / H_k)`` (a Mamba-2 head reads group ``h // (H / G)``).
With ``H_k ≥ cp`` the key heads split like the value heads; with fewer, each is repeated ``cp / H_k``
times first, as Ulysses does for key/value heads, and autograd sums the copies' gradients back.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cp.attention.switch import active_context_parallel
from lightning_cp.attention.ulysses import heads_to_sequence, sequence_to_heads, ulysses_head_error
from lightning_cp.mixers import switch
from lightning_cp.mixers.exchange import MixerExchange, ordered_from_rank_order, rank_order_from_ordered, to_whole_row
from lightning_cp.mixers.state_passing import STATE_PASSING_ROUTES
from lightning_cp.validation import ContextParallelInputError

#: Set on the routers that replace a modeling module's mixer functions.
_ROUTED_MARK = "_lightning_cp_routed"


def _whole(tensor: torch.Tensor, exchange: MixerExchange, split_dim: int, seq_dim: int = 1) -> torch.Tensor:
    """``[B, s, ...]`` shard, all heads → the original row for this rank's part of ``split_dim``."""
    traded = sequence_to_heads(tensor, exchange.ulysses, head_dim=split_dim, seq_dim=seq_dim)
    return ordered_from_rank_order(traded, exchange, seq_dim=seq_dim)


def _shard(tensor: torch.Tensor, exchange: MixerExchange, split_dim: int, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`_whole`: the original row for this rank's part → this rank's positions, all parts."""
    ordered = rank_order_from_ordered(tensor, exchange, seq_dim=seq_dim)
    return heads_to_sequence(ordered, exchange.ulysses, head_dim=split_dim, seq_dim=seq_dim)


def _spread(tensor: torch.Tensor, heads: int, size: int, dim: int) -> torch.Tensor:
    """Repeat ``heads`` (fewer than ``size``) so that each of ``size`` ranks receives the one its heads read."""
    return tensor if heads % size == 0 else tensor.repeat_interleave(size // heads, dim=dim)


class _LocalView:
    """A module as a mixer function must see it on a rank holding ``local`` of its ``heads`` heads.

    Parameters with one entry (or one block of entries) per head along their first dimension (``A_log``,
    ``D``, ``dt_bias``, a depthwise convolution's weight and bias) are narrowed to the rank's heads;
    ``counts`` overrides
    sizes the function reads (``num_heads``, ...); ``children`` are submodules seen the same way.
    Everything else is read from the module.
    """

    def __init__(
        self,
        module: nn.Module,
        heads: int,
        rank: int,
        local: int,
        counts: dict[str, int],
        children: tuple[str, ...] = (),
    ) -> None:
        self._module = module
        for name, parameter in module.named_parameters(recurse=False):
            # one entry, or one block of entries (RG-LRU's per-channel parameter over head blocks), per head
            if parameter.ndim >= 1 and parameter.size(0) % heads == 0:
                per_head = parameter.size(0) // heads
                setattr(self, name, parameter.narrow(0, rank * local * per_head, local * per_head))
        for name, value in counts.items():
            setattr(self, name, value)
        for name in children:  # submodules whose per-head parameters the function reads (Mamba's dt_proj.bias)
            setattr(self, name, _LocalView(getattr(module, name), heads, rank, local, {}))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _exchange() -> MixerExchange:
    exchange = switch.active_mixer_exchange()
    assert exchange is not None
    return exchange


def _refuse_cache(name: str, cache: Any) -> None:
    if cache is not None:
        raise ContextParallelInputError(
            f"`{name}` got a cache under context parallelism: CP trains and evaluates whole sequences; generate"
            " without CP (outside the CP context), where the cache works as usual."
        )


def _refuse_split(what: str, error: str | None) -> None:
    if error is not None:
        raise ContextParallelInputError(
            f"{what}: {error}, so the mixer all-to-all cannot give each CP rank whole heads."
            " Use mixer_mode='gather' (or 'auto', which picks it for such layers), or a CP size that divides them."
        )


def causal_conv_through_cp(
    original: Callable[..., Any],
    conv1d: nn.Module,
    hidden_states: torch.Tensor,
    cache: Any = None,
    *args: Any,
    **kwargs: Any,
) -> torch.Tensor:
    """``causal_conv1d_forward`` on whole sequences for this rank's channels (depthwise: channels never mix)."""
    _refuse_cache("causal_conv1d_forward", cache)
    exchange = _exchange()
    channels = hidden_states.size(1)
    _refuse_split(f"a causal convolution over {channels} channels", depthwise_conv_error(conv1d, exchange.size))
    local = channels // exchange.size
    x = _whole(hidden_states, exchange, split_dim=1, seq_dim=2)
    view = _LocalView(
        conv1d, channels, exchange.rank, local, {"in_channels": local, "out_channels": local, "groups": local}
    )
    out = original(view, x, None, *args, **kwargs)
    switch.record("conv")
    return _shard(out, exchange, split_dim=1, seq_dim=2)


def gated_delta_rule_through_cp(
    original: Callable[..., Any],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``torch_chunk_gated_delta_rule`` or ``chunk_kimi_delta_attention`` (or their kernels) on whole sequences
    for this rank's value heads."""
    _refuse_cache("the gated delta rule", kwargs.get("initial_state"))
    if kwargs.get("cu_seqlens") is not None:
        raise ContextParallelInputError(
            "The gated delta rule got `cu_seqlens` under context parallelism; they describe the whole batch, not"
            " a shard. Pass packed documents as `position_ids` that restart per document (or `cu_seqlens` in"
            " the batch), and lightning_cp lays them out."
        )
    exchange = _exchange()
    value_heads, key_heads = value.size(2), key.size(2)
    _refuse_split(
        f"a gated delta net with {value_heads} value / {key_heads} key heads",
        ulysses_head_error(value_heads, key_heads, exchange.size, ("value heads", "key heads")),
    )
    query, key = (_spread(t, key_heads, exchange.size, dim=2) for t in (query, key))
    q, k, v, gate, b = (_whole(t, exchange, split_dim=2) for t in (query, key, value, g, beta))
    kwargs["output_final_state"] = False
    out, _ = original(q, k, v, *args, g=gate, beta=b, **kwargs)
    switch.record("scan")
    return _shard(out, exchange, split_dim=2), None


def mamba2_scan_through_cp(
    original: Callable[..., Any],
    module: nn.Module,
    hidden_states: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    dt: torch.Tensor,
    cache: Any = None,  # noqa: N803
    **kwargs: Any,
) -> torch.Tensor:
    """``mamba2_scan_forward`` (SSD scan and ``D`` skip) on whole sequences for this rank's heads."""
    _refuse_cache("the Mamba-2 scan", cache)
    exchange = _exchange()
    heads, groups, size = module.num_heads, module.n_groups, exchange.size
    _refuse_split(
        f"a Mamba-2 layer with {heads} heads in {groups} groups",
        ulysses_head_error(heads, groups, size, ("heads", "groups")),
    )
    local = heads // size
    batch, seq = B.shape[:2]
    B, C = (  # noqa: N806
        _spread(t.view(batch, seq, groups, -1), groups, size, dim=2).flatten(2) for t in (B, C)
    )
    x, b, c, step = (_whole(t, exchange, split_dim=2) for t in (hidden_states, B, C, dt))
    counts = {"num_heads": local, "n_groups": max(groups // size, 1), "intermediate_size": local * module.head_dim}
    out = original(_LocalView(module, heads, exchange.rank, local, counts), x, b, c, step, None, **kwargs)
    switch.record("scan")
    return _shard(out, exchange, split_dim=2)


def mamba_scan_through_cp(
    original: Callable[..., Any],
    module: nn.Module,
    hidden_states: torch.Tensor,
    time_step: torch.Tensor,
    B: torch.Tensor,  # noqa: N803
    C: torch.Tensor,  # noqa: N803
    gate: torch.Tensor,
    cache: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Mamba-1's ``mamba_scan_forward`` (selective scan, ``D`` skip, gate) on whole sequences for this rank's channels.

    Channels never mix in the scan; ``B`` and ``C`` (``[B, s, N]``) are shared by all channels, so every rank
    receives them whole (each rank's shard sent to every rank: the all-to-all of ``cp`` copies).
    """
    _refuse_cache("the Mamba scan", cache)
    exchange = _exchange()
    channels, size = hidden_states.size(1), exchange.size
    if channels % size:
        _refuse_split(f"a Mamba layer with {channels} channels", f"{channels} channels do not split over {size} ranks")
    local = channels // size
    x, step, z = (_whole(t, exchange, split_dim=1, seq_dim=2) for t in (hidden_states, time_step, gate))
    b, c = (_whole(t.unsqueeze(2).expand(-1, -1, size, -1).flatten(2), exchange, split_dim=2) for t in (B, C))
    view = _LocalView(module, channels, exchange.rank, local, {"intermediate_size": local}, children=("dt_proj",))
    out = original(view, x, step, b, c, z, None, **kwargs)
    switch.record("scan")
    return _shard(out, exchange, split_dim=1, seq_dim=2)


def conv_module_through_cp(module: nn.Conv1d, hidden_states: torch.Tensor) -> torch.Tensor:
    """A depthwise causal ``nn.Conv1d`` called as a module (``conv(x)[..., :seq_len]``, RecurrentGemma's) on whole
    sequences for this rank's channels; returned padded as the module's own output is, ``kernel - 1`` longer."""
    exchange = _exchange()
    channels, size = hidden_states.size(1), exchange.size
    _refuse_split(f"a causal convolution over {channels} channels", depthwise_conv_error(module, size))
    local = channels // size
    view = _LocalView(module, channels, exchange.rank, local, {})
    x = _whole(hidden_states, exchange, split_dim=1, seq_dim=2)
    out = F.conv1d(x, view.weight, view.bias, padding=module.padding, dilation=module.dilation, groups=local)
    out = _shard(out.narrow(2, 0, x.size(2)), exchange, split_dim=1, seq_dim=2)
    switch.record("conv")
    return F.pad(out, (0, module.kernel_size[0] - 1))


def rg_lru_through_cp(module: nn.Module, activations: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """RecurrentGemma's RG-LRU (gates per head block, a recurrence per channel that restarts where
    ``position_ids`` is 0) on whole sequences for this rank's head blocks."""
    exchange = _exchange()
    heads, size = module.num_attention_heads, exchange.size
    if heads % size:
        _refuse_split(f"an RG-LRU of {heads} head blocks", f"{heads} head blocks do not split over {size} ranks")
    local = heads // size
    x = _whole(activations, exchange, split_dim=2)
    positions = to_whole_row(position_ids, exchange)
    view = _LocalView(module, heads, exchange.rank, local, {"num_attention_heads": local, "recurrent_states": None})
    out = type(module).forward(view, x, positions)
    switch.record("scan")
    return _shard(out, exchange, split_dim=2)


#: Mixers whose parts are modules called by the mixer (not named functions), and which mix positions nowhere
#: else: :data:`MODULE_ROUTES` runs those parts.
MODULE_ROUTED_MIXERS = ("RecurrentGemmaRecurrentBlock",)
#: Mixer parts that models call as modules, not as named functions: what runs each under CP, and its part.
MODULE_ROUTES: dict[str, tuple[Callable[..., Any], str]] = {
    "Conv1d": (conv_module_through_cp, "conv"),
    "RecurrentGemmaRglru": (rg_lru_through_cp, "scan"),
}


def _routed_module_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The ``forward`` of a routed mixer part: its class's own outside the all-to-all, its route inside."""
    if switch.active_mixer_exchange() is None or switch.innermost_mechanism() != "all_to_all":
        return type(self).forward(self, *args, **kwargs)
    handler, _ = MODULE_ROUTES[type(self).__name__]
    with switch.running_whole():
        return handler(self, *args, **kwargs)


def route_mixer_modules(mixer: nn.Module) -> None:
    """Route the children of ``mixer`` that :data:`MODULE_ROUTES` runs through CP (their own forward otherwise).

    The route is a method bound to the child, so a deep copy of the model (an EMA copy, say) routes its own.
    """
    for child in mixer.children():
        if type(child).__name__ in MODULE_ROUTES and not getattr(child, _ROUTED_MARK, False):
            child.forward = types.MethodType(_routed_module_forward, child)
            setattr(child, _ROUTED_MARK, True)


def _fused_steps_aside(original: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Under CP the fused Mamba-2 kernel gives way (``None``, as its torch fallback returns) to the routed parts."""
    return None


def _decode_only(name: str) -> Callable[..., Any]:
    def refuse(original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        raise ContextParallelInputError(
            f"`{name}` (one-token decoding with a cache) ran under context parallelism. CP trains and evaluates"
            " whole sequences; generate outside the CP context."
        )

    return refuse


#: Mixer functions of transformers' modeling modules, by name: what runs them under CP, and the part of
#: the mixer each is (the hooks check that a mixer's parts all went through CP).
ROUTES: dict[str, tuple[Callable[..., Any], str | None]] = {
    "causal_conv1d_forward": (causal_conv_through_cp, "conv"),
    "torch_chunk_gated_delta_rule": (gated_delta_rule_through_cp, "scan"),
    # Kimi delta attention: the gated delta rule with a decay per channel ([B, s, H, D]): split by heads alike
    "chunk_kimi_delta_attention": (gated_delta_rule_through_cp, "scan"),
    "mamba2_scan_forward": (mamba2_scan_through_cp, "scan"),
    "mamba_scan_forward": (mamba_scan_through_cp, "scan"),
    "mamba2_split_conv1d_scan_combined": (_fused_steps_aside, None),
    "mamba_inner_fn": (_fused_steps_aside, None),
    **{
        name: (_decode_only(name), None)
        for name in (
            "causal_conv1d_update",
            "torch_recurrent_gated_delta_rule",
            "mamba2_selective_state_update",
            "mamba_selective_state_update",
            "recurrent_kimi_delta_attention",
        )
    },
}

#: What runs each mixer function under each mechanism that routes functions: the all-to-all's :data:`ROUTES`;
#: state passing (:mod:`lightning_cp.mixers.state_passing`) its own functions, and the same refusals and fused
#: kernels stepping aside.
MECHANISM_ROUTES: dict[str, dict[str, Callable[..., Any]]] = {
    "all_to_all": {name: handler for name, (handler, _) in ROUTES.items()},
    "state_passing": {
        **{name: handler for name, (handler, part) in ROUTES.items() if part is None},
        **STATE_PASSING_ROUTES,
    },
}

#: Sequence-mixing functions transformers' mixers call that the all-to-all does not run (yet): a mixer
#: calling one of them runs by ``"gather"``.
UNROUTED = ("mamba_selective_scan",)


def depthwise_conv_error(conv: Any, size: int) -> str | None:
    """Why ``size`` ranks cannot split this convolution's channels, or ``None``."""
    channels = conv.weight.size(0)
    if getattr(conv, "groups", channels) != channels or conv.weight.size(1) != 1:
        return f"the convolution mixes channels (groups={getattr(conv, 'groups', '?')}, {channels} channels)"
    if channels % size:
        return f"{channels} channels do not split over {size} ranks"
    return None


def _router(name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def routed(*args: Any, **kwargs: Any) -> Any:
        if switch.active_mixer_exchange() is None and active_context_parallel() is None:
            return original(*args, **kwargs)  # no CP
        if switch.innermost_mechanism() in ("gather", "whole"):
            return original(*args, **kwargs)
        if switch.innermost_mechanism() is None:
            raise ContextParallelInputError(
                f"`{name}` ran under context parallelism outside any sequence mixer lightning_cp prepared, so it"
                " would mix only this rank's shard. Attach the hooks to the whole model (the strategies do it;"
                " with the functional API call `attach_context_parallel_hooks(model)`)."
            )
        mechanism = switch.innermost_mechanism()
        handler = MECHANISM_ROUTES[mechanism].get(name)
        if handler is None:
            raise ContextParallelInputError(
                f"`{name}` ran in a sequence mixer run by mixer_mode {mechanism!r}, which does not run it. Use"
                " mixer_mode='all_to_all' or 'gather' for this model."
            )
        with switch.running_whole():
            return handler(original, *args, **kwargs)

    setattr(routed, _ROUTED_MARK, True)
    return routed


def route_mixer_functions(module: nn.Module) -> None:
    """Route the mixer functions of ``module``'s modeling module through CP (once per modeling module)."""
    _route_modeling_module(sys.modules.get(type(module).__module__))


_modules_seen = 0


def route_loaded_mixer_functions() -> None:
    """Route the mixer functions of every transformers modeling module loaded so far.

    The safety net for mixers nobody hooked (a model given to the functional API without
    ``attach_context_parallel_hooks``): their functions then raise under CP instead of mixing one shard.
    Cheap when nothing was imported since the last call.
    """
    global _modules_seen
    if len(sys.modules) == _modules_seen:
        return
    _modules_seen = len(sys.modules)
    for name, modeling in list(sys.modules.items()):
        if name.startswith("transformers.models.") and ".modeling_" in name:
            _route_modeling_module(modeling)


def _route_modeling_module(modeling: ModuleType | None) -> None:
    for name in ROUTES:
        original = getattr(modeling, name, None)
        if original is not None and not getattr(original, _ROUTED_MARK, False):
            setattr(modeling, name, _router(name, original))
