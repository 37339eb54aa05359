"""A failure in a few lines, not one long traceback per rank (full tracebacks on request).

lightning_cp refuses input it would get wrong (a batch, the model's attention, a call to the ring)
with :class:`~lightning_cp.validation.ContextParallelInputError`, before any collective. The ranks of
a CP group hold the same model and batch, so each of them raises the same error, and a job of N
ranks would print N copies of the traceback. With the hook installed, the group's first rank shows
the traceback and the others one line each. Any other exception keeps a traceback on every rank:
ranks may fail differently, and each traceback may be the one that matters.

Each rank has already written one line saying what happened to it (``lightning_cp: rank 1 (...) failed:
...``), and Lightning's tracebacks run through 30-100 frames of Lightning, torch and transformers. So by
default a traceback is shortened to the frames that say where: the innermost frame of the user's code
(outside the installed packages, the standard library and lightning_cp) and the frame that raised,
followed by a line counting the frames left out. A rank that only lost a peer in a collective shows its
error's line without a traceback (the collective's frames say nothing about the cause, which is the peer's
error). ``LIGHTNING_CP_FULL_TRACEBACKS=1`` in the environment shows every traceback whole.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.validation import ContextParallelInputError

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]

#: Set to ``1`` to get the full traceback of a failure instead of the short one.
FULL_TRACEBACKS_ENV = "LIGHTNING_CP_FULL_TRACEBACKS"

_PACKAGE_DIR = str(Path(__file__).resolve().parent) + os.sep
_STDLIB_DIRS = tuple(
    str(Path(path).resolve()) + os.sep
    for path in {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
)
#: True while a hook handles an error: hooks further down the chain (an earlier install that torch's
#: ``[rankN]:`` hook wraps) print what they are given instead of shortening it again.
_handling = False


def full_tracebacks() -> bool:
    """Whether the user asked for full tracebacks (:data:`FULL_TRACEBACKS_ENV` set, and not to 0 / false / no)."""
    return os.environ.get(FULL_TRACEBACKS_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective failing because another rank failed or died (not this rank's own)."""
    message = str(error)
    return isinstance(error, dist.DistError) or any(hint in message for hint in ("by peer", "remote worker"))


def _is_library(filename: str) -> bool:
    """A frame of an installed package, the standard library or lightning_cp (not the user's code)."""
    if filename.startswith("<"):
        return True  # <frozen runpy>, <string>
    path = str(Path(filename).resolve())
    parts = Path(path).parts
    return path.startswith((_PACKAGE_DIR, *_STDLIB_DIRS)) or "site-packages" in parts or "dist-packages" in parts


def _frames(traceback: TracebackType | None) -> Iterator[TracebackType]:
    while traceback is not None:
        yield traceback
        traceback = traceback.tb_next


def short_traceback(error: BaseException, traceback: TracebackType | None) -> tuple[TracebackType | None, int]:
    """The frames of ``traceback`` that say where ``error`` came from, and how many were left out.

    Kept: the innermost frame of the user's code, and the innermost frame (where it was raised) unless the
    error is one lightning_cp raises on purpose (a refusal, a message starting ``lightning_cp:``), whose
    message says what to change and whose frame is the library's.
    """
    frames = list(_frames(traceback))
    if not frames:
        return None, 0
    user = [frame for frame in frames if not _is_library(frame.tb_frame.f_code.co_filename)]
    kept = user[-1:]
    on_purpose = isinstance(error, ContextParallelInputError) or str(error).startswith("lightning_cp:")
    if not on_purpose and frames[-1] not in kept:
        kept.append(frames[-1])
    short = None
    for frame in reversed(kept):
        short = TracebackType(short, frame.tb_frame, frame.tb_lasti, frame.tb_lineno)
    return short, len(frames) - len(kept)


def _chain(error: BaseException) -> list[BaseException]:
    """``error`` and the exceptions Python prints with it (its cause or context, recursively)."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    return chain


@dataclass(frozen=True)
class SameErrorHook:
    """A ``sys.excepthook``: one line for an error raised alike on the CP group's ranks, short tracebacks.

    ``rank`` is this process's global rank, ``first_rank`` the first global rank of its CP group (the
    one that shows the traceback); both ``None`` before the processes exist (every error is then shown,
    shortened). ``previous`` prints what this hook passes on (torch's hook prefixes ``[rankN]:``).
    """

    rank: int | None
    first_rank: int | None
    previous: ExceptHook

    def __call__(self, error_type: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        """Print ``error`` as the module docstring says."""
        global _handling
        if _handling:
            self.previous(error_type, error, traceback)
            return
        _handling = True
        try:
            self._show(error_type, error, traceback)
        finally:
            _handling = False

    def _show(self, error_type: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        if self.rank != self.first_rank and isinstance(error, ContextParallelInputError):
            summary = next(iter(str(error).splitlines()), "")
            print(
                f"lightning_cp: rank {self.rank}: same error as rank {self.first_rank}"
                f" ({error_type.__name__}: {summary})",
                file=sys.stderr,
                flush=True,
            )
            return
        if full_tracebacks():
            self.previous(error_type, error, traceback)
            return
        # The printed traceback is each exception's __traceback__: shorten them for the print, then restore.
        chain = _chain(error)
        originals = [(raised, raised.__traceback__) for raised in chain]
        hidden = 0
        try:
            for raised in chain:
                full = traceback if raised is error else raised.__traceback__
                short, left_out = (None, 0) if lost_a_peer(raised) else short_traceback(raised, full)
                raised.__traceback__ = short
                hidden += left_out
            self.previous(error_type, error, error.__traceback__)
        finally:
            for raised, original in originals:
                raised.__traceback__ = original
        if hidden:
            where = "" if self.rank is None else f"rank {self.rank}: "
            print(
                f"lightning_cp: {where}{hidden} more frames (Lightning's, torch's, outer calls) not shown;"
                f" {FULL_TRACEBACKS_ENV}=1 shows full tracebacks",
                file=sys.stderr,
                flush=True,
            )


def _install(rank: int | None, first_rank: int | None) -> None:
    previous = sys.excepthook
    if isinstance(previous, SameErrorHook):
        previous = previous.previous
    sys.excepthook = SameErrorHook(rank, first_rank, previous)


def install_short_error_hook() -> None:
    """Show an error that ends this process in a few lines (before the process group exists: no ranks yet)."""
    _install(None, None)


def install_same_error_hook(cp_mesh: DeviceMesh) -> None:
    """Make an error raised alike on the ranks of ``cp_mesh`` show its traceback once, on the group's first rank.

    Call once the process group exists. Installing again (a new strategy in the same process) replaces
    the hook rather than stacking a second one.
    """
    _install(dist.get_rank(), int(cp_mesh.mesh.min()))
