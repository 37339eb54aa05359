"""Saving and loading checkpoints of models that are replicated (not sharded) across the CP group.

Lightning's model-parallel strategies save and load through torch distributed checkpoint (DCP) but
only accept models with DTensor parameters (FSDP2 / TP). Under CP a model may be left replicated —
its gradients are averaged over data × context ranks — so the strategies send such models here. The
files are the same as Lightning's: a DCP directory with ``meta.pt`` (sharded, the default) or one
file (consolidated), so a checkpoint can be resumed with another layout, sharded or not. Replicated
tensors are written once (DCP de-duplicates them) and every rank reads them whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.strategies.fsdp import _is_full_checkpoint, _is_sharded_checkpoint
from lightning.fabric.strategies.model_parallel import _has_dtensor_modules
from lightning.fabric.utilities.load import _METADATA_FILENAME
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.optim import Optimizer


def is_replicated_state(state: dict[str, Any]) -> bool:
    """Whether ``state`` holds a model but none with DTensor parameters (so Lightning's own path refuses it)."""
    modules = [value for value in state.values() if isinstance(value, nn.Module)]
    return bool(modules) and not any(_has_dtensor_modules(module) for module in modules)


def _single_module(state: dict[str, Any]) -> tuple[str, nn.Module]:
    modules = [(key, value) for key, value in state.items() if isinstance(value, nn.Module)]
    if len(modules) != 1:
        raise ValueError(f"A checkpoint state must hold exactly one model, got {len(modules)}.")
    return modules[0]


def save_replicated_checkpoint(path: Path, state: dict[str, Any], *, consolidated: bool, rank: int) -> None:
    """Save a Fabric-style ``state`` (a replicated model, optimizers, anything else as metadata) to ``path``."""
    module_key, module = _single_module(state)
    options = StateDictOptions(full_state_dict=consolidated, cpu_offload=True)
    tensors: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for key, value in state.items():
        if key == module_key:
            tensors[key] = get_model_state_dict(module, options=options)
        elif isinstance(value, Optimizer):
            tensors[key] = get_optimizer_state_dict(module, value, options=options)
        else:
            metadata[key] = value.state_dict() if hasattr(value, "state_dict") else value
    if consolidated:
        if rank == 0:
            torch.save({**tensors, **metadata}, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    dcp.save(tensors, checkpoint_id=path)
    if rank == 0:
        torch.save(metadata, path / _METADATA_FILENAME)


def load_replicated_checkpoint(
    path: Path,
    state: dict[str, Any],
    *,
    strict: bool = True,
    weights_only: bool | None = None,
    optimizer_states_from_list: bool = False,
) -> dict[str, Any]:
    """Load a sharded or consolidated checkpoint into the replicated model and optimizers of ``state``.

    Other keys of ``state`` are filled from the checkpoint's metadata; the metadata not asked for is
    returned (the Trainer reads its loops, callbacks and epoch from it). ``optimizer_states_from_list``:
    the Trainer's single-file format, with optimizer states in a list under ``"optimizer_states"``.
    """
    module_key, module = _single_module(state)
    optimizers = {key: value for key, value in state.items() if isinstance(value, Optimizer)}
    if _is_sharded_checkpoint(path):
        tensors = {module_key: get_model_state_dict(module)}
        tensors.update({key: get_optimizer_state_dict(module, optimizer) for key, optimizer in optimizers.items()})
        dcp.load(tensors, checkpoint_id=path)
        set_model_state_dict(module, tensors[module_key], options=StateDictOptions(strict=strict))
        for key, optimizer in optimizers.items():
            set_optimizer_state_dict(module, optimizer, tensors[key])
        metadata = torch.load(path / _METADATA_FILENAME, weights_only=weights_only)
    elif _is_full_checkpoint(path):
        metadata = torch.load(path, map_location="cpu", weights_only=weights_only)
        module.load_state_dict(metadata.pop(module_key), strict=strict)
        for index, (key, optimizer) in enumerate(optimizers.items()):
            saved = metadata["optimizer_states"][index] if optimizer_states_from_list else metadata.pop(key)
            if isinstance(saved["param_groups"][0]["params"][0], int):  # torch's own format (the Trainer's file)
                optimizer.load_state_dict(saved)
            else:  # keyed by parameter name
                set_optimizer_state_dict(module, optimizer, saved, options=StateDictOptions(strict=strict))
    else:
        raise ValueError(f"{str(path)!r} is neither a distributed checkpoint directory nor a checkpoint file.")
    for key in state.keys() - {module_key} - optimizers.keys():
        if key in metadata:
            state[key] = metadata.pop(key)
        elif strict:
            raise KeyError(f"The checkpoint at {str(path)!r} has no {key!r}.")
    return metadata
