"""Train a small Llama on packed variable-length documents with the Trainer and context parallelism (CPU).

Documents of different lengths are packed into fixed-length rows the way Hugging Face's padding-free
collator does it: ``position_ids`` restart at 0 for every document and each document's first label is
-100. lightning_cp recognises the packing, lays every document out across the ranks (head/tail per
document) and masks attention per document (in Ulysses, which cp_mode='auto' picks for this Llama, as
in the ring), so no token attends across a document boundary, and the last token of a document does
not learn to predict the next document's first.

    python examples/packed_sequences_cp.py --seq-len 1024 --steps 20
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def parse_args() -> argparse.Namespace:
    """The command line, parsed before torch and Lightning are imported: ``--help`` answers at once."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=2, help="packed rows per step (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks = CPU processes (default: 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    return parser.parse_args()


def packed_rows(count: int, seq_len: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``count`` rows of ``seq_len`` tokens, each packing documents of 16 .. seq_len // 2 tokens.

    A document's tokens go up by a per-document stride from a random start: learnable, different per
    document.
    """
    import torch
    from small_llama import VOCAB_SIZE

    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        documents, filled = [], 0
        while filled < seq_len:
            length = min(int(torch.randint(16, seq_len // 2 + 1, (1,), generator=generator)), seq_len - filled)
            start = int(torch.randint(0, VOCAB_SIZE, (1,), generator=generator))
            stride = 1 + int(torch.randint(0, 3, (1,), generator=generator))
            documents.append((start + stride * torch.arange(length)) % VOCAB_SIZE)
            filled += length
        input_ids = torch.cat(documents)
        position_ids = torch.cat([torch.arange(len(document)) for document in documents])
        labels = input_ids.masked_fill(position_ids == 0, -100)  # no target across a document boundary
        rows.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return rows


def main() -> None:
    args = parse_args()
    import lightning as L
    from small_llama import CausalLM
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
    loader = DataLoader(packed_rows(args.steps * args.batch_size, args.seq_len), batch_size=args.batch_size)
    trainer.fit(CausalLM(args.lr), train_dataloaders=loader)


if __name__ == "__main__":
    main()
