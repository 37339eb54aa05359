"""Long context beyond attention: the memory options a strategy applies to the model, and their checks.

CP shards attention, but at long context a step's memory is mostly elsewhere: the logits (see Note
[chunked loss] in :mod:`lightning_cp.chunked_loss`), the activations every decoder layer saves for
backward, and their copies on the device. The options:

- ``chunked_loss``: the causal-LM loss from hidden states, chunk by chunk (:func:`apply_chunked_loss`);
- ``activation_checkpointing``: decoder layers keep only their inputs and are recomputed in backward.
  The recomputation runs inside the CP context (it spans backward), so the ring — or the document
  attention — runs again and the result is exact;
- ``offload_activations``: on CUDA, tensors saved for backward wait in pinned host memory
  (:func:`offload_activations`); on CPU there is nothing to offload to, and it says so once.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_cp.chunked_loss import DEFAULT_CHUNK_TOKENS, apply_chunked_loss


def chunk_tokens_of(chunked_loss: bool | int) -> int | None:
    """Tokens per chunk for a ``chunked_loss`` option: ``True`` → the default, an int → itself, off → ``None``."""
    if chunked_loss is False or chunked_loss is None:
        return None
    if chunked_loss is True:
        return DEFAULT_CHUNK_TOKENS
    if isinstance(chunked_loss, int) and chunked_loss > 0:
        return chunked_loss
    raise ValueError(f"`chunked_loss` must be True, False or a positive number of tokens, got {chunked_loss!r}.")


def apply_activation_checkpointing(model: nn.Module) -> list[str]:
    """Recompute the decoder layers of every Hugging Face model in ``model`` in backward (non-reentrant).

    Returns the names of the models changed; raises ``ValueError`` when there is none that supports it.
    """
    from transformers import PreTrainedModel

    changed = []
    for name, module in model.named_modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            if not module.is_gradient_checkpointing:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            changed.append(name or type(module).__name__)
    if not changed:
        raise ValueError(
            f"`activation_checkpointing` found no Hugging Face model supporting gradient checkpointing in"
            f" `{type(model).__name__}`. For a model of your own, call its layers through"
            " `torch.utils.checkpoint.checkpoint(layer, ..., use_reentrant=False)` yourself."
        )
    return changed


def apply_memory_options(model: nn.Module, *, chunked_loss: bool | int, activation_checkpointing: bool) -> None:
    """Apply the model-side memory options (see the module docstring) to ``model``; the same for every API."""
    tokens = chunk_tokens_of(chunked_loss)
    if tokens is not None:
        apply_chunked_loss(model, tokens)
    if activation_checkpointing:
        apply_activation_checkpointing(model)


_warned_cpu_offload = False


@contextmanager
def offload_activations(device: torch.device) -> Iterator[None]:
    """While open, tensors saved for backward on ``device`` (CUDA) are kept in pinned host memory.

    On CPU the activations already live in host memory: nothing happens, and a warning says so once.
    """
    global _warned_cpu_offload
    if device.type != "cuda":
        if not _warned_cpu_offload:
            _warned_cpu_offload = True
            warnings.warn(
                "lightning_cp: `offload_activations=True` does nothing on CPU (activations already live in host"
                " memory); it keeps saved activations in pinned host memory on CUDA.",
                stacklevel=2,
            )
        yield
        return
    with torch.autograd.graph.save_on_cpu(pin_memory=True):
        yield
