"""Context parallelism for ``lightning.Fabric``: a ``ModelParallelStrategy`` with a "cp" mesh dimension.

A training loop with it::

    strategy = ContextParallelStrategy(cp_size=2)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)
    for batch in fabric.setup_dataloaders(loader):
        with strategy.context_parallel(batch):      # shards the batch in place, ring attention on
            loss = model(**batch).loss              # Hugging Face: token-correct already
            fabric.backward(loss)
        optimizer.step()                            # gradients averaged over data × context first
        optimizer.zero_grad()
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lightning.fabric.strategies import STRATEGY_REGISTRY
from lightning.fabric.strategies import ModelParallelStrategy as FabricModelParallelStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.fabric.utilities.types import _PATH, Optimizable
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from typing_extensions import override

from lightning_cp.mesh import Size
from lightning_cp.rank_errors import ExceptHook, full_tracebacks
from lightning_cp.strategies.checkpoint import (
    is_replicated_state,
    load_checkpoint,
    loads_here,
    save_replicated_checkpoint,
)
from lightning_cp.strategies.gradients import average_replicated_gradients, check_sharded_parameters
from lightning_cp.strategies.shared import DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, ContextParallelMixin
from lightning_cp.watchdog import TerminatedBySignal

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh


def _replicate(module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
    return module


#: Seconds the launcher waits for the ranks it launched to end on their own after a signal before killing them.
_LAUNCHED_RANKS_GRACE = 2.0


@dataclass(frozen=True)
class _SignalExitHook:
    """A ``sys.excepthook``: the error that ends a rank after Ctrl-C or SIGTERM ends it with 128 + the signal
    (:meth:`ContextParallelStrategy._exit_after_signal`); any other error goes on to ``previous``."""

    strategy: ContextParallelStrategy
    previous: ExceptHook

    def __call__(self, error_type: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        code = self.strategy._signal_exit_code(error)
        if code is None:
            self.previous(error_type, error, traceback)
            return
        if full_tracebacks():
            self.previous(error_type, error, traceback)
        self.strategy._exit_after_signal(error, code)


def _silence_lightning_child_observer() -> None:
    """Stop Lightning's child-process observer from SIGKILLing this launcher when a rank it launched exits non-zero.

    The observer (a thread of Fabric's launcher) kills every process once a launched rank's exit code is not 0: a
    rank that ends with 130 before its launcher does would make the launcher's own exit code -9.
    """
    try:
        from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
    except ImportError:  # pragma: no cover - another Lightning version: nothing to silence by that name
        return
    for thread in threading.enumerate():
        if isinstance(thread, _ChildProcessObserver):
            thread._terminate_all = lambda: None  # type: ignore[method-assign]
            thread._finished = True


def _end_launched_ranks(processes: list[subprocess.Popen], grace: float) -> None:
    """Give the launched ranks ``grace`` seconds to end (the signal reached them too), then SIGKILL those left."""
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            process.kill()


class ContextParallelStrategy(ContextParallelMixin, FabricModelParallelStrategy):
    """Fabric's model-parallel strategy with a context-parallel dimension; see the module docstring.

    Arguments:
        parallelize_fn: applies FSDP2 / TP to the module given the device mesh (use
            ``device_mesh["data_context_parallel"]`` for ``fully_shard``). Default: leave it replicated;
            its gradients are then averaged over the data × context ranks in ``optimizer.step()``.
        cp_size, data_parallel_size, tensor_parallel_size, rotate_method, load_balance, shift_labels,
        padding_token_id, check_batch_every_n_steps: as in
        :class:`lightning_cp.strategies.trainer.ContextParallelStrategy`.
        deterministic: deterministic kernels only, so two runs of one configuration give identical losses.
        timeout: how long a collective may wait for the other ranks before the job fails (default 10 min).
        data_parallel_replicate_size: HSDP: copies of the model among the data-parallel ranks, each
            sharded over data_parallel / replicate × cp ranks (see ``hsdp_mesh``). Default 1.
        chunked_loss: compute a Hugging Face causal LM's loss chunk by chunk from the hidden states, so the
            full logits never exist (``True`` or tokens per chunk; see :mod:`lightning_cp.chunked_loss`).
        activation_checkpointing: recompute the decoder layers in backward (the CP attention runs again).
        offload_activations: on CUDA, keep the activations saved for backward in pinned host memory.
        cp_mode: the CP mechanism: ``"auto"`` (default: decided per model, see :mod:`lightning_cp.cp_mode`),
            ``"ring"``, ``"ulysses"`` (all-to-all of heads: any attention variant) or ``"hybrid"``.
        ulysses_size: ranks of each Ulysses group under ``cp_mode="hybrid"`` (the ring runs across groups).
        mixer_mode: the CP mechanism of sequence mixers that are not attention (gated delta nets, Mamba
            scans, short convolutions, recurrences): ``"auto"`` (default: per layer), ``"all_to_all"``,
            ``"state_passing"`` or ``"gather"`` (see :mod:`lightning_cp.mixers.mode`).
        heartbeat_timeout: a rank whose heartbeat is silent this long (stopped, frozen) is named and the job
            ended (default 2 min; ``None``: never). Ctrl-C and SIGTERM end every rank within seconds either way.
        save_distributed_checkpoint, process_group_backend: as in Fabric's ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        parallelize_fn: Callable[[nn.Module, DeviceMesh], nn.Module] | None = None,
        cp_size: Size = "auto",
        data_parallel_size: Size = "auto",
        tensor_parallel_size: Size = 1,
        rotate_method: str = "allgather",
        load_balance: bool = True,
        shift_labels: bool = True,
        padding_token_id: int = 0,
        check_batch_every_n_steps: int = 1,
        deterministic: bool = False,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = DEFAULT_COLLECTIVE_TIMEOUT,
        heartbeat_timeout: timedelta | None = DEFAULT_HEARTBEAT_TIMEOUT,
        data_parallel_replicate_size: int = 1,
        chunked_loss: bool | int = False,
        activation_checkpointing: bool = False,
        offload_activations: bool = False,
        cp_mode: str = "auto",
        ulysses_size: int | None = None,
        mixer_mode: str = "auto",
    ) -> None:
        super().__init__(
            parallelize_fn=parallelize_fn or _replicate,
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self._init_context_parallel(
            cp_size,
            data_parallel_size,
            tensor_parallel_size,
            deterministic=deterministic,
            heartbeat_timeout=heartbeat_timeout,
            data_parallel_replicate_size=data_parallel_replicate_size,
            chunked_loss=chunked_loss,
            activation_checkpointing=activation_checkpointing,
            offload_activations=offload_activations,
            cp_mode=cp_mode,
            ulysses_size=ulysses_size,
            mixer_mode=mixer_mode,
            load_balance=load_balance,
            rotate_method=rotate_method,
            shift_labels=shift_labels,
            padding_token_id=padding_token_id,
            check_batch_every_n_steps=check_batch_every_n_steps,
        )
        self._modules: list[nn.Module] = []
        self._terminating = False

    @override
    def setup_environment(self) -> None:
        super(FabricModelParallelStrategy, self).setup_environment()
        self._setup_distributed()
        self._setup_context_parallel_mesh()
        self._install_signal_exit_hook()
        rank_zero_info(f"lightning_cp: {self.layout.describe()} on {self.world_size} processes")

    def _install_signal_exit_hook(self) -> None:
        """Make Ctrl-C and SIGTERM end every rank with 128 + the signal and a line saying so, as the Trainer's do.

        Fabric leaves a ``KeyboardInterrupt`` to the user's script; uncaught, Python prints its traceback and kills
        itself with SIGINT (returncode -2), and SIGTERM kills a process outright (-15). So an excepthook takes the
        error that ends the script (installing again in the same process replaces it), and SIGTERM, unless the
        script handles it itself, raises :class:`~lightning_cp.watchdog.TerminatedBySignal` in the main thread.
        """
        previous = sys.excepthook
        if isinstance(previous, _SignalExitHook):
            previous = previous.previous
        sys.excepthook = _SignalExitHook(self, previous)
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may set signal handlers
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            signal.signal(signal.SIGINT, self._on_signal)
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        """SIGINT: ``KeyboardInterrupt``, as Python's own handler. SIGTERM: passed on to the launched ranks, then
        :class:`~lightning_cp.watchdog.TerminatedBySignal`, once: a repeated SIGTERM (the launcher's, passed on to
        a rank that had one already) does not interrupt the ``finally`` blocks the first one started."""
        launched = [process for process in getattr(self.launcher, "procs", []) if process.poll() is None]
        if launched:
            _silence_lightning_child_observer()  # they are about to end with 128 + the signal
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._terminating:
            return
        self._terminating = True
        for process in launched:
            process.send_signal(signum)
        raise TerminatedBySignal(signum)

    def _exit_after_signal(self, error: BaseException, code: int) -> None:
        """Say what happened, run the atexit handlers, end the ranks this process launched, exit with ``code``.

        Called by the excepthook with the error that ended the script after a signal: a ``KeyboardInterrupt``, a
        :class:`~lightning_cp.watchdog.TerminatedBySignal`, or a lost peer on a rank blocked in a collective then.
        """
        # The script's finally blocks ran before its excepthook; its atexit handlers run here; os._exit sets the code.
        self._terminating = True
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the handlers short
        session = self._session
        if session is not None and session.reported is not error:
            session.report_failure(error)
        launched = list(getattr(self.launcher, "procs", []))
        if launched:
            _silence_lightning_child_observer()
        run_exit_functions = getattr(atexit, "_run_exitfuncs", None)
        if run_exit_functions is not None:
            run_exit_functions()
        _end_launched_ranks(launched, _LAUNCHED_RANKS_GRACE)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        module = super().setup_module(module)
        check_sharded_parameters(module, self.layout.context_parallel)
        if not any(isinstance(param, DTensor) for param in module.parameters()):
            module.to(self.root_device)
        self._synchronize_replicas(module)
        self._apply_memory_options(module)
        self.session.prepare_model(module)
        rank_zero_info(f"lightning_cp: {self.session.describe_attention()}")
        self._modules.append(module)
        return module

    @override
    def optimizer_step(self, optimizer: Optimizable, **kwargs: Any) -> Any:
        for module in self._modules:
            average_replicated_gradients(module, self.data_context_mesh)
        return super().optimizer_step(optimizer, **kwargs)

    @override
    def save_checkpoint(
        self,
        path: _PATH,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Callable[[str, Any], bool]] | None = None,
    ) -> None:
        """As Fabric's, and also for a replicated model (sharded directory, or one file if not distributed)."""
        if storage_options is not None or filter is not None or not is_replicated_state(state):
            return super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)
        consolidated = not self._save_distributed_checkpoint
        save_replicated_checkpoint(Path(self.broadcast(path)), state, consolidated=consolidated, rank=self.global_rank)
        self.barrier("lightning_cp_save_checkpoint")
        return None

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        state: nn.Module | Any | dict[str, Any] | None = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """As Fabric's, and also into a replicated model; any layout's checkpoint loads into any other.

        Single files are loaded by lightning_cp for every model: Lightning's loader fails on one whose
        optimizer has no state (plain SGD) in an FSDP2 / TP model (see ``strategies/checkpoint.py``).
        """
        path = Path(self.broadcast(path))
        if not isinstance(state, dict) or not loads_here(path, state):
            return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        return load_checkpoint(path, state, strict=strict, weights_only=weights_only)

    @contextmanager
    def context_parallel(
        self, batch: MutableMapping[str, Any], *, require_labels: bool = True
    ) -> Iterator[MutableMapping[str, Any]]:
        """Shard ``batch`` in place for this rank and keep ring attention on: run forward and backward inside.

        On the first training step, :meth:`backward` also checks the loss it is given (see there).
        """
        with self.session.step(batch, require_labels=require_labels) as local:
            self.session.watch_loss(self._modules, local)
            yield local

    @override
    def backward(self, tensor: Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        """As Fabric's; on the first training step, warn (rank zero) when the loss is one that is wrong under CP.

        The warning names the mistake (labels shifted again, a per-shard mean, ...) and what to call instead.
        """
        warning = self.session.check_loss(
            tensor, model_loss="model(**batch).loss", helper="strategy.token_correct_loss"
        )
        if warning is not None:
            rank_zero_warn(warning)
        super().backward(tensor, module, *args, **kwargs)


STRATEGY_REGISTRY.register(
    "context_parallel",
    ContextParallelStrategy,
    description="Context parallelism (ring attention over a sharded sequence) from lightning_cp",
    override=True,
)
