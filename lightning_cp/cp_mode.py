"""Which CP mechanism runs a model: the ``cp_mode`` option, and what ``"auto"`` picks and why.

* ``"ring"``: torch's ring of key/value shards for plain causal attention (causal or per document), any number
  of heads, also of eager, flex and flash attention functions; sliding windows shorter than the sequence,
  softcapping and sinks (through transformers' attention interface, unpacked rows and packed documents) on
  the masked ring (Note [windowed ring]).
* ``"ulysses"``: an all-to-all of heads (Note [Ulysses] in :mod:`lightning_cp.attention.ulysses`). Runs
  the model's own attention function (sdpa, eager, flex or flash) on whole sequences, so windows, softcapping
  and sinks are exact; the heads must split over the CP ranks.
* ``"hybrid"``: Ulysses inside groups of ``ulysses_size`` ranks, the ring (or the masked ring) across them:
  more ranks than heads, for models the ring can run.
* ``"auto"`` (default): Ulysses when the heads allow it (it moves each token's q/k/v/output once per
  layer instead of K/V ``cp - 1`` times, and runs every attention variant); else the hybrid with the
  largest Ulysses group the heads allow, if the ring can run the model; else the ring.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from lightning_cp.attention.alibi import alibi_heads, is_alibi_attention
from lightning_cp.attention.interface import sliding_window_of, uses_attention_interface
from lightning_cp.attention.ring_variants import RING_ATTN_IMPLEMENTATIONS
from lightning_cp.attention.ulysses import ULYSSES_ATTN_IMPLEMENTATIONS, ulysses_head_error, ulysses_sizes_that_work
from lightning_cp.validation import ContextParallelInputError

CP_MODES: tuple[str, ...] = ("auto", "ring", "ulysses", "hybrid")


def validate_cp_mode(cp_mode: str, ulysses_size: int | None) -> None:
    """Refuse an unknown ``cp_mode`` or a ``ulysses_size`` that does not go with it, before any process starts."""
    match cp_mode:
        case "auto" | "ring" | "ulysses":
            if ulysses_size is not None:
                raise ValueError(
                    f"`ulysses_size` sets the Ulysses group of cp_mode='hybrid'; with cp_mode={cp_mode!r} leave it"
                    f" out (got ulysses_size={ulysses_size})."
                )
        case "hybrid":
            if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1:
                raise ValueError(
                    "cp_mode='hybrid' needs `ulysses_size`: the ranks of each Ulysses group (a positive divisor"
                    f" of cp_size), got {ulysses_size!r}."
                )
        case _:
            raise ValueError(f"`cp_mode` must be one of {CP_MODES}, got {cp_mode!r}.")


@dataclass(frozen=True)
class AttentionTraits:
    """What decides which mechanism can run one attention module exactly."""

    name: str
    #: Query and key/value heads on one tensor-parallel rank (``None``: not known from the module).
    query_heads: int | None
    kv_heads: int | None
    implementation: str | None
    #: Whether its modeling code picks the attention function from transformers' registry.
    interface: bool
    window: int | None
    softcap: float | None
    sinks: bool
    #: ALiBi folded into the attention mask (Falcon with ``alibi=True``): dropping the mask would drop it.
    alibi: bool = False

    def ring_obstacle(self) -> str | None:
        """Why the ring cannot run this module at any length, or ``None``.

        Through transformers' attention interface, plain causal eager, flex and flash attention run on SDPA's
        ring, and softcapping, sinks and sliding windows on the masked ring (Note [windowed ring]; which eager
        functions it reproduces is checked when they run).
        """
        if self.alibi:
            return f"`{self.name}` adds ALiBi position biases through its attention mask"
        if self.implementation not in (None, "sdpa") and not (
            self.interface and self.implementation in RING_ATTN_IMPLEMENTATIONS
        ):
            return (
                f"`{self.name}` attends with attn_implementation={self.implementation!r} (the ring runs SDPA, and"
                f" {RING_ATTN_IMPLEMENTATIONS} through transformers' attention interface)"
            )
        if self.softcap is not None and not self.interface:
            return f"`{self.name}` softcaps its logits (softcap={self.softcap}) outside the attention interface"
        if self.sinks and not self.interface:
            return f"`{self.name}` has attention sinks outside the attention interface"
        return None

    def ulysses_obstacle(self, size: int, heads_required: bool = True) -> str | None:
        """Why ``size`` Ulysses ranks cannot run this module, or ``None``.

        A module that does not declare its heads is an obstacle only with ``heads_required`` (``"auto"``
        then prefers the ring, which runs any heads); asked for explicitly, Ulysses checks them when it runs.
        """
        if self.alibi:
            return f"`{self.name}` adds ALiBi position biases through its attention mask"
        if self.implementation not in (None, "sdpa") and not (
            self.interface and self.implementation in ULYSSES_ATTN_IMPLEMENTATIONS
        ):
            return f"`{self.name}` attends with attn_implementation={self.implementation!r}"
        if self.window is not None and not self.interface:
            return f"`{self.name}` has a sliding window but does not use transformers' attention interface"
        if self.query_heads is None or self.kv_heads is None:
            return f"`{self.name}` does not say how many heads it has" if heads_required else None
        error = ulysses_head_error(self.query_heads, self.kv_heads, size)
        return None if error is None else f"`{self.name}`: {error}"


def _heads(module: nn.Module, tensor_parallel_size: int) -> tuple[int | None, int | None]:
    config = getattr(module, "config", None)
    query = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None)
    if query is None and is_alibi_attention(module):
        query = alibi_heads(module)  # MPT's `n_heads`
    kv = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None)
    if kv is None and getattr(config, "multi_query", False):
        kv = 1  # GPTBigCode / Falcon multi-query attention
    if kv is None and isinstance(query, int) and isinstance(getattr(module, "num_key_value_groups", None), int):
        kv = query // module.num_key_value_groups
    if not isinstance(query, int):
        return None, None
    kv = kv if isinstance(kv, int) else query
    return query // tensor_parallel_size, max(kv // tensor_parallel_size, 1)


def attention_traits(name: str, module: nn.Module, tensor_parallel_size: int = 1) -> AttentionTraits:
    """Read a module's :class:`AttentionTraits` from it and its config (Hugging Face conventions)."""
    config = getattr(module, "config", None)
    query, kv = _heads(module, tensor_parallel_size)
    softcap = getattr(module, "attn_logit_softcapping", None) or getattr(config, "attn_logit_softcapping", None)
    return AttentionTraits(
        name=name,
        query_heads=query,
        kv_heads=kv,
        # hand-written ALiBi (Bloom, MPT) runs by its own core under every mechanism (Note [hand-written ALiBi])
        implementation=None if is_alibi_attention(module) else getattr(config, "_attn_implementation", None),
        interface=uses_attention_interface(module),
        window=sliding_window_of(module),
        softcap=softcap,
        sinks=isinstance(getattr(module, "sinks", None), nn.Parameter),
        alibi=bool(getattr(config, "alibi", False)),
    )


@dataclass(frozen=True)
class Mechanism:
    """The CP mechanism chosen for a model, and why (for the line printed at start)."""

    name: str
    #: Ranks of each Ulysses group: the CP size for Ulysses, 1 for the ring.
    ulysses_size: int
    reason: str

    def describe(self, cp_size: int) -> str:
        """E.g. ``attention by hybrid (Ulysses 2 × ring 2): ...``."""
        match self.name:
            case "hybrid":
                how = f"hybrid (Ulysses {self.ulysses_size} × ring {cp_size // self.ulysses_size})"
            case "ulysses":
                how = f"Ulysses over {cp_size} ranks"
            case _:
                how = f"ring over {cp_size} ranks"
        return f"attention by {how}: {self.reason}"


def _first(obstacles: list[str | None]) -> str | None:
    return next((obstacle for obstacle in obstacles if obstacle is not None), None)


def choose_mechanism(
    traits: list[AttentionTraits], cp_size: int, cp_mode: str = "auto", ulysses_size: int | None = None
) -> Mechanism:
    """The mechanism that runs every module of ``traits`` exactly for ``cp_mode``, or a clear refusal.

    Raises :class:`~lightning_cp.validation.ContextParallelInputError` (the same on every rank: it reads
    only the model) naming the module that stands in the way and the mode that would run it.
    """
    validate_cp_mode(cp_mode, ulysses_size)
    ring_obstacle = _first([t.ring_obstacle() for t in traits])

    def ulysses_obstacle(size: int, heads_required: bool = True) -> str | None:
        return _first([t.ulysses_obstacle(size, heads_required) for t in traits])

    match cp_mode:
        case "ring":
            if ring_obstacle is not None:
                _refuse("ring", ring_obstacle, _alternative(cp_size, ulysses_obstacle))
            return Mechanism("ring", 1, "cp_mode='ring'")
        case "ulysses":
            obstacle = ulysses_obstacle(cp_size, heads_required=False)
            if obstacle is not None:
                _refuse("ulysses", obstacle, _sizes_hint(traits, cp_size))
            return Mechanism("ulysses", cp_size, "cp_mode='ulysses'")
        case "hybrid":
            assert ulysses_size is not None
            if cp_size % ulysses_size:
                raise ContextParallelInputError(
                    f"ulysses_size={ulysses_size} must divide cp_size={cp_size} (the ring runs over cp_size /"
                    " ulysses_size groups)."
                )
            if ring_obstacle is not None:  # the ring runs across the Ulysses groups
                _refuse("hybrid", ring_obstacle, _alternative(cp_size, ulysses_obstacle))
            obstacle = ulysses_obstacle(ulysses_size, heads_required=False)
            if obstacle is not None:
                _refuse("hybrid", obstacle, _sizes_hint(traits, cp_size))
            return Mechanism("hybrid", ulysses_size, f"cp_mode='hybrid', ulysses_size={ulysses_size}")
    # auto
    if ulysses_obstacle(cp_size) is None:
        return Mechanism(
            "ulysses",
            cp_size,
            "auto: the heads split over the CP ranks, and Ulysses runs the model's own attention (any mask,"
            " window or kernel) while moving q/k/v/output once per layer",
        )
    if ring_obstacle is not None:
        _refuse("auto", f"{ring_obstacle}, so only Ulysses could run it, but {ulysses_obstacle(cp_size)}", None)
    sizes = [size for size in range(cp_size - 1, 1, -1) if cp_size % size == 0 and ulysses_obstacle(size) is None]
    if sizes:
        return Mechanism(
            "hybrid",
            sizes[0],
            f"auto: Ulysses over all {cp_size} ranks is not possible ({ulysses_obstacle(cp_size)});"
            f" Ulysses groups of {sizes[0]} with the ring across them",
        )
    return Mechanism("ring", 1, f"auto: Ulysses is not possible ({ulysses_obstacle(cp_size)}); the ring runs any heads")


def _alternative(cp_size: int, ulysses_obstacle: Callable[[int], str | None]) -> str:
    if ulysses_obstacle(cp_size) is None:
        return "Use cp_mode='ulysses' (or 'auto'): it runs the model's own attention function on whole sequences."
    return f"Ulysses cannot run it either: {ulysses_obstacle(cp_size)}."


def _sizes_hint(traits: list[AttentionTraits], cp_size: int) -> str:
    """Which Ulysses sizes the heads allow, and which of them can run at ``cp_size`` (directly or in the hybrid)."""
    known = [t for t in traits if t.query_heads is not None and t.kv_heads is not None]
    if not known:
        return ""
    limit = max(max(t.query_heads for t in known), cp_size)  # type: ignore[type-var]
    sizes = set.intersection(*(set(ulysses_sizes_that_work(t.query_heads, t.kv_heads, limit)) for t in known))  # type: ignore[arg-type]
    splitting = sorted(sizes)
    usable = [size for size in splitting if 1 < size <= cp_size and cp_size % size == 0]
    if not usable:
        return (
            f"Ulysses sizes that split the heads: {splitting}; none above 1 divides cp_size={cp_size}. Use"
            " cp_mode='ring' (any heads), or a cp_size that is a multiple of one of them."
        )
    return (
        f"Ulysses sizes that split the heads: {splitting}; at cp_size={cp_size}: {usable} (cp_mode='ulysses' when"
        " it equals cp_size, else cp_mode='hybrid', ulysses_size=...)."
    )


def _refuse(mode: str, obstacle: str, hint: str | None) -> None:
    raise ContextParallelInputError(
        f"cp_mode={mode!r} cannot run this model exactly: {obstacle}. {hint or ''}".rstrip()
    )


def runnable_modes(traits: list[AttentionTraits], cp_size: int, seq_len: int | None = None) -> list[str]:
    """The explicit modes that would run these modules exactly at ``cp_size`` (and ``seq_len`` tokens, when given:
    a sliding window shorter than that, outside transformers' attention interface, rules the ring and the hybrid
    out)."""
    candidates = [("ulysses", None)]
    windowed = seq_len is not None and any(
        t.window is not None and t.window < seq_len and not t.interface for t in traits
    )
    if not windowed:
        candidates += [("ring", None)] + [("hybrid", size) for size in range(2, cp_size) if cp_size % size == 0]
    modes = []
    for mode, size in candidates:
        try:
            choose_mechanism(traits, cp_size, mode, size)
        except ContextParallelInputError:
            continue
        modes.append(mode if size is None else f"hybrid(ulysses_size={size})")
    return modes
