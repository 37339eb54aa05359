"""Switching the sequence-mixer mechanisms on and off, and the ledger of what ran through them.

While a micro-batch's CP context is open, :func:`active_mixer_exchange` says how the CP group's shards
make up the whole row (Note [mixer sequence order] in :mod:`lightning_cp.mixers.exchange`). Every hooked
mixer's forward is bracketed (:func:`entering` / :func:`leaving`) and each mechanism reports the parts
of the mixer it ran (:func:`record`); a mixer that finishes without every part it needs having gone
through CP would have mixed only its own shard, and is refused by the hooks. The verdict depends only
on the code path, the same on every rank, so every rank refuses at the same module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lightning_cp.mixers.exchange import MixerExchange

_active: MixerExchange | None = None
#: Hooked mixers whose forward is running, innermost last: the module, its mechanism, and the parts of it
#: that went through CP. A mechanism running the model's function on whole sequences pushes ``"whole"``.
_running: list[tuple[nn.Module | None, str, set[str]]] = []
#: Open :func:`counting` records (the doctor's): mixer forwards under CP, and those fully through CP.
_counters: list[dict[str, int]] = []


def active_mixer_exchange() -> MixerExchange | None:
    """The exchange of the micro-batch whose CP context is open, or ``None`` outside CP."""
    return _active


@contextmanager
def mixers_on(exchange: MixerExchange) -> Iterator[None]:
    """Run the hooked sequence mixers through their CP mechanisms over ``exchange`` while open."""
    global _active
    if _active is not None:
        raise RuntimeError("Sequence-mixer context parallelism is already on in this process; contexts do not nest.")
    _running.clear()  # a forward that raised in an earlier context may have left a module behind
    _active = exchange
    try:
        yield
    finally:
        _active = None


def entering(module: nn.Module, mechanism: str) -> None:
    """Note that hooked mixer ``module``'s forward starts under CP, run by ``mechanism``."""
    _running.append((module, mechanism, set()))
    for counter in _counters:
        counter["mixers"] += 1


def leaving(module: nn.Module) -> set[str]:
    """Note that ``module``'s forward ended; return the parts of it that ran through a CP mechanism."""
    while _running:
        running, _, parts = _running.pop()
        if running is module:
            return parts
    return set()


def record(part: str) -> None:
    """Note that a CP mechanism ran ``part`` (``"scan"``, ``"conv"``, ``"whole"``) of the innermost running mixer."""
    for running in reversed(_running):
        if running[0] is not None:
            running[2].add(part)
            return


def innermost_mechanism() -> str | None:
    """The mechanism of the innermost running hooked mixer (``"whole"`` inside a mechanism), or ``None``."""
    return _running[-1][1] if _running else None


@contextmanager
def running_whole() -> Iterator[None]:
    """While open, a mechanism runs the model's own function on whole sequences: mixer calls pass through."""
    _running.append((None, "whole", set()))
    try:
        yield
    finally:
        _running.pop()


def count_through(complete: bool) -> None:
    """Count a finished mixer forward for the doctor (``complete``: every part went through CP)."""
    for counter in _counters if complete else ():
        counter["through_cp"] += 1


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Count, while open, hooked mixer forwards under CP (``"mixers"``) and those that went wholly through CP."""
    counter = {"mixers": 0, "through_cp": 0}
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)
