"""Tiny Hugging Face causal LMs of several attention families, built from configs (nothing downloaded).

The zoo covers the attention variants context parallelism must preserve: grouped-query attention (llama, qwen2),
sliding windows (mistral, gemma2, gemma3, gpt_oss), logit softcapping (gemma2), attention sinks and MoE (gpt_oss),
multi-query attention (gpt_bigcode, falcon) and ALiBi (bloom, mpt). Every model is fp32, has deterministic weights
for a given seed, no dropout, and runs a forward+backward with ``labels`` on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers
from mixer_zoo import MIXER_NAMES, build_mixer_model
from models import TINY_CONFIG
from transformers import PreTrainedModel

#: The sliding window of the windowed models: shorter than the 64-130 token sequences of the tests.
WINDOW = 16

#: Shared sizes of the Llama-style configs (4 query heads over 2 key/value heads, head_dim 16).
_LLAMA_LIKE = {**TINY_CONFIG, "attention_dropout": 0.0}


def _llama() -> tuple[str, str, dict]:
    """Llama with grouped-query attention (4 query heads, 2 key/value heads), sdpa."""
    return "LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE, attn_implementation="sdpa")


def _qwen2() -> tuple[str, str, dict]:
    """Qwen2 (biased q/k/v projections, grouped-query attention), sdpa."""
    return "Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE, attn_implementation="sdpa")


def _mistral() -> tuple[str, str, dict]:
    """Mistral with a sliding window of ``WINDOW`` tokens on every layer, sdpa."""
    return "MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=WINDOW, attn_implementation="sdpa")


def _gemma2() -> tuple[str, str, dict]:
    """Gemma2: eager attention with attention-logit and final-logit softcapping; layer 0 sliding, layer 1 full."""
    return (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            _LLAMA_LIKE,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=16,
            attn_implementation="eager",
        ),
    )


def _gemma3() -> tuple[str, str, dict]:
    """Gemma3 text-only causal LM, 4 layers mixing sliding (window ``WINDOW``) and full attention, sdpa."""
    return (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            _LLAMA_LIKE,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
            attn_implementation="sdpa",
        ),
    )


def _gpt_oss() -> tuple[str, str, dict]:
    """GPT-OSS: attention sinks, sliding/full layers, 4 experts (top-2). HF refuses sdpa for it: eager."""
    return (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            _LLAMA_LIKE,
            num_hidden_layers=4,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            attn_implementation="eager",
        ),
    )


def _gpt_bigcode() -> tuple[str, str, dict]:
    """GPTBigCode with multi-query attention (one key/value head shared by 4 query heads), sdpa."""
    return (
        "GPTBigCodeConfig",
        "GPTBigCodeForCausalLM",
        dict(
            vocab_size=256,
            n_embd=64,
            n_inner=128,
            n_layer=2,
            n_head=4,
            n_positions=1024,
            multi_query=True,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="sdpa",
        ),
    )


def _bloom() -> tuple[str, str, dict]:
    """Bloom (ALiBi, hand-written attention matmuls; no attention interface). Its MLP is fixed at 4x hidden."""
    return (
        "BloomConfig",
        "BloomForCausalLM",
        dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0),
    )


def _mpt() -> tuple[str, str, dict]:
    """MPT (ALiBi, hand-written attention matmuls; no attention interface); expansion_ratio 2 gives MLP width 128."""
    return (
        "MptConfig",
        "MptForCausalLM",
        dict(
            vocab_size=256,
            d_model=64,
            n_heads=4,
            n_layers=2,
            expansion_ratio=2,
            max_seq_len=1024,
            resid_pdrop=0.0,
            emb_pdrop=0.0,
            attn_config={"attn_pdrop": 0, "alibi": True},
        ),
    )


def _falcon() -> tuple[str, str, dict]:
    """Falcon-7B style multi-query attention (old decoder architecture, 1 key/value head, rotary), sdpa."""
    return (
        "FalconConfig",
        "FalconForCausalLM",
        dict(
            vocab_size=256,
            hidden_size=64,
            ffn_hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            new_decoder_architecture=False,
            multi_query=True,
            alibi=False,
            parallel_attn=True,
            max_position_embeddings=1024,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            attn_implementation="sdpa",
        ),
    )


#: Builders of (config class name, model class name, config fields): transformers imports a family only
#: when it is built (importing all ten costs every process of every test launch about a second).
_ZOO: dict[str, Callable[[], tuple[str, str, dict]]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "mistral": _mistral,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt_oss": _gpt_oss,
    "gpt_bigcode": _gpt_bigcode,
    "bloom": _bloom,
    "mpt": _mpt,
    "falcon": _falcon,
}

#: Every model name :func:`zoo_model` accepts.
#: Every name :func:`zoo_model` builds: the attention families here and the sequence-mixer families of
#: :mod:`mixer_zoo` (gated delta nets, Mamba, short convolutions, ...).
ZOO_NAMES: tuple[str, ...] = tuple(_ZOO) + MIXER_NAMES


def zoo_model(name: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A tiny fp32 causal LM of family ``name`` (one of :data:`ZOO_NAMES`) with deterministic weights.

    ``overrides`` replace config fields (for example ``attn_implementation="eager"``). The model is built after
    ``torch.manual_seed(seed)``, so every rank building it with the same seed gets the same weights. It is returned
    in train mode (there is no dropout to make that matter).
    """
    if name in MIXER_NAMES:  # the test scripts draw tokens below 256
        return build_mixer_model(name, seed, **{"vocab_size": 256, **overrides})
    if name not in _ZOO:
        raise ValueError(f"unknown zoo model {name!r}; choose one of {', '.join(ZOO_NAMES)}")
    config_name, model_name, kwargs = _ZOO[name]()
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    config = config_cls(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    return model_cls(config).float()
