"""Fit a tiny Llama under CP=2 once per training loss, one step each; write each fit's warnings (rank 0).

Every fit has its own strategy and callback, so each one's first training step is checked; the
process group started by the first fit serves the others, so one launch covers every loss.
"""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from common import BATCH_SIZE, exit_skipping_teardown, hf_style_samples, tiny_causal_lm
from torch.utils.data import DataLoader

import lightning_cp
from lightning_cp import ContextParallelStrategy
from lightning_cp.callbacks import ContextParallelCallback


def _logits(module: L.LightningModule, batch: dict) -> torch.Tensor:
    return module.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits


def _model_loss(module: L.LightningModule, batch: dict) -> torch.Tensor:
    return module.model(**batch).loss


def _token_correct(module: L.LightningModule, batch: dict) -> torch.Tensor:
    return module.trainer.strategy.token_correct_loss(_logits(module, batch), batch["labels"])


def _shifted(module: L.LightningModule, batch: dict) -> torch.Tensor:
    """The usual hand-written causal-LM loss: it shifts the labels itself."""
    logits = _logits(module, batch)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1))


def _plain_mean(module: L.LightningModule, batch: dict) -> torch.Tensor:
    """A per-shard mean computed after ``model(**batch)``, which computed (and dropped) the model's own loss."""
    logits = module.model(**batch).logits
    return F.cross_entropy(logits.view(-1, logits.size(-1)), batch["labels"].view(-1))


def _rank_share(module: L.LightningModule, batch: dict) -> torch.Tensor:
    """The functional API's share, used under the strategy (which averages gradients over the ranks)."""
    mesh = module.trainer.strategy.data_context_mesh
    return lightning_cp.token_correct_loss(_logits(module, batch), batch["labels"], mesh)


def _unrecognised(module: L.LightningModule, batch: dict) -> torch.Tensor:
    return module.model(**batch).loss + 0.1 * _logits(module, batch).float().pow(2).mean()


LOSSES: dict[str, Callable[[L.LightningModule, dict], torch.Tensor]] = {
    "model": _model_loss,
    "token_correct": _token_correct,
    "shifted": _shifted,
    "plain_mean": _plain_mean,
    "rank_share": _rank_share,
    "unrecognised": _unrecognised,
    "one_token": _model_loss,  # the model's own loss on sequences of one token: no target at all
}
#: Sequence length of each fit's samples: a loss case's name may ask for its own.
SEQ_LENS = {"one_token": 1}


class LossModule(L.LightningModule):
    """A tiny Llama whose training step returns the loss named ``loss``."""

    def __init__(self, loss: str) -> None:
        super().__init__()
        self.model = tiny_causal_lm("llama")
        self.loss = LOSSES[loss]
        self.seq_len = SEQ_LENS.get(loss, 34)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.loss(self, batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(hf_style_samples(2 * BATCH_SIZE, self.seq_len), batch_size=BATCH_SIZE)


def _fit(loss: str, accumulate: int) -> list[str]:
    """One training step with ``loss``; the lightning_cp warnings it raised."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ContextParallelStrategy(cp_size=2),
        callbacks=[ContextParallelCallback(log_throughput=False)],
        max_steps=1,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(LossModule(loss))
    return [str(warning.message) for warning in caught if "lightning_cp" in str(warning.message)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # the right losses with gradient accumulation: Lightning divides the loss before callbacks see it
    result = {loss: _fit(loss, accumulate=2 if loss in ("model", "token_correct") else 1) for loss in LOSSES}
    if torch.distributed.get_rank() == 0:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
    exit_skipping_teardown()
