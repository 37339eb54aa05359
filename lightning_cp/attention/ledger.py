"""Which hooked attention modules really went through a CP mechanism.

A module that attends by some other route (an SDPA imported by name, a hand-written softmax, a kernel
called directly) would attend only inside its own shard: the loss looks plausible, the gradients are
wrong. So while CP is on, every hooked attention module's forward is bracketed (:func:`entering` /
:func:`leaving`) and every CP mechanism reports its calls (:func:`record_mechanism_call`); a module
that finishes without one is refused by the hooks. The verdict depends only on the code path, which is
the same on every rank of a CP group, so every rank refuses at the same module.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

#: Hooked attention modules whose forward is running, innermost last, with whether a mechanism ran.
_running: list[tuple[nn.Module, bool]] = []
#: Open :func:`counting` records: hooked attention forwards under CP, and those that went through CP.
_counters: list[dict[str, int]] = []


def entering(module: nn.Module) -> None:
    """Note that ``module``'s forward starts under CP."""
    _running.append((module, False))
    for counter in _counters:
        counter["attention"] += 1


def leaving(module: nn.Module) -> bool:
    """Note that ``module``'s forward ended; return whether a CP mechanism ran inside it."""
    while _running:
        running, called = _running.pop()
        if running is module:
            for counter in _counters if called else ():
                counter["through_cp"] += 1
            return called
    return False


def inside_hooked_module() -> bool:
    """Whether a hooked attention module's forward is running (attention from it is prepared for CP)."""
    return bool(_running)


def record_mechanism_call() -> None:
    """Note that a CP mechanism ran attention for the innermost running hooked module, if any."""
    if _running:
        _running[-1] = (_running[-1][0], True)


def reset() -> None:
    """Forget running modules (a forward that raised leaves its entry behind)."""
    _running.clear()


@contextmanager
def counting() -> Iterator[dict[str, int]]:
    """Count, while open, hooked attention forwards under CP (``"attention"``) and those that went through a
    CP mechanism (``"through_cp"``); the doctor reports both."""
    counter = {"attention": 0, "through_cp": 0}
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)
