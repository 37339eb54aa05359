"""Which Hugging Face attention calls the ring runs on torch's SDPA ring, which on the masked ring, which it refuses.

Under the ring (and across the groups of the hybrid) an attention function's own SDPA call runs on torch's
ring when it is plain causal SDPA. Plain causal attention of any other implementation (eager, flex_attention,
flash attention: the same softmax attention, computed by another kernel) runs on SDPA's ring as well, called
with the function's scale, its mask rebuilt by the ring from positions (causal, per document). A sliding
window shorter than the sequence, logit softcapping and attention sinks run on the masked ring instead (Note
[windowed ring] in :mod:`lightning_cp.attention.masked_ring`), which recomputes the function from its keyword
arguments. That is exact only for functions whose computation is known: SDPA, transformers' flex_attention
and flash attention functions (score terms read from their keyword arguments: scaling, window, softcap,
sinks), and the eager functions of the families listed in :data:`KNOWN_EAGER_MODULES` (read from transformers
5.25: ``scaling · q·kᵀ``, optional ``softcap``, the mask, an fp32 softmax — with gpt-oss's sink column — and
``p·v``). Anything else is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lightning_cp.attention.masked_ring import AttentionVariant
from lightning_cp.attention.ulysses import SHARD_LAYOUT_KWARGS, ULYSSES_ATTN_IMPLEMENTATIONS
from lightning_cp.validation import ContextParallelInputError

#: Attention implementations whose function the ring (alone or in the hybrid) runs, on SDPA's ring or the
#: masked ring: every one Ulysses runs.
RING_ATTN_IMPLEMENTATIONS = ULYSSES_ATTN_IMPLEMENTATIONS

#: Modeling modules whose ``eager_attention_forward`` the masked ring reproduces exactly (each read).
KNOWN_EAGER_MODULES: frozenset[str] = frozenset(
    f"transformers.models.{family}.modeling_{family}"
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt_oss")
)
#: Keyword arguments of an attention function that the ring reads, that do not change attention, or that
#: describe this rank's shard to flash attention (the ring takes the documents from the batch's layout).
_UNDERSTOOD = frozenset(
    {"dropout", "scaling", "sliding_window", "softcap", "s_aux", "is_causal"}
    | {"cache_position", "use_cache", "output_attentions", "output_router_logits"}
    | set(SHARD_LAYOUT_KWARGS)
)


def sinks_of(module: nn.Module, kwargs: dict[str, Any]) -> torch.Tensor | None:
    """The per-head sink logits of a call: gpt-oss passes them as ``s_aux`` and reads ``module.sinks``."""
    if kwargs.get("s_aux") is not None:
        return kwargs["s_aux"]
    sinks = getattr(module, "sinks", None)
    return sinks if isinstance(sinks, torch.Tensor) else None


def ring_variant(
    original: Callable[..., Any],
    implementation: str,
    module: nn.Module,
    query: torch.Tensor,
    window: int | None,
    kwargs: dict[str, Any],
    global_seq_len: int | None,
) -> AttentionVariant | None:
    """What the ring runs for this call: ``None`` when the function's own SDPA call runs torch's ring, else the
    :class:`AttentionVariant` to run, on SDPA's ring when it is plain (:attr:`AttentionVariant.plain`) or else on
    the masked ring.

    Raises :class:`ContextParallelInputError` (the same on every rank: it reads the module and the call) when
    neither ring can run it exactly, naming why and what would.
    """
    name = type(module).__name__
    softcap, sinks = kwargs.get("softcap"), sinks_of(module, kwargs)
    windowed = window is not None and (global_seq_len is None or window < global_seq_len)
    if implementation == "sdpa" and softcap is None and sinks is None and not windowed:
        return None
    what = _describe(implementation, window if windowed else None, softcap, sinks)
    if implementation not in RING_ATTN_IMPLEMENTATIONS:
        raise ContextParallelInputError(  # set after the hooks checked it: no mode knows the function
            f"`{name}` attends with attn_implementation={implementation!r}; the ring and Ulysses run"
            f" {RING_ATTN_IMPLEMENTATIONS}. Build the model with `attn_implementation='sdpa'`."
        )
    if implementation == "eager" and getattr(original, "__module__", None) not in KNOWN_EAGER_MODULES:
        _refuse(
            f"`{name}` attends with the eager function of `{getattr(original, '__module__', original)}`, which the"
            " ring would have to recompute and does not know (it reproduces the eager attention of"
            f" {sorted(module.rsplit('_', 1)[-1] for module in KNOWN_EAGER_MODULES)})"
        )
    if not kwargs.get("is_causal", getattr(module, "is_causal", True)):
        _refuse(f"`{name}` {what} without causal masking; the masked ring is causal only")
    if kwargs.get("dropout"):
        _refuse(f"`{name}` uses attention dropout ({kwargs['dropout']}); set the model's attention dropout to 0")
    unknown = sorted(key for key, value in kwargs.items() if key not in _UNDERSTOOD and value is not None)
    if unknown:
        _refuse(f"`{name}` {what} and passes {unknown} to its attention function, which the ring does not read")
    scaling = kwargs.get("scaling")
    scale = query.size(-1) ** -0.5 if scaling is None else float(scaling)
    return AttentionVariant(scale, window if windowed else None, softcap, sinks)


def _describe(implementation: str, window: int | None, softcap: float | None, sinks: torch.Tensor | None) -> str:
    parts = [f"attn_implementation={implementation!r}"]
    parts += [] if window is None else [f"a sliding window of {window} tokens"]
    parts += [] if softcap is None else [f"logit softcapping ({softcap})"]
    parts += [] if sinks is None else ["attention sinks"]
    return "uses " + ", ".join(parts)


def _refuse(reason: str) -> None:
    raise ContextParallelInputError(
        f"{reason}. Under the ring it would be wrong; Ulysses runs the model's own attention function on whole"
        " sequences: use `cp_mode='ulysses'` (or 'auto')."
    )
