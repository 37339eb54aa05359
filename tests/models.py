"""Tiny Hugging Face models built from configs (nothing downloaded) and batches for the tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.nn.functional import scaled_dot_product_attention as sdpa_imported_by_name
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from lightning_cp.sharding.batch import next_token_labels

#: The devices the parity tests run on: CPU always; CUDA when a GPU is present (gloo carries CUDA tensors,
#: so two ranks may share one GPU).
DEVICES = (
    pytest.param("cpu"),
    pytest.param(
        "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")
    ),
)

#: Sizes of the tiny Llama-style models (4 query heads over 2 key/value heads); shared with ``model_zoo``.
TINY_CONFIG = dict(
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
    return model_cls(config_cls(**{**TINY_CONFIG, **overrides})).float()


def lm_batch(batch_size: int = 2, seq_len: int = 130, ignored_share: float = 1 / 3, seed: int = 0) -> dict:
    """Random tokens with shifted labels, ``ignored_share`` of all positions ignored (-100).

    The ignored positions are the first ones of the first row, so the CP shards end up with very
    different numbers of valid labels: a per-shard mean would be wrong.
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 256, (batch_size, seq_len), generator=generator)
    labels = next_token_labels(input_ids)
    ignored = int(ignored_share * batch_size * seq_len)
    labels.view(-1)[:ignored] = -100
    return {"input_ids": input_ids, "labels": labels}


def _attention_calling_sdpa_by_name(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Hugging Face attention that calls an SDPA imported by name: it never sees CP's patched function."""
    from transformers.integrations.sdpa_attention import repeat_kv

    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    out = sdpa_imported_by_name(query, key, value, is_causal=True, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def llama_with_sdpa_imported_by_name() -> PreTrainedModel:
    """Tiny Llama whose "sdpa" attention bypasses the module attribute CP patches (in this process)."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa", _attention_calling_sdpa_by_name)
    return tiny_causal_lm("llama")


def mistral_with_short_window() -> PreTrainedModel:
    """Tiny Mistral with a 64-token sliding window."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(MistralConfig(**{**TINY_CONFIG, "sliding_window": 64}))


class RunningMeanMixer(torch.nn.Module):
    """Mixes positions by hand, with no sign a structural check could see: adds the running mean of the sequence."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(1, hidden_states.size(1) + 1, device=hidden_states.device, dtype=hidden_states.dtype)
        return hidden_states + hidden_states.cumsum(1) / steps[None, :, None]


def llama_with_hand_written_mixer() -> torch.nn.Module:
    """The tiny Llama with a :class:`RunningMeanMixer` after layer 0's MLP: CP cannot see it mixing positions."""
    model = tiny_causal_lm("llama")
    layer = model.model.layers[0]
    layer.mlp = torch.nn.Sequential(layer.mlp, RunningMeanMixer())
    return model


@contextmanager
def uncompiled_flex() -> Iterator[None]:
    """flex_attention and its block masks without ``torch.compile`` (transformers' and ``lightning_cp``'s): the same
    mask and score functions on the unfused path, the same masks evaluated densely.

    On CPU, compiling takes seconds for every model and length: about 30 s for the first kernel and 7 s for each
    further one, 8 s for each block mask, on every rank (and Inductor's CPU kernel fails to compile once a second
    length makes it dynamic: torch 2.13, "'cur_qSplitSize1' was not declared", with or without CP). The compiled
    kernel and masks are checked on CUDA (``tests/test_ulysses_kernels.py``).
    """
    from torch.nn.attention import flex_attention as torch_flex
    from transformers import masking_utils
    from transformers.integrations import flex_attention as hf_flex

    compiled_attention = hf_flex.compile_friendly_flex_attention
    create_block_mask = torch_flex.create_block_mask

    def uncompiled_block_mask(*args, **kwargs):
        return create_block_mask(*args, **{**kwargs, "_compile": False})

    hf_flex.compile_friendly_flex_attention = lambda query, key, value, training=False, **kwargs: (
        torch_flex.flex_attention(query, key, value, **kwargs)
    )
    torch_flex.create_block_mask = masking_utils.create_block_mask = uncompiled_block_mask
    try:
        yield
    finally:
        hf_flex.compile_friendly_flex_attention = compiled_attention
        torch_flex.create_block_mask = masking_utils.create_block_mask = create_block_mask
