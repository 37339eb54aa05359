"""Train a small Llama on long synthetic sequences with the Lightning Trainer and context parallelism (CPU).

Two CPU processes share every sequence (cp=2): each holds half of it, and attention runs across the
halves by the mechanism cp_mode='auto' picks for the model (Ulysses for this Llama: an all-to-all trades
sequence shards for heads; the ring where Ulysses cannot run); the start-up line says which and why. The
LightningModule (``CausalLM`` in ``small_llama.py``) is plain Lightning + Hugging Face code; the
strategy and the callback are the only additions. No download: the model is built from a config.

    python examples/trainer_llama_cp.py --seq-len 1024 --steps 20
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
    parser.add_argument("--fsdp", action="store_true", help="shard weights with FSDP2 over data × context ranks")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    import lightning as L
    from small_llama import CausalLM, synthetic_sequences
    from torch.utils.data import DataLoader

    from lightning_cp import ContextParallelStrategy
    from lightning_cp.callbacks import ContextParallelCallback

    L.seed_everything(0)  # for reproducible numbers only: the strategy gives every rank rank 0's weights at setup
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.cp,
        strategy=ContextParallelStrategy(cp_size=args.cp),
        callbacks=[ContextParallelCallback()],
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    loader = DataLoader(synthetic_sequences(args.steps * args.batch_size, args.seq_len), batch_size=args.batch_size)
    trainer.fit(CausalLM(args.lr, args.fsdp), train_dataloaders=loader)


if __name__ == "__main__":
    main()
