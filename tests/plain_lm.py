"""A tiny causal LM that is not a Hugging Face model: plain torch modules, no config, a loss of its own.

Importable by path (``--module plain_lm:plain_causal_lm --loss plain_lm:plain_lm_loss`` with ``tests/``
on ``PYTHONPATH``), for the doctor's command line.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import scaled_dot_product_attention as sdpa_imported_by_name

from lightning_cp.doctor import token_correct_loss

VOCAB_SIZE = 64


class SelfAttention(nn.Module):
    """Causal multi-head self-attention through ``F.scaled_dot_product_attention`` (the ring under CP)."""

    is_causal = True

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, is_causal: bool = True
    ) -> torch.Tensor:
        batch, seq, dim = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal)
        return self.out(out.transpose(1, 2).reshape(batch, seq, dim))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.self_attn = SelfAttention(dim, heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.attn_norm(hidden))
        return hidden + self.mlp(self.mlp_norm(hidden))


class PlainCausalLM(nn.Module):
    """Token and learned position embeddings, two blocks, a head; ``forward`` returns the logits."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2, max_positions: int = 256) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB_SIZE, dim)
        self.positions = nn.Embedding(max_positions, dim)
        self.layers = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB_SIZE, bias=False)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.size(1), device=input_ids.device).expand_as(input_ids)
        hidden = self.tokens(input_ids) + self.positions(position_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(self.norm(hidden))


class SelfAttentionCallingSdpaByName(SelfAttention):
    """The same attention calling an SDPA imported by name: no CP mode reaches it (it never sees CP's function)."""

    def forward(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, is_causal: bool = True
    ) -> torch.Tensor:
        batch, seq, dim = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, seq, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        out = sdpa_imported_by_name(q, k, v, attn_mask=attention_mask, is_causal=is_causal)
        return self.out(out.transpose(1, 2).reshape(batch, seq, dim))


def plain_lm_with_sdpa_imported_by_name() -> PlainCausalLM:
    """:func:`plain_causal_lm` whose attention calls SDPA imported by name (a model CP cannot run)."""
    model = plain_causal_lm()
    for layer in model.layers:
        attention = SelfAttentionCallingSdpaByName(layer.self_attn.out.in_features, layer.self_attn.heads)
        attention.load_state_dict(layer.self_attn.state_dict())
        layer.self_attn = attention
    return model


def plain_causal_lm() -> PlainCausalLM:
    """The factory the doctor is given: the same weights on every rank."""
    torch.manual_seed(0)
    return PlainCausalLM()


def plain_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss its training step computes: token-correct cross-entropy of the position-aligned labels."""
    logits = model(batch["input_ids"], position_ids=batch.get("position_ids"))
    return token_correct_loss(logits, batch["labels"])
