"""What the Lightning examples share: a small Llama, the LightningModule that trains it, synthetic data.

Plain Lightning + Hugging Face code: nothing here is specific to context parallelism, and nothing is
downloaded (the model is built from a config). It lives apart from the example scripts so that they
parse their arguments, and answer ``--help``, before importing torch, Lightning and transformers.
"""

from __future__ import annotations

import lightning as L
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB_SIZE = 512


def small_llama() -> LlamaForCausalLM:
    """A 2-layer Llama with random weights and SDPA attention (cp_mode='auto' runs it by Ulysses: its heads split)."""
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16384,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


class CausalLM(L.LightningModule):
    """Trains :func:`small_llama` on its own Hugging Face loss, optionally sharded with FSDP2."""

    def __init__(self, lr: float, fsdp: bool = False) -> None:
        super().__init__()
        self.lr, self.fsdp = lr, fsdp
        self.model = small_llama()

    def configure_model(self) -> None:
        if self.fsdp:  # shard weights over data × context ranks; optional, replication works too
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_context_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss  # token-correct over the whole global batch under CP (packed or not)
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
            torch.randint(0, VOCAB_SIZE, (1,), generator=generator),
            1 + int(torch.randint(0, 3, (1,), generator=generator)),
        )
        input_ids = (start + stride * torch.arange(seq_len)) % VOCAB_SIZE
        samples.append({"input_ids": input_ids, "labels": input_ids.clone()})
    return samples
