"""Train a small Llama on long synthetic sequences with Lightning Fabric and context parallelism (CPU).

The loop is the user's own; ``strategy.context_parallel(batch)`` shards the batch for this rank and
keeps ring attention on across forward and ``fabric.backward``. No download: the model is built
from a config.

    python examples/fabric_llama_cp.py --seq-len 1024 --steps 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from trainer_llama_cp import CausalLM, synthetic_sequences  # noqa: E402

from lightning_cp.fabric import ContextParallelStrategy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks = CPU processes (default: 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    args = parser.parse_args()

    strategy = ContextParallelStrategy(cp_size=args.cp)
    fabric = L.Fabric(accelerator="cpu", devices=args.cp, strategy=strategy)
    fabric.launch()
    model = fabric.setup(CausalLM(args.lr, fsdp=False).model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=args.lr))
    loader = fabric.setup_dataloaders(
        DataLoader(synthetic_sequences(args.steps * args.batch_size, args.seq_len), batch_size=args.batch_size)
    )
    for step, batch in enumerate(loader):
        with strategy.context_parallel(batch):
            loss = model(**batch).loss  # token-correct over the whole sequence under CP
            fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        fabric.print(f"step {step}: loss {loss.item():.4f} ({batch['input_ids'].shape[1]} tokens on this rank)")


if __name__ == "__main__":
    main()
