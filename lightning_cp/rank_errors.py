"""One traceback, not one per rank, for an error that every rank of a CP group raises alike.

lightning_cp refuses input it would get wrong (a batch, the model's attention, a call to the ring)
with :class:`~lightning_cp.validation.ContextParallelInputError`, before any collective. The ranks of
a CP group hold the same model and batch, so each of them raises the same error, and a job of N
ranks would print N copies of the traceback. With the hook installed, the group's first rank shows
the traceback and the others one line each. Any other exception keeps its full traceback on every
rank: ranks may fail differently, and each traceback may be the one that matters.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.validation import ContextParallelInputError

ExceptHook = Callable[[type[BaseException], BaseException, TracebackType | None], object]


@dataclass(frozen=True)
class SameErrorHook:
    """A ``sys.excepthook``: one line for an error raised alike on the CP group's ranks, else ``previous``.

    ``rank`` is this process's global rank, ``first_rank`` the first global rank of its CP group (the
    one that shows the traceback).
    """

    rank: int
    first_rank: int
    previous: ExceptHook

    def __call__(self, error_type: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        """Print the one line when ``error`` is raised alike on every rank and this is not the first rank."""
        if self.rank == self.first_rank or not isinstance(error, ContextParallelInputError):
            self.previous(error_type, error, traceback)
            return
        summary = next(iter(str(error).splitlines()), "")
        print(
            f"lightning_cp: rank {self.rank}: same error as rank {self.first_rank} ({error_type.__name__}: {summary})",
            file=sys.stderr,
            flush=True,
        )


def install_same_error_hook(cp_mesh: DeviceMesh) -> None:
    """Make an error raised alike on the ranks of ``cp_mesh`` show its traceback once, on the group's first rank.

    Call once the process group exists. Installing again (a new strategy in the same process) replaces
    the hook rather than stacking a second one.
    """
    previous = sys.excepthook
    if isinstance(previous, SameErrorHook):
        previous = previous.previous
    sys.excepthook = SameErrorHook(dist.get_rank(), int(cp_mesh.mesh.min()), previous)
