"""Checkpoints under CP: replicated models saved and loaded, single files loaded, resumed loaders in step.

Lightning's model-parallel strategies save and load through torch distributed checkpoint (DCP) but
only accept models with DTensor parameters (FSDP2 / TP). Under CP a model may be left replicated —
its gradients are averaged over data × context ranks — so the strategies send such models here. The
files are the same as Lightning's: a DCP directory with ``meta.pt`` (sharded, the default) or one
file (consolidated), so a checkpoint can be resumed with another layout, sharded or not. Replicated
tensors are written once (DCP de-duplicates them) and every rank reads them whole.

Single files (``save_distributed_checkpoint=False``) are loaded here for every model, sharded or not:
Lightning's (2.6) loader fails on a file whose optimizer has no state (plain SGD without momentum) in an
FSDP2 / TP model; see :func:`_load_full_optimizer_state`. And a training loader resumed mid-epoch
draws the rest of that epoch in that epoch's order (:func:`resume_sampler_epoch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.strategies.fsdp import _is_full_checkpoint, _is_sharded_checkpoint
from lightning.fabric.strategies.model_parallel import _has_dtensor_modules, _load_raw_module_state
from lightning.fabric.utilities.data import _set_sampler_epoch
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

if TYPE_CHECKING:
    import lightning.pytorch as pl


def is_replicated_state(state: dict[str, Any]) -> bool:
    """Whether ``state`` holds a model but none with DTensor parameters (so Lightning's own path refuses it)."""
    modules = [value for value in state.values() if isinstance(value, nn.Module)]
    return bool(modules) and not any(_has_dtensor_modules(module) for module in modules)


def loads_here(path: Path, state: dict[str, Any]) -> bool:
    """Whether :func:`load_checkpoint` (rather than Lightning) loads ``path`` into ``state``.

    It does for a replicated model (Lightning refuses those) and for any model from a single file.
    """
    return is_replicated_state(state) or _is_full_checkpoint(path)


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


def load_checkpoint(
    path: Path,
    state: dict[str, Any],
    *,
    strict: bool = True,
    weights_only: bool | None = None,
    optimizer_states_from_list: bool = False,
) -> dict[str, Any]:
    """Load a sharded checkpoint into a replicated model, or a single file into any model, and their optimizers.

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
        metadata = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        _load_raw_module_state(metadata.pop(module_key), module, strict=strict)
        for index, (key, optimizer) in enumerate(optimizers.items()):
            saved = metadata["optimizer_states"][index] if optimizer_states_from_list else metadata.pop(key)
            _load_full_optimizer_state(module, optimizer, saved, strict=strict)
    else:
        raise ValueError(f"{str(path)!r} is neither a distributed checkpoint directory nor a checkpoint file.")
    for key in state.keys() - {module_key} - optimizers.keys():
        if key in metadata:
            state[key] = metadata.pop(key)
        elif strict:
            raise KeyError(f"The checkpoint at {str(path)!r} has no {key!r}.")
    return metadata


def _load_full_optimizer_state(module: nn.Module, optimizer: Optimizer, saved: dict[str, Any], *, strict: bool) -> None:
    """Load one optimizer's whole (unsharded) state, keyed by parameter index (the Trainer's) or name (Fabric's).

    Into a DTensor model the full tensors are scattered to the shards from rank 0, as Lightning does. An
    optimizer without state (plain SGD) has nothing to scatter, and torch's scatter refuses it (it learns
    the device from the state's tensors; Lightning's loader fails earlier, reading the first key of an
    empty ``state``), so only its parameter groups are loaded, which needs no scatter.
    """
    scatter = _has_dtensor_modules(module) and bool(saved["state"])
    options = StateDictOptions(full_state_dict=scatter, broadcast_from_rank0=scatter, strict=strict)
    set_optimizer_state_dict(module, optimizer, _keyed_by_name(saved, module), options=options)


def _keyed_by_name(optimizer_state_dict: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, as ``set_optimizer_state_dict`` wants it.

    Torch's own format (the Trainer's file) numbers the parameters; the parameter groups tell the format
    even when ``state`` is empty.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel, OptimStateKeyType

    params = [param for group in optimizer_state_dict["param_groups"] for param in group["params"]]
    if params and isinstance(params[0], int):
        return FullyShardedDataParallel.rekey_optim_state_dict(
            optimizer_state_dict, OptimStateKeyType.PARAM_NAME, module
        )
    return optimizer_state_dict


def resume_sampler_epoch(dataloader: object, trainer: pl.Trainer) -> None:
    """Give the training loader's sampler the epoch being resumed before Lightning first iterates the loader.

    On resume, Lightning (2.6) creates the training iterator in ``fit_loop.setup_data``, before
    ``on_advance_start`` sets the sampler's epoch, and uses that iterator for the resumed epoch. A plain
    DataLoader draws its indices lazily, after the epoch is set; a loader that draws them when the iterator
    is made — torchdata's ``StatefulDataLoader``, fast-forwarding to its saved position — would finish
    the resumed epoch e (e > 0) in epoch 0's shuffled order. Setting, here, the epoch that
    ``on_advance_start`` sets changes nothing else.
    """
    _set_sampler_epoch(dataloader, trainer.fit_loop.epoch_progress.current.processed)
