"""How long a sequence fits per rank, for each memory option: ``python -m lightning_cp plan``.

The formula (fp32 training of a decoder-only causal LM, one sequence per step). A rank holds
``s = S / cp`` of the ``S`` tokens; ``h`` is the hidden size, ``I`` the MLP width, ``L`` the number of
decoder layers, ``V`` the vocabulary, ``P`` the number of parameters, ``c`` the chunked loss's tokens per
chunk::

    fixed         = P × 16 / F                        weights, gradients, AdamW's two moments (4 B each),
                                                      sharded over F ranks with FSDP2 (F = 1: replicated)
    layer(s)      = s × (9 h + 5.5 I) × 4             what one decoder layer saves for backward
    loss(n)       = n × V × 4 × 3                     logits, their softmax and a gradient, [n, V] fp32 each
                  + 2 × V × h × 4                     embedding and head weight gradients as computed

    step, plain                   = L × layer(s)  +  loss(s)
    step, chunked loss            = L × layer(s)  +  loss(min(s, c))
    step, + activation checkpoint = L × s × h × 4 +  max(loss(min(s, c)), 2 × layer(s))
    fits                          = fixed + step ≤ memory per rank

Without checkpointing every layer's activations are still alive when the loss runs, so the terms add
up. With it, a layer keeps only its input (``s × h × 4``), and the two peaks do not overlap: the loss
(with the chunk's logits) comes first, then one layer at a time is recomputed in backward and holds its
activations and their gradients (``2 × layer``). The longest sequence is the largest ``S`` (a multiple of
``2·cp``, the padding of the load-balanced layout) whose step fits. Left out: the runtime itself (CUDA
context, libraries) and allocator fragmentation — keep a margin.

Where the constants come from. ``9 h + 5.5 I`` counts the values a Hugging Face Llama model saves for
backward, per decoder layer (saved-tensor hooks; ``tests/test_planner.py`` checks it on another shape).
The three ``[n, V]`` tensors and the other terms were checked against the peak step memory (RSS, CPU,
fp32) of ``benchmarks/memory_options.py``, which prints the formula's prediction next to every
measurement (within 10 % at 8192 tokens, 13 % on the longest sequence), and ``tests/test_planner.py``
checks it against a measured step of another shape (±30 %). A single chunk (``s ≤ c``) peaks lower
(two ``[n, V]`` tensors): the formula then over-estimates.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lightning_cp.chunked_loss import DEFAULT_CHUNK_TOKENS

#: fp32 values of activations and logits.
BYTES_PER_VALUE = 4
#: Weights, gradients and AdamW's two moments, fp32.
FIXED_BYTES_PER_PARAMETER = 16
#: Values saved per token per decoder layer, per unit of the hidden size (norms, q/k/v/o, attention, residuals).
ACT_PER_HIDDEN = 9.0
#: Values saved per token per decoder layer, per unit of the MLP width (gate, up, SiLU, their product).
ACT_PER_MLP = 5.5
#: ``[tokens, vocab]`` fp32 tensors alive at the loss's peak (logits, their softmax, a gradient), measured.
LOGITS_COPIES = 3
#: A layer recomputed in backward holds its activations and their gradients at once.
RECOMPUTED_LAYER_FACTOR = 2

#: The option sets the planner compares, in order: (name, chunked loss, activation checkpointing).
OPTION_SETS = (
    ("plain", False, False),
    ("chunked_loss", True, False),
    ("chunked_loss + activation_checkpointing", True, True),
)


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only causal LM that its step memory depends on."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    parameters: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the sizes from a Hugging Face config; the parameters are counted on a model built on ``meta``."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return cls(
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            vocab=config.vocab_size,
            parameters=sum(parameter.numel() for parameter in model.parameters()),
        )


@dataclass(frozen=True)
class PlanRow:
    """One option set's verdict: the longest sequence that fits, and the memory per rank it then uses."""

    option: str
    longest_sequence: int
    used_bytes: int


def fixed_bytes(shape: ModelShape, fsdp: int = 1) -> int:
    """Memory held before a step starts: parameters, their gradients and the optimizer's state, over ``fsdp`` ranks."""
    return math.ceil(shape.parameters * FIXED_BYTES_PER_PARAMETER / fsdp)


def layer_bytes(shape: ModelShape, local_tokens: int) -> int:
    """What one decoder layer saves for backward for ``local_tokens`` positions (per layer of the whole model)."""
    per_token = ACT_PER_HIDDEN * shape.hidden + ACT_PER_MLP * shape.intermediate
    return math.ceil(local_tokens * per_token * BYTES_PER_VALUE)


def loss_bytes(shape: ModelShape, tokens: int) -> int:
    """The loss's peak with ``tokens`` positions of logits at once, and the weight gradients it produces."""
    return (LOGITS_COPIES * tokens + 2 * shape.hidden) * shape.vocab * BYTES_PER_VALUE


def step_bytes(shape: ModelShape, local_tokens: int, chunk_tokens: int | None, checkpointing: bool) -> int:
    """Peak memory a training step adds on a rank holding ``local_tokens`` (the formula of the module docstring).

    ``chunk_tokens`` is ``None`` without the chunked loss. What is held before the step is not included
    (:func:`fixed_bytes`); this is what ``benchmarks/memory_options.py`` measures.
    """
    loss = loss_bytes(shape, local_tokens if chunk_tokens is None else min(local_tokens, chunk_tokens))
    if not checkpointing:
        return shape.layers * layer_bytes(shape, local_tokens) + loss
    inputs = shape.layers * local_tokens * shape.hidden * BYTES_PER_VALUE
    return inputs + max(loss, RECOMPUTED_LAYER_FACTOR * layer_bytes(shape, local_tokens))


def longest_sequence(
    shape: ModelShape, cp: int, budget_bytes: int, chunk_tokens: int | None, checkpointing: bool, fsdp: int = 1
) -> int:
    """The longest sequence (a multiple of ``2·cp``) whose step fits ``budget_bytes`` per rank; 0 if none does."""
    available = budget_bytes - fixed_bytes(shape, fsdp)
    if step_bytes(shape, 2, chunk_tokens, checkpointing) > available:
        return 0
    low, high = 2, 2
    while step_bytes(shape, high, chunk_tokens, checkpointing) <= available:  # the step grows with the tokens
        low, high = high, 2 * high
    while high - low > 2:  # local tokens stay even: the global length stays a multiple of 2·cp
        middle = (low + high) // 4 * 2
        if step_bytes(shape, middle, chunk_tokens, checkpointing) <= available:
            low = middle
        else:
            high = middle
    return low * cp


def plan(
    model: Any, cp: int, memory_gib: float, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, fsdp: int = 1
) -> tuple[ModelShape, list[PlanRow]]:
    """The longest sequence per option set for ``model`` (a config, a :class:`ModelShape` or a spec) at ``cp``.

    ``memory_gib`` is the memory of one rank; ``chunk_tokens`` the chunked loss's tokens per chunk; ``fsdp``
    the ranks the parameters, gradients and optimizer state are sharded over (1: replicated).
    """
    if cp < 1 or fsdp < 1 or memory_gib <= 0:
        raise ValueError(
            f"`cp` and `fsdp` must be at least 1 and `memory_gib` positive, got cp={cp}, fsdp={fsdp},"
            f" memory_gib={memory_gib}."
        )
    if isinstance(model, str):
        model = config_from_spec(model)
    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    budget = int(memory_gib * 2**30)
    rows = []
    for option, chunked, checkpointing in OPTION_SETS:
        chunk = chunk_tokens if chunked else None
        longest = longest_sequence(shape, cp, budget, chunk, checkpointing, fsdp)
        used = fixed_bytes(shape, fsdp) + step_bytes(shape, longest // cp, chunk, checkpointing)
        rows.append(PlanRow(option, longest, used))
    return shape, rows


def render(shape: ModelShape, rows: list[PlanRow], cp: int, memory_gib: float, chunk_tokens: int, fsdp: int = 1) -> str:
    """The planner's report as printed by ``python -m lightning_cp plan``."""
    sharding = "replicated" if fsdp == 1 else f"sharded over {fsdp} ranks (FSDP2)"
    lines = [
        f"lightning_cp plan: cp={cp}, {memory_gib:g} GiB per rank, fp32, AdamW, model {sharding}",
        f"  model: {shape.layers} layers, hidden {shape.hidden}, MLP {shape.intermediate}, vocab {shape.vocab},"
        f" {shape.parameters / 1e6:.1f}M parameters",
        f"  fixed per rank (weights, gradients, optimizer): {fixed_bytes(shape, fsdp) / 2**30:.2f} GiB",
        f"  {'option':<56}{'longest sequence':>18}{'GiB/rank used':>15}",
    ]
    for row in rows:
        name = row.option.replace("chunked_loss", f"chunked_loss ({chunk_tokens} tokens)")
        used = f"{row.used_bytes / 2**30:.2f}" if row.longest_sequence else "-"
        lines.append(f"  {name:<56}{row.longest_sequence:>18}{used:>15}")
    if rows[-1].longest_sequence == 0:
        lines.append("  (nothing fits: the fixed cost alone leaves too little; shard the model with --fsdp)")
    lines.append("formula and measured constants: lightning_cp/planner.py (checked in benchmarks/memory_options.py)")
    return "\n".join(lines)


def config_from_spec(spec: str) -> Any:
    """A Hugging Face config from a ``config.json``, a local model folder or a cached hub id (no weights)."""
    from transformers import AutoConfig

    path = Path(spec)
    if path.is_file():
        config_dict = json.loads(path.read_text())
        return AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    return AutoConfig.from_pretrained(spec)
