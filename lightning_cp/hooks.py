"""Model hooks that make attention modules correct under context parallelism.

* :func:`attach_context_parallel_hooks`: while CP attention is switched on, every self-attention
  module drops its explicit mask (built from the local shard, so meaningless) and its attention goes
  through the active mechanism: the ring or Ulysses (the attention functions of Hugging Face models are
  routed through :mod:`lightning_cp.attention.interface`). A module that attends by another route is
  stopped (:mod:`lightning_cp.attention.ledger`). Outside CP the hooks step aside, so the same model
  still works with masks for evaluation or generation.
* :func:`attach_cp_sdpa_hooks`: with ``torch.compile`` per layer, Dynamo could trace SDPA on plain
  local tensors and each rank would attend only to its own shard. The hook makes SDPA a graph break,
  so the ring's SDPA (which re-wraps the local Q/K/V as sequence-sharded DTensors) runs eagerly.
"""

from __future__ import annotations

import inspect
import sys
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.attention import ledger
from lightning_cp.attention.alibi import is_alibi_attention, prepare_alibi_attention
from lightning_cp.attention.interface import (
    HOOKED_MARK,
    route_attention_interface,
    sliding_window_of,
    uses_attention_interface,
)
from lightning_cp.attention.switch import ActiveContextParallel, active_context_parallel
from lightning_cp.attention.ulysses import ULYSSES_ATTN_IMPLEMENTATIONS
from lightning_cp.mixers.detect import is_sequence_mixer
from lightning_cp.mixers.hooks import attach_mixer_hooks
from lightning_cp.validation import ContextParallelInputError

#: Set on attention modules whose SDPA :func:`attach_cp_sdpa_hooks` keeps out of compiled graphs.
_SDPA_HOOKED_MARK = "_lightning_cp_sdpa_hooked"
#: Every attention module hooked in this process (for ``cp_mode="auto"`` of the functional API).
_hooked_modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()


#: Every model given to :func:`attach_context_parallel_hooks` in this process, in that order (weakly held).
_hooked_models: list[weakref.ref[nn.Module]] = []


def hooked_models() -> list[tuple[int, nn.Module]]:
    """``(order, model)`` for the models given to :func:`attach_context_parallel_hooks` that are still alive.

    ``order`` counts the models in the order they were first hooked, so a program that hooks the same models
    on every rank names each alike on every rank.
    """
    return [(order, model) for order, ref in enumerate(_hooked_models) if (model := ref()) is not None]


def hooked_model_count() -> int:
    """How many models were ever hooked in this process (freed ones included): grows with each new model."""
    return len(_hooked_models)


def hooked_attention_modules() -> dict[str, nn.Module]:
    """The attention modules hooked in this process that are still alive, by the name given at hooking."""
    return {getattr(module, "_lightning_cp_name", type(module).__name__): module for module in _hooked_modules}


def find_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Self-attention modules of ``model`` by qualified name.

    A module counts when it is named ``self_attn`` (the Hugging Face decoder convention), its class
    name ends in ``Attention`` and it declares ``is_causal``, or it is Bloom's or MPT's hand-written ALiBi
    attention (:mod:`lightning_cp.attention.alibi`); cross-attention (a name with ``cross``
    or ``encoder_attn``), modules nested in one already found, and linear attention (a sequence mixer,
    :func:`~lightning_cp.mixers.detect.is_sequence_mixer`) are left out.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") for parent in found):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "cross" in leaf or leaf == "encoder_attn":
            continue
        if is_sequence_mixer(module):
            continue  # linear attention (Kimi's, MiniMax's) is a mixer: lightning_cp.mixers runs it
        named_like_attention = type(module).__name__.endswith("Attention") and hasattr(module, "is_causal")
        if leaf == "self_attn" or named_like_attention or is_alibi_attention(module):
            found[name] = module
    return found


def attention_like_modules(model: nn.Module, found: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Modules that look like self-attention (a class name ending in ``Attention``) but are not in ``found``.

    Attention written by hand, without ``is_causal``, never calling SDPA or transformers' attention interface
    (other than Bloom's and MPT's, which CP runs). Modules inside or around a found one are left out.
    """
    others: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if not type(module).__name__.endswith("Attention") or "cross" in leaf or leaf == "encoder_attn":
            continue
        if is_sequence_mixer(module):
            continue
        related = any(name == f or name.startswith(f + ".") or f.startswith(name + ".") for f in found)
        if not related and not any(name.startswith(other + ".") for other in others):
            others[name] = module
    return others


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)


def _owner_of(model: nn.Module, names: list[str]) -> str:
    """The model that owns the modules ``names`` of ``model``, as a user would name it, e.g. ``BloomForCausalLM``.

    The outermost Hugging Face model on the way from ``model`` to the modules' common parent (a LightningModule
    holding a ``BloomForCausalLM`` names the latter), else that common parent itself, containers skipped;
    with the path from ``model`` when it is not ``model`` itself.
    """
    parts = [name.split(".") for name in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    path = [".".join(common[:depth]) for depth in range(len(common))]  # the parents only, never a module itself
    chain = [(name, model.get_submodule(name)) for name in path]
    hf = [(name, module) for name, module in chain if _is_hf_model(module)]
    owner_name, owner = (
        hf[0]
        if hf
        else next(
            ((name, module) for name, module in reversed(chain) if not isinstance(module, _CONTAINERS)), ("", model)
        )
    )
    return type(owner).__name__ + (f" (`{owner_name}`)" if owner_name else "")


def _is_hf_model(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a model of its classes exists only once it was imported
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _refuse_unreachable(model: nn.Module, found: dict[str, nn.Module]) -> None:
    """Refuse a model whose attention CP cannot reach: it would attend only inside each rank's shard."""
    unreachable = attention_like_modules(model, found)
    if not unreachable:
        return
    listed = ", ".join(f"`{name}` ({type(module).__name__})" for name, module in list(unreachable.items())[:4])
    more = f" and {len(unreachable) - 4} more" if len(unreachable) > 4 else ""
    owner = _owner_of(model, list(unreachable))
    raise ContextParallelInputError(
        f"{owner} has attention modules that context parallelism cannot reach: {listed}{more}."
        " They compute attention by hand, not through"
        " `F.scaled_dot_product_attention` or transformers' attention interface, so under CP each rank would"
        " attend only inside its own shard: the loss would look right and the gradients would be wrong. No CP"
        " mode (ring, Ulysses) can run them; train this model without context parallelism, or use a model whose"
        " attention calls SDPA (e.g. an attn_implementation='sdpa' model)."
    )


def _check_attn_implementation(name: str, module: nn.Module) -> None:
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    runnable = ULYSSES_ATTN_IMPLEMENTATIONS if uses_attention_interface(module) else ("sdpa",)
    if implementation is not None and implementation not in runnable:
        raise ContextParallelInputError(
            f"Attention module `{name}` uses attn_implementation={implementation!r}, which no context-parallel"
            f" mechanism runs here (through transformers' attention interface every mode runs"
            f" {ULYSSES_ATTN_IMPLEMENTATIONS}; outside it, 'sdpa'), so it"
            " would attend only to its own shard. Build the model with `attn_implementation='sdpa'`."
        )


def _check_window(module: nn.Module, active: ActiveContextParallel) -> None:
    """Refuse a sliding window shorter than the sequence where no mechanism applies it.

    Through transformers' attention interface, Ulysses masks the window of the whole sequence (Note [Ulysses])
    and the ring and the hybrid run the masked ring (Note [windowed ring]), on unpacked rows and packed
    documents alike; a window that does not come through the interface would be attended beyond.
    """
    if module._lightning_cp_interface:
        return
    window = sliding_window_of(module)
    if window is None or active.global_seq_len is None or window >= active.global_seq_len:
        return
    length = "longest document" if active.documents is not None else "sequence"
    raise ContextParallelInputError(
        f"`{type(module).__name__}` uses a sliding window of {window} tokens, shorter than the {length}"
        f" ({active.global_seq_len}). Under cp_mode={active.mechanism!r} it does not attend through transformers'"
        " attention interface, so CP would run plain causal attention: it would attend beyond the window. Use"
        " sequences no longer than the window, or a model without sliding-window attention."
    )


def _takes_keyword(module: nn.Module, name: str) -> bool:
    parameters = inspect.signature(module.forward).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _mask_arg_index(module: nn.Module) -> int | None:
    parameters = list(inspect.signature(module.forward).parameters)
    return parameters.index("attention_mask") if "attention_mask" in parameters else None


def _causal_pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    active = active_context_parallel()
    if active is None:
        return None
    _check_window(module, active)
    causal = bool(getattr(module, "is_causal", True))
    if not causal and active.mechanism != "ulysses" and active.padding:
        raise ContextParallelInputError(
            f"`{type(module).__name__}` is not causal (is_causal=False) and the sequence was padded by"
            f" {active.padding} positions to split evenly over the CP ranks; under cp_mode={active.mechanism!r}"
            " every token would attend to them. Use cp_mode='ulysses' (it keeps padding apart), or sequences"
            " whose length is a multiple of the CP size (without load balancing)."
        )
    if not causal and active.mechanism != "ulysses" and active.load_balance and active.documents is None:
        raise ContextParallelInputError(
            f"`{type(module).__name__}` is not causal (is_causal=False); context parallelism with load balancing"
            " only supports causal attention. Turn load balancing off for bidirectional attention."
        )
    index = getattr(module, "_lightning_cp_mask_index", None)
    if index is not None and index < len(args):
        args = (*args[:index], None, *args[index + 1 :])
    if "attention_mask" in kwargs or index is None or index >= len(args):
        kwargs["attention_mask"] = None
    if module._lightning_cp_takes_is_causal:
        kwargs["is_causal"] = causal
    ledger.entering(module)
    return args, kwargs


@torch.compiler.disable
def _check_went_through_cp(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
    active = active_context_parallel()
    if active is None or ledger.leaving(module):
        return
    name = getattr(module, "_lightning_cp_name", type(module).__name__)
    raise ContextParallelInputError(
        f"Attention module `{name}` ({type(module).__name__}) finished its forward under context parallelism"
        f" (cp_mode={active.mechanism!r}) without any attention call going through it, so it attended only"
        " inside its own shard. It computes attention by another route: an SDPA imported by name"
        " (`from torch.nn.functional import scaled_dot_product_attention`), a hand-written softmax, or a kernel"
        " called directly. Call `torch.nn.functional.scaled_dot_product_attention` through the module attribute"
        " (or transformers' attention interface), or train this model without context parallelism."
    )


def _require_position_ids(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if active_context_parallel() is None or kwargs.get("position_ids") is not None:
        return
    index = module._lightning_cp_position_index
    if index is None or index >= len(args) or args[index] is None:
        raise ContextParallelInputError(
            f"`{type(module).__name__}` was called under context parallelism without `position_ids`: it would"
            " number each shard's tokens from 0. Pass the sharded batch's positions,"
            " e.g. `model(input_ids=batch['input_ids'], position_ids=batch['position_ids'])` or `model(**batch)`."
        )


def _outermost_position_aware_models(model: nn.Module) -> list[nn.Module]:
    """Outermost modules whose ``forward`` takes ``position_ids`` (the model a user calls)."""
    found: list[str] = []
    modules = []
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") or not parent for parent in found):
            continue
        if "position_ids" in inspect.signature(module.forward).parameters:
            found.append(name)
            modules.append(module)
    return modules


def attach_context_parallel_hooks(model: nn.Module) -> list[str]:
    """Make every self-attention module of ``model`` attend through the CP mechanism that is on.

    While CP is on, each module drops its mask (the mechanism rebuilds what the whole sequence needs),
    and a module whose forward ends without attention going through the mechanism raises. Mode-agnostic:
    what a mechanism cannot run (attention dropout under the ring, say) is refused when it runs. A
    model with attention modules CP cannot reach at all (written by hand, other than Bloom's and MPT's) is refused.
    Sequence mixers that are not attention (gated delta nets, Mamba scans, causal convolutions) are hooked
    too (:func:`~lightning_cp.mixers.hooks.attach_mixer_hooks`): under CP each runs by the mechanism
    chosen for it, or stops. Also makes the outermost modules that take ``position_ids`` refuse to run under
    CP without them: positions made by the model would restart at 0 in every shard. Returns the names of
    the attention modules hooked (attaching twice is harmless: a module is hooked once). Raises a
    ``ContextParallelInputError`` (a ``ValueError``) for a model whose attention no mechanism can run.

    The model is remembered (weakly): the functional API's first CP step after it was hooked compares its
    replicated parameters over the CP group and refuses replicas that differ (an unseeded model), on every rank.
    """
    for module in _outermost_position_aware_models(model):
        if not hasattr(module, "_lightning_cp_position_index"):
            parameters = list(inspect.signature(module.forward).parameters)
            module._lightning_cp_position_index = parameters.index("position_ids")
            module.register_forward_pre_hook(_require_position_ids, with_kwargs=True)
    attach_mixer_hooks(model)  # sequence mixers that are not attention: lightning_cp.mixers
    modules = find_attention_modules(model)
    _refuse_unreachable(model, modules)
    for name, module in modules.items():
        if is_alibi_attention(module):
            prepare_alibi_attention(module)  # its hand-written core runs through CP (Note [hand-written ALiBi])
        else:
            _check_attn_implementation(name, module)
        if getattr(module, HOOKED_MARK, False):
            continue
        module._lightning_cp_mask_index = _mask_arg_index(module)
        module._lightning_cp_takes_is_causal = _takes_keyword(module, "is_causal")
        module._lightning_cp_name = name
        # read once here, not in every forward: whether the modeling code picks its attention function
        module._lightning_cp_interface = uses_attention_interface(module)
        route_attention_interface(module)
        module.register_forward_pre_hook(_causal_pre_hook, with_kwargs=True)
        module.register_forward_hook(_check_went_through_cp, with_kwargs=True)
        setattr(module, HOOKED_MARK, True)
        _hooked_modules.add(module)
    order = getattr(model, "_lightning_cp_model_order", None)
    if order is None or _hooked_models[order]() is not model:  # new, or a deep copy of a hooked model
        model._lightning_cp_model_order = len(_hooked_models)  # its replicas are compared at its first CP step
        _hooked_models.append(weakref.ref(model))
    return list(modules)


def attach_cp_sdpa_hooks(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Keep the ring running when decoder layers are compiled with ``torch.compile``.

    For the duration of each self-attention forward, ``F.scaled_dot_product_attention`` is swapped for
    a ``torch.compiler.disable``-d call of the SDPA installed at that moment: Dynamo breaks the graph
    there and never traces SDPA on local tensors. Under a CP context that SDPA is the ring's (it checks
    its inputs and re-wraps the local Q/K/V as DTensors sharded on the CP mesh); outside it is plain
    SDPA. The projections before and after stay compiled. ``cp_mesh`` is unused, kept for NeMo
    AutoModel's signature; the ring runs on the mesh of the CP context that is open.
    """
    saved: list[Any] = []

    # Wrapped once: `torch.compiler.disable(fn)` costs milliseconds, too much for every attention call.
    @torch.compiler.disable
    def eager_sdpa(*args: Any, **kwargs: Any) -> torch.Tensor:
        return saved[-1](*args, **kwargs)

    @torch.compiler.disable
    def install(module: nn.Module, args: tuple[Any, ...]) -> None:
        saved.append(F.scaled_dot_product_attention)
        F.scaled_dot_product_attention = eager_sdpa

    @torch.compiler.disable
    def restore(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        # always called, also when an earlier pre-hook refused the call before `install` ran (attention
        # modules do not nest, so anything saved is this module's)
        if saved:
            F.scaled_dot_product_attention = saved.pop()

    for module in find_attention_modules(model).values():
        # once per module: a second pair would restore in install order, not in reverse, and leave SDPA
        # pointing at a wrapper that calls itself (a Trainer's validate, predict and fit each set the model up)
        if getattr(module, _SDPA_HOOKED_MARK, False):
            continue
        module.register_forward_pre_hook(install)
        module.register_forward_hook(restore, always_call=True)
        setattr(module, _SDPA_HOOKED_MARK, True)
