"""One training step of a tiny Llama under CP=2 with Fabric per loss; write each step's warnings (rank 0).

Every step has its own strategy, so each one's first training step is checked; the process group
started by the first Fabric serves the others, so one launch covers every loss.
"""

from __future__ import annotations

import argparse
import warnings

import lightning as L
import torch
import torch.nn.functional as F
from common import BATCH_SIZE, exit_skipping_teardown, hf_style_samples, tiny_causal_lm
from torch.utils.data import DataLoader

from lightning_cp.fabric import ContextParallelStrategy


def _loss(name: str, model: torch.nn.Module, strategy: ContextParallelStrategy, batch: dict) -> torch.Tensor:
    if name == "model":
        return model(**batch).loss
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    if name == "token_correct":
        return strategy.token_correct_loss(logits, batch["labels"])
    # "shifted": the usual hand-written causal-LM loss, which shifts the labels itself
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1))


def _step(name: str, divide_by: int) -> list[str]:
    """One training step whose backward gets the loss ``name`` over ``divide_by``; the lightning_cp warnings."""
    strategy = ContextParallelStrategy(cp_size=2)
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    model = fabric.setup(tiny_causal_lm("llama"))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=0.1))
    batch = next(iter(fabric.setup_dataloaders(DataLoader(hf_style_samples(BATCH_SIZE, 34), batch_size=BATCH_SIZE))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with strategy.context_parallel(batch):
            fabric.backward(_loss(name, model, strategy, batch) / divide_by)
        optimizer.step()
    return [str(warning.message) for warning in caught if "lightning_cp" in str(warning.message)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    # the model's own loss divided as for gradient accumulation: still right
    result = {name: _step(name, 2 if name == "model" else 1) for name in ("model", "token_correct", "shifted")}
    if torch.distributed.get_rank() == 0:
        torch.save(result, args.out)


if __name__ == "__main__":
    main()
    exit_skipping_teardown()
