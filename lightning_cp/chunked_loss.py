"""The causal-LM loss of a Hugging Face model computed chunk by chunk: the full logits never exist.

Note [chunked loss]
-------------------
At long context the logits dominate a step's memory: ``[tokens, vocab]`` in fp32, then the loss's
log-softmax and the gradient of both. A causal LM's loss needs none of them whole. For every chunk of
``chunk_tokens`` positions, the forward computes that chunk's logits from the final hidden states,
adds its cross-entropy to a sum and drops them; the backward recomputes each chunk's logits and turns
``softmax - one_hot`` straight into the gradients of the hidden states and of the head's weight (a
tied embedding receives it like any other use). Peak extra memory is one chunk's logits.

:func:`apply_chunked_loss` keeps the model's own ``forward`` (every keyword, ``logits_to_keep``, the
base model): while a call with ``labels`` runs, ``lm_head`` hands the loss the hidden states instead of
logits, and the model's ``loss_function`` (made :func:`chunked_causal_lm_loss`, which CP's token-correct
wrapper then wraps as it wraps HF's) computes the loss from them. The output's ``logits`` are ``None``.
A model whose ``forward`` changes the logits between ``lm_head`` and the loss (soft-capping, scaling)
cannot be chunked this way and is refused.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cp.sharding.batch import IGNORE_INDEX

#: Positions whose logits exist at once, by default (256 × a 128k vocabulary × 4 bytes = 128 MiB); with
#: it the loss stage of an 8192-token step takes 0.044× the memory of full logits (benchmarks/memory_options.py).
DEFAULT_CHUNK_TOKENS = 256


@dataclass
class HiddenStatesForLoss:
    """What ``lm_head`` returns while a chunked loss is computed: the inputs of the logits, not the logits."""

    hidden_states: torch.Tensor
    head: nn.Linear
    chunk_tokens: int


class _DeferredHead(nn.Module):
    def __init__(self, head: nn.Linear, chunk_tokens: int) -> None:
        super().__init__()
        self.head = head
        self.chunk_tokens = chunk_tokens

    def forward(self, hidden_states: torch.Tensor) -> HiddenStatesForLoss:
        return HiddenStatesForLoss(hidden_states, self.head, self.chunk_tokens)


class _ChunkedCrossEntropySum(torch.autograd.Function):
    """Sum of cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets``, one chunk at a time."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        chunk_tokens: int,
    ) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.size(0), chunk_tokens):
            logits = F.linear(hidden[start : start + chunk_tokens], weight, bias).float()
            targets_chunk = targets[start : start + chunk_tokens]
            total += F.cross_entropy(logits, targets_chunk, ignore_index=IGNORE_INDEX, reduction="sum")
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_tokens = chunk_tokens
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        weight_fp32 = weight.float()  # once, not per chunk (a copy of the whole head for bf16 weights)
        for start in range(0, hidden.size(0), ctx.chunk_tokens):
            chunk = hidden[start : start + ctx.chunk_tokens]
            targets_chunk = targets[start : start + ctx.chunk_tokens]
            grad_logits = torch.softmax(F.linear(chunk, weight, bias).float(), dim=-1)
            valid = targets_chunk != IGNORE_INDEX
            rows = valid.nonzero().squeeze(-1)
            grad_logits[rows, targets_chunk[rows]] -= 1.0
            grad_logits *= valid.unsqueeze(-1) * grad_total
            grad_hidden[start : start + ctx.chunk_tokens] = (grad_logits @ weight_fp32).to(hidden.dtype)
            grad_weight += grad_logits.transpose(0, 1) @ chunk.float()
            if grad_bias is not None:
                grad_bias += grad_logits.sum(0)
            del grad_logits  # before the next chunk's softmax exists: two chunks of logits at most, not three
        return (
            grad_hidden,
            grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None,
            None,
        )


def chunked_logits(
    hidden_states: torch.Tensor, lm_head: nn.Linear, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
) -> HiddenStatesForLoss:
    """A stand-in for ``lm_head(hidden_states)`` that the token-correct losses compute chunk by chunk.

    For a loss of your own under the chunked loss: pass it where logits go, e.g.
    ``strategy.token_correct_loss(chunked_logits(hidden, model.lm_head), batch["labels"])``.
    """
    return HiddenStatesForLoss(hidden_states, lm_head, chunk_tokens)


def chunked_token_loss_sum(logits: HiddenStatesForLoss, targets: torch.Tensor) -> torch.Tensor:
    """Sum of cross-entropy over the valid ``targets`` (aligned with positions), one chunk of logits at a time."""
    hidden = logits.hidden_states
    return _ChunkedCrossEntropySum.apply(
        hidden.reshape(-1, hidden.size(-1)),
        logits.head.weight,
        logits.head.bias,
        targets.reshape(-1).to(hidden.device),
        logits.chunk_tokens,
    )


def chunked_causal_lm_loss(
    logits: torch.Tensor | HiddenStatesForLoss,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = IGNORE_INDEX,
    shift_labels: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Hugging Face's ``ForCausalLMLoss`` (same arguments, same value), chunked when given hidden states.

    Labels are shifted unless ``shift_labels`` are given; the sum of token losses is divided by
    ``num_items_in_batch``, or by the number of valid targets. Real logits (a direct call) go to HF's loss.
    """
    if not isinstance(logits, HiddenStatesForLoss):
        from transformers.loss.loss_utils import ForCausalLMLoss  # HF's own, for real logits

        return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels, **kwargs)
    if ignore_index != IGNORE_INDEX:
        raise ValueError(f"The chunked loss ignores labels equal to {IGNORE_INDEX}, got ignore_index={ignore_index}.")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    total = chunked_token_loss_sum(logits, shift_labels)
    count = (shift_labels != ignore_index).sum() if num_items_in_batch is None else num_items_in_batch
    if isinstance(count, torch.Tensor):
        count = count.to(total.device)
    return total / count


def _is_causal_lm(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel) and type(module).__name__.endswith("ForCausalLM")


#: Between ``lm_head`` and the loss, the logits must reach the loss untouched.
_HEAD_TO_LOSS = re.compile(r"self\.lm_head\((?P<between>.*?)self\.loss_function\(", re.DOTALL)


def check_chunkable(model: nn.Module) -> None:
    """Refuse, with the reason, a causal LM whose loss cannot be computed from hidden states chunk by chunk."""
    name = type(model).__name__
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"`{name}` has no `lm_head` linear layer ({type(head).__name__}), so its loss cannot be chunked:"
            " turn `chunked_loss` off for it."
        )
    match = _HEAD_TO_LOSS.search(inspect.getsource(type(model).forward))
    between = match.group("between") if match else ""
    changed = re.search(r"\blogits\s*(=|\*=|/=|\+=)", between.split("\n", 1)[-1]) if match else None
    if match is None or changed is not None:
        reason = "its forward does not pass lm_head's output straight to self.loss_function"
        if changed is not None:
            reason = f"its forward changes the logits before the loss (`{changed.group(0)}…`: soft-capping or scaling)"
        raise ValueError(
            f"`{name}` cannot use the chunked loss: {reason}. Computing the loss from hidden states would skip"
            " that step and give another loss. Turn `chunked_loss` off for this model."
        )


def apply_chunked_loss(model: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[str]:
    """Make every Hugging Face causal LM in ``model`` compute its loss chunk by chunk (Note [chunked loss]).

    ``model(**batch).loss`` keeps its value and gradients (fp32 tolerance) while the full logits never
    exist; calls without ``labels`` are untouched (they return logits). Applying twice is harmless.
    Returns the names of the models changed; raises ``ValueError`` for one that cannot be chunked.
    """
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"`chunked_loss` takes a positive number of tokens per chunk, got {chunk_tokens!r}.")
    changed = []
    for name, module in model.named_modules():
        if not _is_causal_lm(module):
            continue
        check_chunkable(module)
        if not getattr(module, "_lightning_cp_chunked", False):
            module.forward = _chunked_forward(module, module.forward)
            module._lightning_cp_chunked = True
        module._lightning_cp_chunk_tokens = chunk_tokens
        module.loss_function = chunked_causal_lm_loss
        changed.append(name or type(module).__name__)
    if not changed:
        raise ValueError(
            f"`chunked_loss` found no Hugging Face `*ForCausalLM` model in `{type(model).__name__}`; it chunks the"
            " loss such models compute from `labels`. For a loss of your own, compute it from hidden states with"
            " `lightning_cp.chunked_loss.chunked_causal_lm_loss`."
        )
    return changed


def _chunked_forward(model: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(forward)
    def chunked_forward(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("labels") is None:
            return forward(*args, **kwargs)
        head = model.lm_head
        model.lm_head = _DeferredHead(head, model._lightning_cp_chunk_tokens)
        try:
            output = forward(*args, **kwargs)
        finally:
            model.lm_head = head
        # A new output without the stand-in: the logits were never materialised (``logits`` is None).
        return type(output)(**{key: value for key, value in output.items() if key != "logits"})

    return chunked_forward
