"""Model hooks that make attention modules correct under context parallelism.

* :func:`attach_context_parallel_hooks`: while ring attention is switched on, every self-attention
  module drops its explicit mask (built from the local shard, so meaningless) and runs causal.
  Outside CP the hooks step aside, so the same model still works with masks for evaluation or
  generation.
* :func:`attach_cp_sdpa_hooks`: with ``torch.compile`` per layer, Dynamo could trace SDPA on plain
  local tensors and each rank would attend only to its own shard. The hook makes SDPA a graph break,
  so the ring's SDPA (which re-wraps the local Q/K/V as sequence-sharded DTensors) runs eagerly.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.attention.switch import active_context_parallel
from lightning_cp.validation import ContextParallelInputError

#: Hugging Face attention implementations whose attention goes through ``F.scaled_dot_product_attention``.
_RING_ATTN_IMPLEMENTATIONS = ("sdpa",)
_HOOKED_MARK = "_lightning_cp_hooked"


def find_attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Self-attention modules of ``model`` by qualified name.

    A module counts when it is named ``self_attn`` (the Hugging Face decoder convention) or its class
    name ends in ``Attention`` and it declares ``is_causal``; cross-attention (a name with ``cross``
    or ``encoder_attn``) and modules nested in one already found are left out.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") for parent in found):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if "cross" in leaf or leaf == "encoder_attn":
            continue
        if leaf == "self_attn" or (type(module).__name__.endswith("Attention") and hasattr(module, "is_causal")):
            found[name] = module
    return found


def _check_attn_implementation(name: str, module: nn.Module) -> None:
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if implementation is not None and implementation not in _RING_ATTN_IMPLEMENTATIONS:
        raise ContextParallelInputError(
            f"Attention module `{name}` uses attn_implementation={implementation!r}, which does not go through"
            " `F.scaled_dot_product_attention`, so it would attend only to its own shard under context"
            " parallelism. Build the model with `attn_implementation='sdpa'`."
        )


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


def _check_window(module: nn.Module, global_seq_len: int | None) -> None:
    window = sliding_window_of(module)
    if window is not None and global_seq_len is not None and window < global_seq_len:
        raise ContextParallelInputError(
            f"`{type(module).__name__}` uses a sliding window of {window} tokens, shorter than the sequence"
            f" ({global_seq_len}). Context-parallel attention is plain causal and would attend beyond the window."
            " Use sequences no longer than the window, or a model without sliding-window attention."
        )


def _mask_arg_index(module: nn.Module) -> int | None:
    parameters = list(inspect.signature(module.forward).parameters)
    return parameters.index("attention_mask") if "attention_mask" in parameters else None


def _causal_pre_hook(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    active = active_context_parallel()
    if active is None:
        return None
    _check_window(module, active.global_seq_len)
    causal = bool(getattr(module, "is_causal", True))
    if not causal and active.load_balance and active.documents is None:
        raise ContextParallelInputError(
            f"`{type(module).__name__}` is not causal (is_causal=False); context parallelism with load balancing"
            " only supports causal attention. Turn load balancing off for bidirectional attention."
        )
    index = getattr(module, "_lightning_cp_mask_index", None)
    if index is not None and index < len(args):
        args = (*args[:index], None, *args[index + 1 :])
    if "attention_mask" in kwargs or index is None or index >= len(args):
        kwargs["attention_mask"] = None
    kwargs["is_causal"] = causal
    return args, kwargs


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
    """Make every self-attention module of ``model`` run causal without a mask while CP is on.

    Also makes the outermost modules that take ``position_ids`` refuse to run under CP without them:
    positions made by the model would restart at 0 in every shard. Returns the names of the attention
    modules hooked (attaching twice is harmless: a module is hooked once). Raises a
    ``ContextParallelInputError`` (a ``ValueError``) for a Hugging Face model whose attention
    implementation bypasses SDPA.
    """
    for module in _outermost_position_aware_models(model):
        if not hasattr(module, "_lightning_cp_position_index"):
            parameters = list(inspect.signature(module.forward).parameters)
            module._lightning_cp_position_index = parameters.index("position_ids")
            module.register_forward_pre_hook(_require_position_ids, with_kwargs=True)
    modules = find_attention_modules(model)
    for name, module in modules.items():
        _check_attn_implementation(name, module)
        if getattr(module, _HOOKED_MARK, False):
            continue
        module._lightning_cp_mask_index = _mask_arg_index(module)
        module.register_forward_pre_hook(_causal_pre_hook, with_kwargs=True)
        setattr(module, _HOOKED_MARK, True)
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
        F.scaled_dot_product_attention = saved.pop()

    for module in find_attention_modules(model).values():
        module.register_forward_pre_hook(install)
        module.register_forward_hook(restore, always_call=True)
