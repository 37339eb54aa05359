"""What the Trainer and Fabric context-parallel strategies share: options, mesh, session, loss helper."""

from __future__ import annotations

import atexit
import os
import signal
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch

from lightning_cp.attention.switch import validate_rotate_method
from lightning_cp.chunked_loss import HiddenStatesForLoss
from lightning_cp.cp_mode import validate_cp_mode
from lightning_cp.memory import apply_memory_options, chunk_tokens_of
from lightning_cp.mesh import (
    CONTEXT_PARALLEL,
    ParallelLayout,
    Size,
    build_device_mesh,
    build_hsdp_mesh,
    describe_rank,
    resolve_layout,
    validate_size,
)
from lightning_cp.mixers.mode import validate_mixer_mode
from lightning_cp.rank_errors import install_same_error_hook, install_short_error_hook
from lightning_cp.session import ContextParallelSession
from lightning_cp.strategies.replicas import broadcast_replicated_state
from lightning_cp.watchdog import RankWatchdog, TerminatedBySignal

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

#: Default timeout of the process group's collectives. A CP ring runs collectives in every attention
#: layer, so a rank that hangs stalls all the others at once; torch's 30 minutes is a long wait for
#: that. Checkpointing a large model takes collectives too: raise it (``timeout=``) if that is slow.
DEFAULT_COLLECTIVE_TIMEOUT = timedelta(minutes=10)
#: Default silence after which a rank counts as stopped (see Note [rank watchdog]). Far above any pause
#: of a healthy process (a heartbeat thread runs while the main thread computes or waits), far below
#: the collective timeout, which would blame the waiting ranks instead.
DEFAULT_HEARTBEAT_TIMEOUT = timedelta(minutes=2)


def enable_determinism() -> None:
    """Make this process's computation repeatable: deterministic kernels only, no cuDNN autotuning.

    With it, two runs of the same configuration (same seeds, data and layout) give identical losses.
    The CPU ring is deterministic anyway; on GPU, torch raises for an op without a deterministic
    implementation rather than silently varying.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


class ContextParallelMixin:
    """Mixed into a Lightning ``ModelParallelStrategy`` (Trainer or Fabric side) to add the CP dimension."""

    _data_parallel_size: Size
    _tensor_parallel_size: Size
    _device_mesh: DeviceMesh | None
    world_size: int
    global_rank: int
    local_rank: int
    root_device: torch.device
    launcher: Any
    num_processes: int
    num_nodes: int

    def _init_context_parallel(
        self,
        cp_size: Size,
        data_parallel_size: Size,
        tensor_parallel_size: Size,
        deterministic: bool = False,
        heartbeat_timeout: timedelta | None = DEFAULT_HEARTBEAT_TIMEOUT,
        data_parallel_replicate_size: int = 1,
        chunked_loss: bool | int = False,
        activation_checkpointing: bool = False,
        **session_options: Any,
    ) -> None:
        """Check the arguments now (before any process starts) and keep them for the session."""
        install_short_error_hook()  # an error before the launch (a layout that cannot work) in a few lines too
        if not isinstance(data_parallel_replicate_size, int) or data_parallel_replicate_size < 1:
            raise ValueError(
                f"`data_parallel_replicate_size` must be a positive int, got {data_parallel_replicate_size!r}."
            )
        self._replicate_size = data_parallel_replicate_size
        chunk_tokens_of(chunked_loss)  # refuse a bad value now, before any process starts
        self._chunked_loss = chunked_loss
        self._activation_checkpointing = activation_checkpointing
        self._hsdp_mesh: DeviceMesh | None = None
        validate_size("cp_size", cp_size)
        validate_size("data_parallel_size", data_parallel_size)
        validate_size("tensor_parallel_size", tensor_parallel_size)
        validate_rotate_method(session_options["rotate_method"])
        validate_cp_mode(session_options["cp_mode"], session_options["ulysses_size"])
        validate_mixer_mode(session_options["mixer_mode"])
        self._cp_size = cp_size
        self._deterministic = deterministic
        self._heartbeat_timeout = heartbeat_timeout
        self._watchdog: RankWatchdog | None = None
        self._session_options = session_options
        self._layout: ParallelLayout | None = None
        self._session: ContextParallelSession | None = None

    def _configure_launcher(self) -> None:
        """Check the sizes against devices × nodes, then let Lightning make its launcher.

        Lightning calls this when the Trainer or Fabric object is built, in the main process, once the
        devices and the number of nodes are known and before any rank is launched: a layout that cannot
        work fails here with one short traceback instead of one per rank after the launch.
        """
        self._check_layout_before_launch()
        super()._configure_launcher()  # type: ignore[misc]

    def _check_layout_before_launch(self) -> None:
        """Resolve the layout for ``devices × num_nodes`` processes; a ``ValueError`` naming both if it cannot."""
        devices, nodes = self.num_processes, self.num_nodes
        if not devices:
            return  # devices not known yet: checked again after the launch (`_setup_context_parallel_mesh`)
        sizes = (self._cp_size, self._data_parallel_size, self._tensor_parallel_size)
        try:
            resolve_layout(devices * nodes, *sizes, world_origin=f"devices={devices} × num_nodes={nodes}")
        except ValueError as error:
            raise ValueError(f"lightning_cp: {error}") from None  # the cause is the sizes, not this frame

    def _setup_context_parallel_mesh(self) -> None:
        """Resolve the layout against the world size, build the mesh and the session (after init_process_group)."""
        if self._deterministic:
            enable_determinism()
        self._layout = resolve_layout(
            self.world_size, self._cp_size, self._data_parallel_size, self._tensor_parallel_size
        )
        self._device_mesh, data_context_mesh = build_device_mesh(self._layout, self.root_device)
        if self._replicate_size > 1:
            self._hsdp_mesh = build_hsdp_mesh(self._device_mesh, self._replicate_size)
        self._session = ContextParallelSession(self._device_mesh, data_context_mesh, **self._session_options)
        install_same_error_hook(self._session.cp_mesh)
        self._start_watchdog()
        # A rank blocked in a collective at SIGTERM / Ctrl-C hears it through the watchdog only.
        self._session.received_signal = lambda: self.received_signal

    def _start_watchdog(self) -> None:
        """Start this rank's heartbeat and signal thread (Note [rank watchdog] in ``watchdog.py``)."""
        if self._watchdog is not None or self.world_size == 1:
            return
        mesh = self._device_mesh
        assert mesh is not None
        timeout = self._heartbeat_timeout
        self._watchdog = RankWatchdog(
            self.global_rank,
            peers=mesh[CONTEXT_PARALLEL].mesh.flatten().tolist(),
            describe_rank=lambda rank: describe_rank(mesh, rank),
            heartbeat_timeout=None if timeout is None else timeout.total_seconds(),
            launched_pids=lambda: [process.pid for process in getattr(self.launcher, "procs", [])],
            # Lightning's launcher starts ranks > 0 as its children: they must not outlive it.
            watch_launcher=self.local_rank > 0,
        ).start()
        atexit.register(self._stop_watchdog)

    def teardown(self) -> None:
        """Stop the watchdog (telling the peers this rank finished), then Lightning's teardown."""
        self._stop_watchdog()
        super().teardown()  # type: ignore[misc]

    def _stop_watchdog(self) -> None:
        # the exit handler holds this strategy, and through it the model and data: released once stopped
        atexit.unregister(self._stop_watchdog)
        if self._watchdog is not None:
            watchdog, self._watchdog = self._watchdog, None
            watchdog.stop()

    def _signal_exit_code(self, exception: BaseException) -> int | None:
        """128 + the signal that ended the job, or ``None`` when no signal did.

        Ctrl-C raises ``KeyboardInterrupt`` on a rank that runs Python code; a rank blocked in a collective at
        that moment gets the peer's departure as an error instead, so the signals this rank's watchdog heard
        count too (Note [rank watchdog]).
        """
        if isinstance(exception, KeyboardInterrupt):
            return 128 + signal.SIGINT
        if isinstance(exception, TerminatedBySignal):
            return 128 + exception.signum
        received = self.received_signal
        return None if received is None else 128 + received

    @property
    def received_signal(self) -> int | None:
        """The first SIGINT or SIGTERM this rank's watchdog heard (``None``: none, or no watchdog runs)."""
        return self._watchdog.received_signal if self._watchdog is not None else None

    def _apply_memory_options(self, module: torch.nn.Module) -> None:
        """Chunked loss and activation checkpointing on the user's model (before the session wraps its loss)."""
        apply_memory_options(
            module, chunked_loss=self._chunked_loss, activation_checkpointing=self._activation_checkpointing
        )

    def _synchronize_replicas(self, module: torch.nn.Module) -> None:
        """Copy rank 0's replicated weights to every rank, as DDP does: correct even if the user never seeded."""
        broadcast_replicated_state(module, self.data_context_mesh)

    @property
    def session(self) -> ContextParallelSession:
        """Per-process CP state: sharding, ring attention, token-correct losses."""
        if self._session is None:
            raise RuntimeError("The context-parallel session exists only after the processes have started.")
        return self._session

    @property
    def hsdp_mesh(self) -> DeviceMesh:
        """The (``data_parallel_replicate``, ``data_shard_context_parallel``, ``tensor_parallel``) mesh.

        For HSDP: ``fully_shard(layer, mesh=strategy.hsdp_mesh["data_parallel_replicate",
        "data_shard_context_parallel"])`` keeps ``data_parallel_replicate_size`` copies of the model,
        each sharded over the data-shard × context ranks.
        """
        if self._hsdp_mesh is None:
            raise RuntimeError(
                "The HSDP mesh exists only with `data_parallel_replicate_size` > 1, after the processes started."
            )
        return self._hsdp_mesh

    @property
    def layout(self) -> ParallelLayout:
        """The resolved data × context × tensor parallel sizes."""
        if self._layout is None:
            raise RuntimeError("The parallel layout is known only after the processes have started.")
        return self._layout

    @property
    def cp_mesh(self) -> DeviceMesh:
        """The context-parallel submesh: the ranks sharing one sequence."""
        return self.session.cp_mesh

    @property
    def data_context_mesh(self) -> DeviceMesh:
        """The flattened data × context submesh: shard parameters with FSDP2 over it."""
        return self.session.data_context_mesh

    def token_correct_loss(self, logits: torch.Tensor | HiddenStatesForLoss, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy for a loss of your own, under CP: the whole batch's value, the right gradient.

        ``labels`` are the position-aligned labels of the sharded batch (``batch["labels"]``). With the
        chunked loss, pass ``lightning_cp.chunked_logits(hidden_states, model.lm_head)`` as ``logits``.
        """
        return self.session.token_correct_loss(logits, labels)
