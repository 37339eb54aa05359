"""Ending a job whose rank stopped answering, and making Ctrl-C and SIGTERM end every rank within seconds.

Note [rank watchdog]
--------------------
A CP ring runs collectives in every attention layer. When one rank stops (SIGSTOP, a frozen node, a
process swapped out), its peers block inside a collective until its timeout (10 minutes), and while
they are blocked in C++ Python cannot run their SIGINT / SIGTERM handlers: Ctrl-C does nothing, the
timeout then blames the waiting rank, and the stopped rank outlives the job. So each rank runs a
daemon thread that

1. publishes a heartbeat (a counter, its host and pid) in the job's rendezvous store every second and
   reads its context-parallel peers' heartbeats, through its own store connection with a short timeout
   (``MASTER_ADDR`` / ``MASTER_PORT``, as every torch launcher sets them; without them, no heartbeat);
2. declares a peer that has not moved its counter for ``heartbeat_timeout`` stopped, names it (global,
   data- and context-parallel rank, host, pid) and ends the job;
3. hears SIGINT / SIGTERM through ``signal.set_wakeup_fd`` (written by the C-level handler even while the
   main thread is blocked) and, if the process still runs ``grace`` seconds later, ends the job.

Ending the job: SIGKILL the peers on this host that stopped answering (SIGKILL reaches a stopped
process; nothing else does) and the ranks this process launched, then ``os._exit`` with 128 + the
signal number, or 1 for a detected hang. A rank whose launcher died also ends itself.
A peer that finished cleanly says so in the store; one whose process is gone is not "stopped".

Note [watchdog at exit]
-----------------------
The thread is a daemon, and its store calls run in C++ with the GIL released. A daemon thread that comes
back from such a call while the interpreter finalizes cannot take the GIL again: Python ends the thread
from inside the call, which C++ cannot unwind, and the process aborts ("terminate called without an
active exception", SIGABRT) after a run that succeeded. So :meth:`RankWatchdog.stop` waits until the
thread has returned from its call, as long as the store's host takes to answer (bounded by
``_STOP_TIMEOUT``), before it writes its own "finished" on the same connection: a host that answers slowly
delays the exit, and only a host that stops answering altogether leaves the thread in its call (the
store is then left alone: a call of ours would block as well).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist
from torch.distributed import DistError

_KEY = "lightning_cp/heartbeat/{rank}"
_FINISHED = "finished"
#: Seconds between heartbeats.
HEARTBEAT_INTERVAL = 1.0
#: Seconds a signalled process may take to shut down gracefully before the watchdog ends it.
SIGNAL_GRACE = 5.0
#: A peer silent for this many heartbeats is named as the one not answering when the job is interrupted.
_SILENT_BEATS = 3
#: Seconds :meth:`RankWatchdog.stop` waits for the thread to leave a store call (Note [watchdog at exit]).
_STOP_TIMEOUT = 10.0


class TerminatedBySignal(BaseException):
    """Raised in the main thread of a rank that received ``signum`` (SIGTERM), where no one else handles it.

    Not an ``Exception``: ``except Exception`` lets it through, ``finally`` blocks run, and the rank then
    exits with 128 + ``signum`` (the Fabric strategy raises it; the Trainer has Lightning's own).
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"received {signal.Signals(self.signum).name}"


def _rendezvous_store(timeout: timedelta) -> dist.Store | None:
    """A connection of our own to the job's rendezvous store (its short timeout leaves the job's alone)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    return dist.TCPStore(host, int(port), is_master=False, timeout=timeout, wait_for_workers=False)


class RankWatchdog:
    """The heartbeat and signal thread of one rank; see Note [rank watchdog].

    Args:
        rank: this process's global rank.
        peers: global ranks whose heartbeats this rank watches (its context-parallel group).
        describe_rank: the place of a global rank in the mesh, for messages.
        heartbeat_timeout: seconds of silence after which a peer counts as stopped; ``None``: only
            signals end the job.
        launched_pids: pids of the ranks this process launched (ended with it), read when needed.
        watch_launcher: end this rank when the process that launched it disappears.
    """

    def __init__(
        self,
        rank: int,
        peers: list[int],
        describe_rank: Callable[[int], str],
        heartbeat_timeout: float | None,
        launched_pids: Callable[[], list[int]] = list,
        watch_launcher: bool = False,
    ) -> None:
        self.rank = rank
        self.peers = [peer for peer in peers if peer != rank]
        self.describe_rank = describe_rank
        self.heartbeat_timeout = heartbeat_timeout
        self.launched_pids = launched_pids
        self._launcher_pid = os.getppid() if watch_launcher else None
        self._store = _rendezvous_store(timedelta(seconds=max(5 * HEARTBEAT_INTERVAL, 5.0)))
        self._stop = threading.Event()
        self._signal_read, self._signal_write = os.pipe()
        os.set_blocking(self._signal_write, False)
        # Only the main thread may set it; from another thread only the heartbeat runs.
        self._previous_wakeup_fd: int | None = None
        if threading.current_thread() is threading.main_thread():
            self._previous_wakeup_fd = signal.set_wakeup_fd(self._signal_write, warn_on_full_buffer=False)
        self._thread = threading.Thread(target=self._run, name="lightning_cp-watchdog", daemon=True)
        self._peer_beats: dict[int, tuple[str, float]] = {}
        self._peer_places: dict[int, tuple[str, int]] = {}
        #: The first SIGINT or SIGTERM this process received while the watchdog ran (``None``: none).
        self.received_signal: int | None = None

    def start(self) -> RankWatchdog:
        """Start the thread; returns ``self``."""
        now = time.monotonic()
        self._peer_beats = {peer: ("", now) for peer in self.peers}  # peers get a full timeout to start
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and tell the peers this rank finished (so its silence is not a hang)."""
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            os.write(self._signal_write, b"\0")  # wake the thread from its select now, not at the next heartbeat
        except BlockingIOError:
            pass  # the pipe is full: the thread wakes up anyway
        # Wait for the thread to leave its store call, however slow the store's host answers (Note [watchdog at
        # exit]); a host that does not answer at all holds the thread, and the store is then left alone.
        self._thread.join(timeout=_STOP_TIMEOUT)
        if self._previous_wakeup_fd is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
        if self._thread.is_alive():
            return
        try:
            if self._store is not None:
                self._store.set(_KEY.format(rank=self.rank), _FINISHED)
        except DistError:
            pass  # the store's host has gone already: nobody is left to watch us
        self._store = None  # close our connection now, not during interpreter teardown
        os.close(self._signal_read)
        os.close(self._signal_write)

    # ---------------------------------------------------------------------------------------- thread
    def _run(self) -> None:
        beats = 0
        signalled: tuple[int, float] | None = None
        host, pid = socket.gethostname(), os.getpid()
        while not self._stop.is_set():
            readable, _, _ = select.select([self._signal_read], [], [], HEARTBEAT_INTERVAL)
            if self._stop.is_set():
                return
            if readable:
                received = os.read(self._signal_read, 64)
                terminating = [s for s in received if s in (signal.SIGINT, signal.SIGTERM)]
                if terminating and signalled is None:
                    signalled = (terminating[0], time.monotonic())
                    self.received_signal = terminating[0]
            beats += 1
            try:
                if self._store is not None:
                    self._store.set(_KEY.format(rank=self.rank), f"{beats} {host} {pid}")
                    self._read_peers()
            except DistError as error:
                if "timeout" not in str(error).lower():
                    # The store's host exited (a reset connection, a broken pipe): the job is ending. No more
                    # heartbeats to publish or read, but signals and the launcher are still watched.
                    self._store = None
                    self._peer_beats.clear()
            if self._launcher_pid is not None and os.getppid() != self._launcher_pid:
                self._end("the process that launched this rank has exited", code=1)
            if signalled is not None and time.monotonic() - signalled[1] > SIGNAL_GRACE:
                name = signal.Signals(signalled[0]).name
                code = 128 + signalled[0]
                reason = (
                    f"{name} received, but this rank is blocked (most likely in a collective): the job ends with"
                    f" exit code {code} (128 + {name})"
                )
                self._end(reason, code)
            stopped = self._silent_peers(self.heartbeat_timeout)
            if stopped:
                self._end("no heartbeat for more than the heartbeat timeout", code=1, stopped=stopped)

    def _read_peers(self) -> None:
        assert self._store is not None
        if not self.peers:
            return
        now = time.monotonic()
        values = self._store.multi_get([_KEY.format(rank=peer) for peer in self.peers]) if self._all_published() else []
        for peer, raw in zip(self.peers, values, strict=False):
            value = raw.decode()
            if value == _FINISHED:
                self._peer_beats.pop(peer, None)
                continue
            if peer in self._peer_beats and value != self._peer_beats[peer][0]:
                self._peer_beats[peer] = (value, now)
                _, peer_host, peer_pid = value.split()
                self._peer_places[peer] = (peer_host, int(peer_pid))

    def _all_published(self) -> bool:
        assert self._store is not None
        # multi_get waits for missing keys: read only once every watched peer has published.
        return self._store.check([_KEY.format(rank=peer) for peer in self._peer_beats])

    def _silent_peers(self, seconds: float | None) -> list[int]:
        if seconds is None:
            return []
        now = time.monotonic()
        return [peer for peer, (_, seen) in self._peer_beats.items() if now - seen > seconds and self._alive(peer)]

    def _alive(self, peer: int) -> bool:
        """False only for a peer known to be on this host whose process is gone (it died: not a hang)."""
        host, pid = self._peer_places.get(peer, ("", 0))
        if host != socket.gethostname() or not pid:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def _end(self, reason: str, code: int, stopped: list[int] | None = None) -> None:
        stopped = stopped if stopped is not None else self._silent_peers(_SILENT_BEATS * HEARTBEAT_INTERVAL)
        if stopped:
            names = "; ".join(self._describe_stopped(peer) for peer in stopped)
            what = f"stopped answering: {names}"
        else:
            what = "no peer is known to have stopped"
        print(
            f"lightning_cp: {self.describe_rank(self.rank)}: {reason}; {what}. Ending the job: the stopped ranks on"
            " this host and the ranks this process launched are killed.",
            file=sys.stderr,
            flush=True,
        )
        for pid in [self._peer_places[p][1] for p in stopped if self._on_this_host(p)] + self.launched_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        os._exit(code)

    def _on_this_host(self, peer: int) -> bool:
        return self._peer_places.get(peer, ("", 0))[0] == socket.gethostname()

    def _describe_stopped(self, peer: int) -> str:
        host, pid = self._peer_places.get(peer, ("an unknown host", 0))
        silent = time.monotonic() - self._peer_beats.get(peer, ("", time.monotonic()))[1]
        return f"{self.describe_rank(peer)} (pid {pid} on {host}, silent for {silent:.0f} s)"
