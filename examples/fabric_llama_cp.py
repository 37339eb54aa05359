"""Train a small Llama on long synthetic sequences with Lightning Fabric and context parallelism (CPU).

The loop is the user's own; ``strategy.context_parallel(batch)`` shards the batch for this rank and
keeps context-parallel attention on (the mechanism cp_mode='auto' picks: Ulysses for this Llama) across
forward and ``fabric.backward``. No download: the model is built
from a config.

    python examples/fabric_llama_cp.py --seq-len 1024 --steps 20
"""

from __future__ import annotations

import argparse


def parse_args() -> argparse.Namespace:
    """The command line, parsed before torch and Lightning are imported: ``--help`` answers at once."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks = CPU processes (default: 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import lightning as L
    import torch
    from small_llama import small_llama, synthetic_sequences
    from torch.utils.data import DataLoader

    from lightning_cp.fabric import ContextParallelStrategy

    strategy = ContextParallelStrategy(cp_size=args.cp)
    fabric = L.Fabric(accelerator="cpu", devices=args.cp, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)  # for reproducible numbers only: the strategy gives every rank rank 0's weights
    model = fabric.setup(small_llama())
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
