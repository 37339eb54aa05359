"""Transformer Engine attention under CP: TE runs its own ring once it knows the CP group.

TE's ``DotProductAttention`` never calls ``F.scaled_dot_product_attention``, so torch's ring cannot
reach it. Instead TE shards nothing itself and runs its own ring over the group given to
``set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p")``; its
``MultiheadAttention`` and ``TransformerLayer`` pass the call on to every module inside them. Without
that call TE attends over this rank's tokens only, with the global ``cu_seqlens`` of a THD batch.
TE is never imported here: its modules are recognised by the package their class comes from.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

#: The package prefix of Transformer Engine's classes (``transformer_engine.pytorch...``).
TE_PACKAGE = "transformer_engine"


def _is_te_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith(TE_PACKAGE)


def uses_transformer_engine_attention(model: nn.Module) -> bool:
    """Whether ``model`` contains Transformer Engine attention (a TE class named ``*Attention*``)."""
    return any(_is_te_module(module) and "Attention" in type(module).__name__ for module in model.modules())


def te_context_parallel_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost TE modules of ``model`` that take a CP group, by qualified name.

    TE's container modules hand ``set_context_parallel_group`` on to the modules inside them, so
    calling it on the outermost ones reaches every TE attention module exactly once.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") or not parent for parent in found):
            continue
        if _is_te_module(module) and callable(getattr(module, "set_context_parallel_group", None)):
            found[name] = module
    return found


def set_te_context_parallel_group(model: nn.Module, group: dist.ProcessGroup) -> list[str]:
    """Give every TE attention module of ``model`` the CP ``group``; return the names of the modules called.

    TE takes the group, its global ranks and a CUDA stream for the ring's communication (``None``
    without CUDA). Raises ``ValueError`` when ``model`` has no TE module that takes a CP group.
    """
    modules = te_context_parallel_modules(model)
    if not modules:
        raise ValueError(
            f"Found no Transformer Engine module with `set_context_parallel_group` in `{type(model).__name__}`,"
            " so its attention could not run Transformer Engine's context-parallel ring."
        )
    ranks = dist.get_process_group_ranks(group)
    stream = torch.cuda.Stream() if torch.cuda.is_available() else None
    for module in modules.values():
        module.set_context_parallel_group(group, ranks, stream)
    return list(modules)
