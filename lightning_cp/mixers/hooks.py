"""Model hooks that make sequence mixers correct under context parallelism: run by a mechanism, or stopped.

:func:`attach_mixer_hooks` brackets every mixer :func:`~lightning_cp.mixers.detect.find_sequence_mixers`
finds. Under CP, a mixer whose mechanism is ``"gather"`` runs on whole rows
(:mod:`lightning_cp.mixers.whole_sequence`); one run by the all-to-all has its functions routed
(:mod:`lightning_cp.mixers.heads`) and must finish with every part it needs (convolution, scan) gone
through CP, or it raises: it would have mixed only its own shard. Outside CP the hooks step aside.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn

from lightning_cp.mixers import switch
from lightning_cp.mixers.detect import find_sequence_mixers, mixer_traits
from lightning_cp.mixers.exchange import MixerExchange
from lightning_cp.mixers.heads import MODULE_ROUTED_MIXERS, route_mixer_functions, route_mixer_modules
from lightning_cp.mixers.mode import MixerPlan, choose_mixer_mechanisms
from lightning_cp.mixers.switch import mixers_on
from lightning_cp.mixers.whole_sequence import whole_sequence_hook, whole_sequence_pre_hook
from lightning_cp.validation import ContextParallelInputError

_HOOKED_MARK = "_lightning_cp_mixer_hooked"
#: Every mixer hooked in this process (for the functional API's ``mixer_mode="auto"``).
_hooked_mixers: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def hooked_mixers() -> dict[str, nn.Module]:
    """The sequence mixers hooked in this process that are still alive, by the name given at hooking."""
    return {module._lightning_cp_mixer_name: module for module in _hooked_mixers}


def _name(module: nn.Module) -> str:
    return getattr(module, "_lightning_cp_mixer_name", type(module).__name__)


#: Keyword arguments through which transformers hands a mixer its cache.
_CACHE_NAMES = ("cache", "cache_params", "past_key_values", "past_key_value")


def _drop_fresh_cache(module: nn.Module, kwargs: dict[str, Any]) -> None:
    """Take away a cache that holds nothing yet (``use_cache=True`` in a training forward), as the mixer
    would then store a shard's states in it; refuse one that holds states: CP does not continue a sequence."""
    for key in _CACHE_NAMES:
        cache = kwargs.get(key)
        if cache is None:
            continue
        length = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        if length:
            raise ContextParallelInputError(
                f"Sequence mixer `{_name(module)}` got a cache holding {length} earlier tokens under context"
                " parallelism; CP runs whole sequences and does not continue one from a cache. Generate outside"
                " the CP context, or pass `use_cache=False`."
            )
        kwargs[key] = None


def _mixer_pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    if switch.active_mixer_exchange() is None:
        return None
    mechanism = getattr(module, "_lightning_cp_mixer_mechanism", None)
    if mechanism is None:
        raise ContextParallelInputError(
            f"Sequence mixer `{_name(module)}` ({type(module).__name__}) runs under context parallelism, but no"
            " mechanism was chosen for it: it was hooked after the CP mechanisms were chosen. Attach the hooks"
            " before building the CP context (`make_cp_batch_and_ctx` chooses from the hooked modules)."
        )
    _drop_fresh_cache(module, kwargs)
    switch.entering(module, mechanism)
    if mechanism == "gather":
        return whole_sequence_pre_hook(module, args, kwargs)
    return None


@torch.compiler.disable
def _mixer_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
    if switch.active_mixer_exchange() is None:
        return None
    mechanism = module._lightning_cp_mixer_mechanism
    if mechanism == "gather":
        output = whole_sequence_hook(module, args, kwargs, output)
    required = {"whole"} if mechanism == "gather" else set(module._lightning_cp_mixer_parts)
    done = switch.leaving(module)
    missing = sorted(required - done)
    switch.count_through(not missing)
    if missing:
        raise ContextParallelInputError(
            f"Sequence mixer `{_name(module)}` ({type(module).__name__}) finished its forward under context"
            f" parallelism (mixer_mode {mechanism!r}) without its {' and '.join(missing)} going through CP, so it"
            " mixed only its own shard. It took a code path lightning_cp does not route (a fused kernel, a"
            " cache, a function called by another name). Use mixer_mode='gather', which runs the whole module"
            " on the whole sequence, or train this model without context parallelism."
        )
    return output


def attach_mixer_hooks(model: nn.Module) -> dict[str, nn.Module]:
    """Bracket every sequence mixer of ``model`` (attaching twice is harmless); return them by name."""
    mixers = find_sequence_mixers(model)
    for name, module in mixers.items():
        if getattr(module, _HOOKED_MARK, False):
            continue
        module._lightning_cp_mixer_name = name
        traits = mixer_traits(name, module)
        module._lightning_cp_mixer_parts = traits.parts
        route_mixer_functions(module)
        if type(module).__name__ in MODULE_ROUTED_MIXERS:
            route_mixer_modules(module)
        module.register_forward_pre_hook(_mixer_pre_hook, with_kwargs=True)
        module.register_forward_hook(_mixer_hook, with_kwargs=True)
        setattr(module, _HOOKED_MARK, True)
        _hooked_mixers.add(module)
    return mixers


def apply_mixer_plan(mixers: dict[str, nn.Module], plan: MixerPlan) -> None:
    """Give every hooked mixer the mechanism ``plan`` chose for it."""
    for name, module in mixers.items():
        module._lightning_cp_mixer_mechanism = plan.mechanisms[name]


def refuse_mixers_with_transformer_engine(model: nn.Module) -> None:
    """Refuse sequence mixers in a model whose attention is Transformer Engine's (its THD batches have no
    whole-row order for the mixers to rebuild)."""
    mixers = find_sequence_mixers(model)
    if mixers:
        names = ", ".join(f"`{name}`" for name in list(mixers)[:3])
        raise ContextParallelInputError(
            f"{type(model).__name__} has sequence mixers ({names}) beside Transformer Engine attention; lightning_cp"
            " runs mixers only with its own attention mechanisms. Pass `transformer_engine=False` (TE attention"
            " is then not used under CP) or train without context parallelism."
        )


def plan_hooked_mixers(cp_size: int, mixer_mode: str) -> MixerPlan:
    """Choose and apply the mechanism of every mixer hooked in this process (the functional API's way)."""
    mixers = hooked_mixers()
    plan = choose_mixer_mechanisms([mixer_traits(name, module) for name, module in mixers.items()], cp_size, mixer_mode)
    apply_mixer_plan(mixers, plan)
    return plan


@contextmanager
def with_mixers(context: AbstractContextManager[None], exchange: MixerExchange) -> Iterator[None]:
    """``context`` (the attention's) with the sequence mixers running through CP over ``exchange``."""
    with context, mixers_on(exchange):
        yield
