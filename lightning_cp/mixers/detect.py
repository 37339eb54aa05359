"""Which modules of a model mix information along the sequence without being softmax attention.

A module counts as a sequence mixer when it holds, itself, one of the structural signs of one: a
convolution over positions (an ``nn.Conv1d`` with a kernel longer than 1 and stride 1), state-space
parameters (``A_log``, ``dt_bias``), a call of a known mixer function of transformers' modeling code
(``causal_conv1d_forward``, ``torch_chunk_gated_delta_rule``, ``mamba2_scan_forward``, ...) in its
``forward``, or a class name of a known mixer family (gated delta nets, linear/lightning attention,
RG-LRU, short convolutions). The outermost such module is the mixer: CP runs or refuses it as a whole.
A mixer written by hand without any of these signs (a ``torch.cumsum`` over positions, say) is caught
by the doctor, which compares every module's output with one plain process.
"""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

from torch import nn

from lightning_cp.attention.ulysses import ulysses_head_error, ulysses_sizes_that_work
from lightning_cp.mixers.heads import MODULE_ROUTED_MIXERS, MODULE_ROUTES, ROUTES, UNROUTED, depthwise_conv_error
from lightning_cp.mixers.state_passing import STATE_PASSING_ROUTES
from lightning_cp.mixers.traffic import MixerTraffic, mixer_traffic

_STATE_SPACE_PARAMETERS = ("A_log", "dt_bias")
_MIXER_CLASS_HINTS = (
    "GatedDeltaNet",
    "DeltaAttention",
    "LightningAttention",
    "Rglru",
    "RgLru",
    "ShortConv",
    "Mamba2Mixer",
    "MambaMixer",
)
_KNOWN_FUNCTIONS = (*ROUTES, *UNROUTED)


def _is_sequence_conv(module: nn.Module) -> bool:
    if not isinstance(module, nn.Conv1d | nn.Conv2d):
        return False
    return any(k > 1 and s == 1 for k, s in zip(module.kernel_size, module.stride, strict=True))


def _functions_called(module: nn.Module) -> tuple[str, ...]:
    """Known mixer functions named in ``module``'s ``forward`` source (empty when it has none to read)."""
    return _functions_called_by(type(module))


@functools.cache
def _functions_called_by(cls: type) -> tuple[str, ...]:
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return ()
    return tuple(name for name in _KNOWN_FUNCTIONS if re.search(rf"\b{name}\(", source))


def _looks_like_mixer(module: nn.Module) -> bool:
    if any(_is_sequence_conv(child) for child in module.children()):
        return True
    if any(name in _STATE_SPACE_PARAMETERS for name, _ in module.named_parameters(recurse=False)):
        return True
    name = type(module).__name__
    # a decoder layer named after its mixer (OlmoHybridLinearAttentionDecoderLayer) holds the mixer: not one itself
    if any(hint in name for hint in _MIXER_CLASS_HINTS) and not name.endswith(("DecoderLayer", "Model")):
        return True
    return bool(_functions_called(module))


def is_sequence_mixer(module: nn.Module) -> bool:
    """Whether ``module`` itself shows a sign of mixing along the sequence (see the module docstring)."""
    return _looks_like_mixer(module) or _is_sequence_conv(module)


def find_sequence_mixers(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost modules of ``model`` that mix along the sequence without being attention, by name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") for parent in found):
            continue
        if _looks_like_mixer(module) or (_is_sequence_conv(module) and name):
            found[name] = module
    return found


@dataclass(frozen=True)
class MixerTraits:
    """What decides which mechanism can run one sequence mixer exactly."""

    name: str
    kind: str
    #: Parts the all-to-all must run (``"conv"``, ``"scan"``), empty when it cannot run this mixer at all.
    parts: frozenset[str]
    #: (value heads, key heads or groups) the scan splits over, when it has one.
    heads: tuple[int, int] | None
    #: The depthwise convolution the all-to-all splits by channels, when it has one.
    conv: nn.Module | None
    #: Why the all-to-all cannot run it at any CP size (a function it does not route), or ``None``.
    unroutable: str | None
    #: What the two head counts are called, for messages.
    head_names: tuple[str, str] = ("heads", "groups")
    #: Why state passing cannot run it (a part it has no affine state for), or ``None``.
    state_passing_obstacle: str | None = None
    #: What the all-to-all and state passing move for it, when state passing can run it.
    traffic: MixerTraffic | None = None

    def all_to_all_obstacle(self, size: int) -> str | None:
        """Why ``size`` ranks cannot run this mixer by the all-to-all, or ``None``."""
        if self.unroutable is not None:
            return f"`{self.name}` ({self.kind}) {self.unroutable}"
        if self.heads is not None:
            error = ulysses_head_error(self.heads[0], self.heads[1], size, self.head_names)
            if error is not None:
                sizes = ulysses_sizes_that_work(self.heads[0], self.heads[1], max(self.heads[0], size))
                return f"`{self.name}` ({self.kind}): {error} (sizes that split them: {sizes})"
        if self.conv is not None:
            error = depthwise_conv_error(self.conv, size)
            if error is not None:
                return f"`{self.name}` ({self.kind}): {error}"
        return None


def _kind(module: nn.Module, called: tuple[str, ...]) -> str:
    name = type(module).__name__
    if "torch_chunk_gated_delta_rule" in called or "GatedDeltaNet" in name:
        return "gated delta net"
    if "mamba2_scan_forward" in called:
        return "Mamba-2 scan"
    if "mamba_scan_forward" in called or "Mamba" in name:
        return "Mamba-1 scan"
    if "chunk_kimi_delta_attention" in called:
        return "Kimi delta attention"
    if "Lightning" in name:
        return "lightning attention"
    if "Rglru" in name or "Recurrent" in name or "RgLru" in name:
        return "recurrence"
    if called == ("causal_conv1d_forward",) or _is_sequence_conv(module) or "Conv" in name:
        return "short convolution"
    return "sequence mixer"


def _heads(module: nn.Module, called: tuple[str, ...]) -> tuple[int, int] | None:
    if "torch_chunk_gated_delta_rule" in called:
        return module.num_v_heads, module.num_k_heads
    if "mamba2_scan_forward" in called:
        return module.num_heads, module.n_groups
    if "chunk_kimi_delta_attention" in called:
        return module.num_heads, module.num_heads
    return None


def _module_routed_traits(name: str, module: nn.Module) -> MixerTraits:
    """Traits of a mixer whose parts are modules (:data:`~lightning_cp.mixers.heads.MODULE_ROUTED_MIXERS`)."""
    parts = {
        MODULE_ROUTES[type(child).__name__][1] for child in module.children() if type(child).__name__ in MODULE_ROUTES
    }
    conv = next((child for child in module.children() if _is_sequence_conv(child)), None)
    causal = conv is None or tuple(conv.padding) == (conv.kernel_size[0] - 1,)
    blocks = next(
        (child.num_attention_heads for child in module.children() if hasattr(child, "num_attention_heads")), None
    )
    return MixerTraits(
        name=name,
        kind=_kind(module, ()),
        state_passing_obstacle=f"`{name}` ({_kind(module, ())}): state passing runs no module-routed mixers (yet)",
        parts=frozenset(parts),
        heads=(blocks, blocks) if blocks is not None else None,
        conv=conv,
        unroutable=None if causal else "has a convolution that is not causal",
        head_names=("head blocks", "head blocks"),
    )


def _state_passing_obstacle(name: str, kind: str, called: tuple[str, ...], unroutable: str | None) -> str | None:
    """Why state passing cannot run a mixer calling ``called`` (Note [state passing]), or ``None``."""
    if unroutable is not None:
        return f"`{name}` ({kind}) {unroutable}"
    scans = [function for function in called if ROUTES[function][1] is not None]
    missing = [function for function in scans if function not in STATE_PASSING_ROUTES]
    if missing:
        return f"`{name}` ({kind}) calls `{missing[0]}`, for which state passing has no affine state (yet)"
    return None


def mixer_traits(name: str, module: nn.Module) -> MixerTraits:
    """Read a mixer's :class:`MixerTraits` from the module and the functions its ``forward`` calls."""
    if type(module).__name__ in MODULE_ROUTED_MIXERS:
        return _module_routed_traits(name, module)
    called = _functions_called(module)
    kind = _kind(module, called)
    routed = [function for function in called if ROUTES[function][1] is not None] if set(called) <= set(ROUTES) else []
    unroutable = None
    if not routed:
        unrouted = [function for function in called if function not in ROUTES]
        unroutable = (
            f"calls `{unrouted[0]}`, which the all-to-all does not run"
            if unrouted
            else "mixes positions in its own code (no mixer function the all-to-all can run)"
        )
    conv = next((child for child in module.children() if _is_sequence_conv(child)), None)
    state_passing_obstacle = _state_passing_obstacle(name, kind, called, unroutable)
    return MixerTraits(
        name=name,
        kind=kind,
        state_passing_obstacle=state_passing_obstacle,
        traffic=mixer_traffic(module, conv, kind) if state_passing_obstacle is None else None,
        parts=frozenset(ROUTES[function][1] for function in routed),  # type: ignore[misc]
        heads=_heads(module, called) if not unroutable else None,
        head_names=("value heads", "key heads") if "delta" in kind else ("heads", "groups"),
        conv=conv if "causal_conv1d_forward" in called else None,
        unroutable=unroutable,
    )
