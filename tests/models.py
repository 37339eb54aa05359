"""Tiny Hugging Face models built from configs (nothing downloaded) and batches for the tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

_TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    attn_implementation="sdpa",
)
_FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny_causal_lm(family: str = "llama", seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A 2-layer fp32 causal LM of ``family`` with deterministic weights (same on every rank)."""
    config_cls, model_cls = _FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**_TINY, **overrides})).float()


def shift_labels(input_ids: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token labels aligned with their positions: ``labels[i] = input_ids[i + 1]``, last ignored."""
    return torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], ignore_index)], dim=1)


def lm_batch(batch_size: int = 2, seq_len: int = 130, ignored_share: float = 1 / 3, seed: int = 0) -> dict:
    """Random tokens with shifted labels, ``ignored_share`` of all positions ignored (-100).

    The ignored positions are the first ones of the first row, so the CP shards end up with very
    different numbers of valid labels: a per-shard mean would be wrong.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 256, (batch_size, seq_len), generator=generator)
    labels = shift_labels(input_ids)
    ignored = int(ignored_share * batch_size * seq_len)
    labels.view(-1)[:ignored] = -100
    return {"input_ids": input_ids, "labels": labels}
