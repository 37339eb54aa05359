"""Train a small Llama on long synthetic sequences with the Lightning Trainer and context parallelism (CPU).

Two CPU processes share every sequence (cp=2): each holds half of it, attention runs as a ring. The
LightningModule is plain Lightning + Hugging Face code; the strategy and the callback are the only
additions. No download: the model is built from a config.

    python examples/trainer_llama_cp.py --seq-len 1024 --steps 20
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_cp import ContextParallelStrategy
from lightning_cp.callbacks import ContextParallelCallback


class CausalLM(L.LightningModule):
    def __init__(self, lr: float, fsdp: bool) -> None:
        super().__init__()
        self.lr, self.fsdp = lr, fsdp
        config = LlamaConfig(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=16384,
            attn_implementation="sdpa",
        )
        self.model = LlamaForCausalLM(config)

    def configure_model(self) -> None:
        if self.fsdp:  # shard weights over data × context ranks; optional, replication works too
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_context_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss  # token-correct over the whole sequence under CP
        self.log("train_loss", loss, prog_bar=True)
        self.print(f"step {self.global_step}: loss {loss.item():.4f}")
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def synthetic_sequences(count: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Counting sequences (each token is the previous one + a per-sequence stride, modulo the vocabulary),
    learnable within a few steps; Hugging Face labels (the model shifts them itself)."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(count):
        start, stride = (
            torch.randint(0, 512, (1,), generator=generator),
            1 + int(torch.randint(0, 3, (1,), generator=generator)),
        )
        input_ids = (start + stride * torch.arange(seq_len)) % 512
        samples.append({"input_ids": input_ids, "labels": input_ids.clone()})
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: 1024)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default: 20)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks = CPU processes (default: 2)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: 3e-3)")
    parser.add_argument("--fsdp", action="store_true", help="shard weights with FSDP2 over data × context ranks")
    args = parser.parse_args()

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
