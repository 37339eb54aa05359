"""The per-batch side of context parallelism in the Lightning ``Trainer``."""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_cp.session import ContextParallelSession
from lightning_cp.strategies.trainer import ContextParallelStrategy


class ContextParallelCallback(Callback):
    """Shards each batch across the context-parallel ranks and keeps ring attention on around it.

    At the start of fit / validate / test / predict it hooks the model's attention modules (causal,
    no explicit masks, under CP) and makes Hugging Face losses token-correct. For every training
    batch it shards ``input_ids`` / ``inputs_embeds``, ``labels``, ``position_ids``, ``loss_mask`` and
    ``padding_mask`` (labels shifted first), and switches ring attention on from
    ``on_train_batch_start`` to ``on_train_batch_end``, so it spans forward *and* backward, with
    automatic or manual optimization and gradient accumulation; an exception switches it off.
    Validation, test and prediction batches run under CP the same way. On the first training step it
    compares the loss ``training_step`` returned with the losses that are wrong under CP and warns (rank
    zero), naming the mistake and what to return instead.

    Args:
        log_throughput: log ``tokens_per_sec`` (global sequence tokens per second) to the progress bar.
    """

    def __init__(self, log_throughput: bool = True) -> None:
        self.log_throughput = log_throughput
        self._announced = False
        self._started_at = 0.0

    @staticmethod
    def _session(trainer: pl.Trainer) -> ContextParallelSession:
        return trainer.strategy.session  # type: ignore[attr-defined]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not isinstance(trainer.strategy, ContextParallelStrategy):
            raise MisconfigurationException(
                f"`ContextParallelCallback` needs `ContextParallelStrategy`, but the Trainer uses"
                f" `{type(trainer.strategy).__name__}`: pass `strategy=ContextParallelStrategy(cp_size=...)`."
            )
        trainer.strategy.attach_callback()

    def _prepare_model(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._session(trainer).prepare_model(pl_module)

    on_fit_start = on_validation_start = on_test_start = on_predict_start = _prepare_model  # type: ignore[assignment]

    def _start_batch(self, trainer: pl.Trainer, batch: Any, *, require_labels: bool) -> None:
        session = self._session(trainer)
        step = session.shard(batch, require_labels=require_labels)
        if not self._announced:
            self._announced = True
            packing = (
                "" if step.layout is None else f"; {step.layout.num_documents} packed documents, masked per document"
            )
            rank_zero_info(
                f"lightning_cp: {trainer.strategy.layout.describe()}; sequence {step.seq_len} tokens"  # type: ignore[attr-defined]
                f" (padded to {step.padded_len}) -> {step.padded_len // session.cp_mesh.size()} per rank"
                f"{', load balanced' if session.load_balance else ''}{packing}; {session.describe_attention()}"
            )
        session.open()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._start_batch(trainer, batch, require_labels=True)
        self._session(trainer).watch_loss([pl_module], batch)  # the first training step's only
        self._started_at = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        session = self._session(trainer)
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        warning = session.check_loss(
            loss if isinstance(loss, torch.Tensor) else None,
            model_loss="self.model(**batch).loss",
            helper="self.trainer.strategy.token_correct_loss",
        )
        if warning is not None:
            rank_zero_warn(warning)
        step = session.finish()
        if step is None:
            return
        if self.log_throughput:
            elapsed = max(time.perf_counter() - self._started_at, 1e-9)
            tokens = step.seq_len * step.batch_size * trainer.strategy.layout.data_parallel  # type: ignore[attr-defined]
            pl_module.log("tokens_per_sec", tokens / elapsed, prog_bar=True, on_step=True, batch_size=step.batch_size)

    def _end_batch(self, trainer: pl.Trainer, *args: Any) -> None:
        self._session(trainer).finish()

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start_batch(trainer, batch, require_labels=False)

    @override
    def on_test_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start_batch(trainer, batch, require_labels=False)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._start_batch(trainer, batch, require_labels=False)

    on_validation_batch_end = on_test_batch_end = on_predict_batch_end = _end_batch  # type: ignore[assignment]

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        session = getattr(trainer.strategy, "_session", None)
        sigterm = isinstance(exception, SIGTERMException)
        if session is not None:
            session.finish()
            code = 128 + signal.SIGTERM
            what = f"received SIGTERM: training stops, and the job ends with exit code {code} (128 + SIGTERM)"
            session.report_failure(exception, what if sigterm else None)
        if sigterm and not exception.code:
            # Lightning stops gracefully on SIGTERM and exits 0; a scheduler would read that as success.
            exception.code = 128 + signal.SIGTERM
