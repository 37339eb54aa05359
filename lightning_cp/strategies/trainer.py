"""Context parallelism for the Lightning ``Trainer``: a ``ModelParallelStrategy`` with a "cp" mesh dimension."""

from __future__ import annotations

import signal
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from lightning_cp.mesh import Size
from lightning_cp.strategies.checkpoint import load_checkpoint, loads_here, resume_sampler_epoch
from lightning_cp.strategies.gradients import average_replicated_gradients, check_sharded_parameters
from lightning_cp.strategies.shared import DEFAULT_COLLECTIVE_TIMEOUT, DEFAULT_HEARTBEAT_TIMEOUT, ContextParallelMixin


def ignore_lightning_leafspec_warning() -> None:
    """Ignore the ``LeafSpec`` ``FutureWarning`` that Lightning's own code raises at every fit, and nothing else.

    Lightning 2.6's ``CombinedLoader`` builds ``torch.utils._pytree.LeafSpec()``, which the torch this package
    pins deprecates, so every rank printed the same two lines that no user code can act on. The filter
    matches that message, category and Lightning module only; every other warning is left as it is.
    """
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


class ContextParallelStrategy(ContextParallelMixin, ModelParallelStrategy):
    """Shards the sequence of every batch across a context-parallel group; attention runs as a ring.

    The device mesh has the dimensions ``("data_parallel", "context_parallel", "tensor_parallel")`` and a
    flattened ``"data_context_parallel"`` dimension: apply FSDP2 over the latter in ``configure_model``
    (or leave the model replicated; its gradients are then averaged over data × context ranks before
    each optimizer step). The DataLoader sampler is keyed on the data-parallel rank only, so all ranks
    of a CP group see the same batch. Use it together with
    :class:`~lightning_cp.callbacks.ContextParallelCallback`.

    Arguments:
        cp_size: ranks that share one sequence. ``"auto"``: all ranks left by data and tensor parallelism.
        data_parallel_size: data-parallel replicas. ``"auto"``: world size / (cp_size × tensor_parallel_size).
        tensor_parallel_size: ranks of a tensor-parallel group (apply TP yourself in ``configure_model``).
        rotate_method: how key/value shards travel round the ring, ``"allgather"`` or ``"alltoall"``.
        load_balance: head/tail sharding so every CP rank does the same causal-attention work.
        shift_labels: ``True`` for Hugging Face style labels, which the model shifts itself; they are
            shifted before sharding. ``False`` when the labels are already aligned with positions.
        padding_token_id: id used to pad ``input_ids`` to a multiple of ``2 × cp_size``.
        check_batch_every_n_steps: compare the CP group's batches on every n-th micro-batch (default 1:
            every one, for the price of an all-gather of six numbers; 0: never).
        gather_predictions: gather predicted logits back to the full sequence in ``predict``.
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
        save_distributed_checkpoint, process_group_backend: as in ``ModelParallelStrategy``.
    """

    def __init__(
        self,
        cp_size: Size = "auto",
        data_parallel_size: Size = "auto",
        tensor_parallel_size: Size = 1,
        rotate_method: str = "allgather",
        load_balance: bool = True,
        shift_labels: bool = True,
        padding_token_id: int = 0,
        check_batch_every_n_steps: int = 1,
        deterministic: bool = False,
        gather_predictions: bool = True,
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
        self._gather_predictions = gather_predictions
        self._callback_attached = False
        self._exit_code: int | None = None

    def attach_callback(self) -> None:
        """Note that :class:`~lightning_cp.callbacks.ContextParallelCallback` will shard the batches.

        The callback calls it from its ``setup``, which Lightning runs before the strategy's; so the
        strategy can refuse to run without it and still never import the callback.
        """
        self._callback_attached = True

    @override
    def setup_environment(self) -> None:
        ignore_lightning_leafspec_warning()  # on every rank, before the loops build their loaders
        self._setup_distributed()
        self._setup_context_parallel_mesh()
        assert self.lightning_module is not None
        self.lightning_module._device_mesh = self._device_mesh
        rank_zero_info(f"lightning_cp: {self.layout.describe()} on {self.world_size} processes")

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        # As ModelParallelStrategy.setup, except that `configure_model` is optional: a model left
        # unsharded is replicated, and its gradients are averaged in `optimizer_step`.
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not self._callback_attached:
            raise MisconfigurationException(
                f"`{type(self).__name__}` shards batches through `ContextParallelCallback`: add"
                " `callbacks=[ContextParallelCallback()]` to the Trainer."
            )
        assert self.model is not None
        assert self.accelerator is not None
        self.accelerator.setup(trainer)
        if any(isinstance(module, FullyShardedDataParallel) for module in self.model.modules()):
            raise TypeError(f"`{type(self).__name__}` supports FSDP2 (`fully_shard`), not FSDP1 wrappers.")
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        check_sharded_parameters(self.model, self.layout.context_parallel)
        self._synchronize_replicas(self.model)
        self._apply_memory_options(self.model)
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    @override
    def on_exception(self, exception: BaseException) -> None:
        """Note the exit code a signal calls for (Ctrl-C: 130), for :meth:`teardown`."""
        super().on_exception(exception)
        self._exit_code = self._signal_exit_code(exception)

    @override
    def teardown(self) -> None:
        """Lightning's teardown; after Ctrl-C or SIGTERM, end the process with 128 + the signal.

        Lightning ends a run stopped by Ctrl-C with ``sys.exit(1)`` right after this teardown (and a rank blocked
        in a collective at that moment fails with a lost peer instead); a shell or scheduler would read neither
        as an interruption. So the process exits with 128 + the signal (130 for Ctrl-C) on every rank, as it
        does when the watchdog ends blocked ranks, after killing the ranks it launched (which Lightning does
        after this teardown, too). A ``SystemExit``: ``finally`` blocks and ``atexit`` handlers still run.
        """
        code, self._exit_code = self._exit_code, None
        super().teardown()
        if code is None:
            return
        launcher = self.launcher
        if launcher is not None and getattr(launcher, "procs", None):
            launcher.kill(signal.SIGKILL)
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(code)

    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: pl.LightningModule | torch.nn.Module | None = None,
        **kwargs: Any,
    ) -> Any:
        def closure_then_average_gradients() -> Any:
            result = closure()
            average_replicated_gradients(self.model, self.data_context_mesh)
            return result

        return super().optimizer_step(optimizer, closure_then_average_gradients, model, **kwargs)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """As ``ModelParallelStrategy``'s, and also into a replicated model: resume with any layout.

        Single files are loaded by lightning_cp for every model: Lightning's loader fails on one whose
        optimizer has no state (plain SGD) in an FSDP2 / TP model (see ``strategies/checkpoint.py``).
        """
        path = Path(self.broadcast(checkpoint_path))
        state = {"state_dict": self.model, **{f"optimizer_{i}": opt for i, opt in enumerate(self.optimizers)}}
        if not loads_here(path, state):
            return super().load_checkpoint(path, weights_only)
        assert self.lightning_module is not None
        return load_checkpoint(
            path,
            state,
            strict=self.lightning_module.strict_loading,
            weights_only=weights_only,
            optimizer_states_from_list=True,
        )

    @override
    def process_dataloader(self, dataloader: object) -> object:
        """As Lightning's; a training loader also starts in the resumed epoch's order (see ``resume_sampler_epoch``)."""
        assert self.lightning_module is not None
        if self.lightning_module.trainer.training:
            resume_sampler_epoch(dataloader, self.lightning_module.trainer)
        return super().process_dataloader(dataloader)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        output = super().predict_step(*args, **kwargs)
        return self.session.gather_outputs(output) if self._gather_predictions else output


StrategyRegistry.register(
    "context_parallel",
    ContextParallelStrategy,
    description="Context parallelism (ring attention over a sharded sequence) from lightning_cp",
    override=True,
)
