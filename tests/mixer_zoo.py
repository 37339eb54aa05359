"""Tiny Hugging Face causal LMs whose sequence mixers are not (only) softmax attention, built from configs.

The mixer zoo covers the recurrent token mixers context parallelism has to carry state across shards for: gated
delta nets (qwen3_next, qwen3_5, olmo_hybrid), Kimi delta attention (kimi_linear), Mamba-2 / SSD (mamba2, bamba,
granitemoehybrid, falcon_h1, nemotron_h), Mamba-1 selective scans (jamba), short gated convolutions (lfm2), the
RG-LRU of Griffin (recurrent_gemma) and MiniMax's lightning (decayed linear) attention (minimax). Every hybrid also
has at least one softmax attention layer (sdpa; falcon_h1 runs attention and Mamba-2 side by side in every layer).

Every model is fp32, has deterministic weights for a given seed, no dropout, a vocabulary of ``VOCAB`` tokens and
runs a forward+backward with ``labels`` on a ``[2, 64]`` batch on CPU in well under a second. The mixer head counts
split over 2 and 4 ranks: gated delta net key and value heads, Mamba-2 heads, Kimi delta heads and lightning heads
are 4 or 8, Mamba-2 ``n_groups`` is 1 (bamba, granitemoehybrid, falcon_h1) or 4 (mamba2, nemotron_h), softmax
attention has 4 query over 2 key/value heads (kimi_linear's MLA: 4 over 4), and every depthwise convolution has a
channel count divisible by 4 with the family's default kernel width. Mamba-2 chunks and MiniMax blocks are
``CHUNK`` tokens long, so that the 64-130 token sequences of the tests span several of them.

The default initialisations of most families forget within a few tokens (qwen3_next's ``A`` is drawn from
[0.01, 16] with a softplus(1) time step; bamba's ``dt_bias`` is 1 with ``A`` up to the head count) or drown the state
in the ``D`` skip connection (Hugging Face's normal(0, 0.02) projections make Mamba's B, C and x tiny), so that a test
comparing sharded with unsharded runs would barely see the state carried from one shard to the next.
:func:`build_mixer_model` therefore redraws those mixers' decays (from the seed) and gives Mamba's input projections
and convolutions the Mamba reference initialisation: with the softmax attention switched off, changing token 0 moves
the logits at position 63 by 0.2%-11% for seed 0 (lfm2's 3-token convolutions excepted). Every config sets
``use_cache=False``: with a cache, the train-mode forward takes the mixers' cached (inference) path.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import transformers
from transformers import PreTrainedModel

#: Vocabulary of every mixer model.
VOCAB = 128

#: Mamba-2 chunk size and MiniMax lightning-attention block size: several chunks in a 64-token sequence.
CHUNK = 16

#: Shared sizes of the softmax attention of the hybrids: 4 query heads over 2 key/value heads of 16 channels.
_ATTENTION = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    attention_dropout=0.0,
    attn_implementation="sdpa",
    use_cache=False,
)

#: The ranges the decay parameters of the recurrent mixers are drawn from: ``A`` uniform in ``_A_RANGE``, the
#: per-token time step (after softplus) log-uniform in ``_DT_RANGE``. The per-token decay ``exp(-A * dt)`` then lies
#: between 0.95 and 0.9995, so a head keeps between 4% and 97% of its state over 63 tokens.
_A_RANGE = (0.05, 0.5)
_DT_RANGE = (0.01, 0.1)

#: Mamba-2 fields shared by bamba, granitemoehybrid and falcon_h1: 8 heads of 16 channels, one group of 16 states,
#: so the depthwise convolution has 128 + 2 * 16 = 160 channels.
_MAMBA2_HYBRID = dict(
    mamba_n_heads=8,
    mamba_d_head=16,
    mamba_n_groups=1,
    mamba_d_state=16,
    mamba_expand=2,
    mamba_chunk_size=CHUNK,
)


def _qwen3_next() -> tuple[str, str, dict]:
    """Qwen3-Next: a gated delta net layer (4 key heads, 8 value heads, conv_dim 256), then gated full attention.

    Dense MLPs (``mlp_only_layers``) instead of the sparse MoE blocks.
    """
    return (
        "Qwen3NextConfig",
        "Qwen3NextForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=4,
            linear_num_value_heads=8,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            mlp_only_layers=[0, 1],
            num_experts=0,
        ),
    )


def _qwen3_5() -> tuple[str, str, dict]:
    """Qwen3.5 text model: a gated delta net layer (4 key heads, 4 value heads, conv_dim 192), then full attention."""
    return (
        "Qwen3_5TextConfig",
        "Qwen3_5ForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=4,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
    )


def _olmo_hybrid() -> tuple[str, str, dict]:
    """OLMo Hybrid: a gated delta net layer (4 key and 4 value heads, conv_dim 256, beta up to 2), then attention.

    Its decay parameters come from config fields (``linear_a_log_min/max`` bound ``A``, ``linear_dt_min/max`` the
    time step), narrowed here so that the state outlives the sequence.
    """
    return (
        "OlmoHybridConfig",
        "OlmoHybridForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            layer_types=["linear_attention", "full_attention"],
            linear_num_key_heads=4,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=32,
            linear_a_log_min=_A_RANGE[0],
            linear_a_log_max=_A_RANGE[1],
            linear_dt_min=_DT_RANGE[0],
            linear_dt_max=_DT_RANGE[1],
            pad_token_id=0,
            eos_token_id=1,
        ),
    )


def _nemotron_h() -> tuple[str, str, dict]:
    """Nemotron-H: a Mamba-2 block (8 heads, 4 groups, conv_dim 256), an attention block and an MLP block."""
    return (
        "NemotronHConfig",
        "NemotronHForCausalLM",
        dict(
            _ATTENTION,
            layer_types=["linear_attention", "full_attention", "mlp"],
            num_hidden_layers=3,
            head_dim=16,
            mamba_num_heads=8,
            mamba_head_dim=16,
            n_groups=4,
            ssm_state_size=16,
            chunk_size=CHUNK,
            hidden_dropout=0.0,
        ),
    )


def _bamba() -> tuple[str, str, dict]:
    """Bamba: a Mamba-2 layer (8 heads, one group, conv_dim 160), then an attention layer (partial rotary)."""
    return (
        "BambaConfig",
        "BambaForCausalLM",
        {**_ATTENTION, **_MAMBA2_HYBRID, "num_hidden_layers": 2, "attn_layer_indices": [1]},
    )


def _granitemoehybrid() -> tuple[str, str, dict]:
    """Granite 4 hybrid: a Mamba-2 layer (8 heads, one group, conv_dim 160), then a NoPE attention layer; dense MLPs."""
    return (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        {
            **_ATTENTION,
            **_MAMBA2_HYBRID,
            "num_hidden_layers": 2,
            "layer_types": ["linear_attention", "full_attention"],
            "num_local_experts": 0,
            "shared_intermediate_size": 128,
        },
    )


def _falcon_h1() -> tuple[str, str, dict]:
    """Falcon-H1: two layers, each running attention and a Mamba-2 mixer side by side.

    The mixer has 8 heads in one group (conv_dim 160) and no gated RMS norm (the family default).
    """
    return (
        "FalconH1Config",
        "FalconH1ForCausalLM",
        {**_ATTENTION, **_MAMBA2_HYBRID, "num_hidden_layers": 2, "mamba_d_ssm": 128},
    )


def _mamba2() -> tuple[str, str, dict]:
    """Mamba-2 only: two layers of 8 heads in 4 groups (conv_dim 256); no attention."""
    return (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        dict(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_heads=8,
            head_dim=16,
            expand=2,
            n_groups=4,
            state_size=16,
            chunk_size=CHUNK,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            use_cache=False,
        ),
    )


def _jamba() -> tuple[str, str, dict]:
    """Jamba: a Mamba-1 layer (128 channels, 16 states, dt rank 4), then an attention layer; dense MLPs."""
    return (
        "JambaConfig",
        "JambaForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            attn_layer_period=2,
            attn_layer_offset=1,
            num_experts=1,
            mamba_d_state=16,
            mamba_expand=2,
        ),
    )


def _lfm2() -> tuple[str, str, dict]:
    """LFM2: a gated short convolution layer (64 channels, kernel 3), then an attention layer."""
    return (
        "Lfm2Config",
        "Lfm2ForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            layer_types=["conv", "full_attention"],
            block_auto_adjust_ff_dim=False,
        ),
    )


def _recurrent_gemma() -> tuple[str, str, dict]:
    """RecurrentGemma (Griffin): an RG-LRU block (width 64 in 4 gate blocks, conv 4), then local attention.

    The attention window keeps its default of 2048, longer than the test sequences. The RG-LRU resets its state
    wherever ``position_ids`` is 0.
    """
    return (
        "RecurrentGemmaConfig",
        "RecurrentGemmaForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            block_types=["recurrent", "attention"],
            lru_width=64,
        ),
    )


def _kimi_linear() -> tuple[str, str, dict]:
    """Kimi Linear: a Kimi delta attention layer (4 heads of 16, conv_dim 192), then MLA (4 heads); dense MLPs."""
    return (
        "KimiLinearConfig",
        "KimiLinearForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            num_key_value_heads=4,
            layer_types=["linear_attention", "full_attention"],
            mlp_layer_types=["dense", "dense"],
            linear_num_heads=4,
            linear_head_dim=16,
            kv_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            moe_intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=1,
        ),
    )


def _minimax() -> tuple[str, str, dict]:
    """MiniMax-01: a lightning attention layer (4 heads of 16, blocks of ``CHUNK``), then full attention; 4 experts."""
    return (
        "MiniMaxConfig",
        "MiniMaxForCausalLM",
        dict(
            _ATTENTION,
            num_hidden_layers=2,
            head_dim=16,
            layer_types=["linear_attention", "full_attention"],
            block_size=CHUNK,
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
    )


#: Builders of (config class name, model class name, config fields); transformers imports a family only when built.
MIXER_FAMILIES: dict[str, Callable[[], tuple[str, str, dict]]] = {
    "qwen3_next": _qwen3_next,
    "qwen3_5": _qwen3_5,
    "olmo_hybrid": _olmo_hybrid,
    "nemotron_h": _nemotron_h,
    "bamba": _bamba,
    "granitemoehybrid": _granitemoehybrid,
    "falcon_h1": _falcon_h1,
    "mamba2": _mamba2,
    "jamba": _jamba,
    "lfm2": _lfm2,
    "recurrent_gemma": _recurrent_gemma,
    "kimi_linear": _kimi_linear,
    "minimax": _minimax,
}

#: The kind of (non softmax attention) sequence mixer of each family.
MIXER_KINDS: dict[str, str] = {
    "qwen3_next": "gated_delta_net",
    "qwen3_5": "gated_delta_net",
    "olmo_hybrid": "gated_delta_net",
    "nemotron_h": "mamba2",
    "bamba": "mamba2",
    "granitemoehybrid": "mamba2",
    "falcon_h1": "mamba2",
    "mamba2": "mamba2",
    "jamba": "mamba1",
    "lfm2": "short_conv",
    "recurrent_gemma": "rg_lru",
    "kimi_linear": "kimi_delta",
    "minimax": "lightning",
}

#: Every family name :func:`build_mixer_model` accepts.
MIXER_NAMES: tuple[str, ...] = tuple(MIXER_FAMILIES)


def _log_uniform(low: float, high: float, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Values log-uniformly distributed in [low, high]."""
    u = torch.rand(shape, generator=generator)
    return torch.exp(u * (math.log(high) - math.log(low)) + math.log(low))


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """The y with softplus(y) == x (x > 0)."""
    return x + torch.log(-torch.expm1(-x))


def _uniform_fan_in_(weight: torch.Tensor, generator: torch.Generator) -> None:
    """PyTorch's default ``nn.Linear`` / ``nn.Conv1d`` initialisation: uniform in +-1/sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(weight[0].numel())
    weight.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def _redraw_mixers(model: PreTrainedModel, generator: torch.Generator) -> None:
    """Give the gated delta net, Kimi delta, Mamba-2 and Mamba-1 mixers of ``model`` long-lived, visible state.

    * decays: ``A_log`` and ``dt_bias`` (the per-head, for Kimi per-channel, decay ``exp(-exp(A_log) *
      softplus(a + dt_bias))``) get ``A`` in ``_A_RANGE`` and a time step in ``_DT_RANGE``; Mamba-1 keeps its
      ``A = 1..d_state`` and gets the time step in ``dt_proj.bias``.
    * Mamba mixers: ``in_proj``, ``x_proj`` and ``conv1d`` get PyTorch's default initialisation (the Mamba reference
      code's) instead of Hugging Face's normal(0, 0.02), under which B, C and x are so small that the ``D`` skip
      connection drowns the state (token 0 then moves position 63 by ~1e-7).
    """
    for module in model.modules():
        A_log = getattr(module, "A_log", None)
        if not isinstance(A_log, torch.nn.Parameter):
            continue
        if hasattr(module, "ssm_state_size"):  # a Mamba-1 or Mamba-2 mixer
            for name in ("in_proj", "x_proj", "conv1d"):
                if hasattr(module, name):
                    _uniform_fan_in_(getattr(module, name).weight, generator)
        if hasattr(module, "dt_proj"):  # Mamba-1: per-channel time step bias, A = 1..d_state per channel
            dt = _log_uniform(*_DT_RANGE, module.dt_proj.bias.shape, generator)
            module.dt_proj.bias.copy_(_inverse_softplus(dt))
        else:
            A_log.copy_(torch.empty(A_log.shape).uniform_(*_A_RANGE, generator=generator).log())
            dt = _log_uniform(*_DT_RANGE, module.dt_bias.shape, generator)
            module.dt_bias.copy_(_inverse_softplus(dt))


#: Families whose default initialisation forgets within a few tokens, or drowns the state, and has no config fields
#: to change that (olmo_hybrid's decay ranges are config fields, set in :func:`_olmo_hybrid`).
_REDRAW_MIXERS = frozenset(
    {"qwen3_next", "qwen3_5", "nemotron_h", "bamba", "granitemoehybrid", "falcon_h1", "mamba2", "jamba", "kimi_linear"}
)


def build_mixer_model(name: str, seed: int = 0, **overrides: object) -> PreTrainedModel:
    """A tiny fp32 causal LM of mixer family ``name`` (one of :data:`MIXER_NAMES`) with deterministic weights.

    ``overrides`` replace config fields. The model is built after ``torch.manual_seed(seed)`` (and the decay
    parameters of the families in ``_REDRAW_MIXERS`` redrawn from a generator seeded with ``seed``), so every rank
    building it with the same seed gets the same weights. It is returned in train mode, the mode whose mixer code
    path training takes (there is no dropout).
    """
    if name not in MIXER_FAMILIES:
        raise ValueError(f"unknown mixer model {name!r}; choose one of {', '.join(MIXER_NAMES)}")
    config_name, model_name, kwargs = MIXER_FAMILIES[name]()
    config_cls, model_cls = getattr(transformers, config_name), getattr(transformers, model_name)
    config = config_cls(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float()
    if name in _REDRAW_MIXERS:
        _redraw_mixers(model, torch.Generator().manual_seed(seed))
    return model.train()
