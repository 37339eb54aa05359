"""Which mechanism runs a model (``cp_mode``), and the refusals that keep CP from being silently wrong.

The choice reads only the model, so every rank makes the same one; the refusals here are raised on every
rank before any collective (checked on real gloo ranks where a rank's own shard could make them differ).
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_on_ranks
from model_zoo import zoo_model
from models import lm_batch, sdpa_imported_by_name, tiny_causal_lm
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from lightning_cp import attach_context_parallel_hooks, make_cp_batch_and_ctx
from lightning_cp.cp_mode import AttentionTraits, attention_traits, choose_mechanism, runnable_modes, validate_cp_mode
from lightning_cp.hooks import find_attention_modules
from lightning_cp.validation import ContextParallelInputError


def _traits(name: str, **overrides) -> list:
    model = zoo_model(name, **overrides)
    return [attention_traits(module_name, module) for module_name, module in find_attention_modules(model).items()]


@pytest.mark.parametrize(
    "name,cp_size,mechanism,ulysses_size",
    [
        ("llama", 2, "ulysses", 2),
        ("llama", 4, "ulysses", 4),  # 2 key/value heads spread over 4 ranks
        ("llama", 8, "hybrid", 4),  # 4 query heads: Ulysses groups of 4, the ring across 2 groups
        ("gemma2", 2, "ulysses", 2),
        ("gemma2", 8, "hybrid", 4),  # eager softcapped attention: the masked ring across 2 groups of 4
        ("gpt_bigcode", 4, "ulysses", 4),
        ("falcon", 2, "ulysses", 2),
        ("llama", 3, "ring", 1),  # 4 heads do not split over 3 ranks, nor over a divisor of 3
    ],
)
def test_auto_picks_an_exact_mechanism(name, cp_size, mechanism, ulysses_size):
    chosen = choose_mechanism(_traits(name), cp_size)
    assert (chosen.name, chosen.ulysses_size) == (mechanism, ulysses_size)
    assert chosen.reason.startswith("auto:")


#: Hand-written attention that softcaps its logits outside transformers' attention interface (the traits of such
#: a module, as :func:`attention_traits` reads them): the masked ring cannot recompute it, Ulysses runs it.
SOFTCAP_BY_HAND = AttentionTraits(
    "layers.0.attn", 4, 2, "sdpa", interface=False, window=None, softcap=30.0, sinks=False
)


def test_flex_and_flash_attention_run_in_every_mode():
    # plain causal layers on SDPA's ring, windows on the masked ring; 4 heads at cp=8: the hybrid
    flex = _traits("mistral", attn_implementation="flex_attention")
    # a flash_attention_2 model cannot be built without the flash_attn package: its traits, as they would read
    flash = [dataclasses.replace(trait, implementation="flash_attention_2") for trait in _traits("mistral")]
    for traits in (flex, flash):
        chosen = choose_mechanism(traits, 8)
        assert (chosen.name, chosen.ulysses_size) == ("hybrid", 4)
        assert runnable_modes(traits, 4, seq_len=130) == ["ulysses", "ring", "hybrid(ulysses_size=2)"]


def test_auto_refuses_when_no_mechanism_runs_the_model():
    with pytest.raises(ContextParallelInputError, match=r"softcaps its logits .* only Ulysses could run it, but"):
        choose_mechanism([SOFTCAP_BY_HAND], 8)


def test_explicit_modes_refuse_what_they_cannot_run_and_name_what_can():
    with pytest.raises(ContextParallelInputError, match=r"cp_mode='ring'.*softcaps its logits.*Use cp_mode='ulysses'"):
        choose_mechanism([SOFTCAP_BY_HAND], 2, "ring")
    with pytest.raises(ContextParallelInputError, match=r"cp_mode='hybrid'.*softcaps its logits"):
        choose_mechanism([SOFTCAP_BY_HAND], 4, "hybrid", 2)
    with pytest.raises(ContextParallelInputError, match=r"4 query heads do not split over 3.*\[1, 2, 4\]"):
        choose_mechanism(_traits("llama"), 3, "ulysses")
    with pytest.raises(ContextParallelInputError, match="must divide cp_size=4"):
        choose_mechanism(_traits("llama"), 4, "hybrid", 3)
    # eager softcapping, sinks and windows shorter than the sequence: the masked ring (Note [windowed ring])
    assert runnable_modes(_traits("gemma2"), 4) == ["ulysses", "ring", "hybrid(ulysses_size=2)"]
    assert runnable_modes(_traits("gpt_oss"), 2, seq_len=130) == ["ulysses", "ring"]
    assert runnable_modes(_traits("mistral"), 2, seq_len=130) == ["ulysses", "ring"]  # window 16 < 130 tokens
    assert runnable_modes(_traits("llama"), 4) == ["ulysses", "ring", "hybrid(ulysses_size=2)"]


def test_falcon_with_alibi_in_its_mask_is_refused_by_every_mode():
    traits = _traits("falcon", alibi=True)
    assert runnable_modes(traits, 2) == []
    with pytest.raises(ContextParallelInputError, match="ALiBi"):
        choose_mechanism(traits, 2)


@pytest.mark.parametrize("cp_mode,ulysses_size", [("rings", None), ("ulysses", 2), ("hybrid", None), ("hybrid", 0)])
def test_bad_options_are_refused_before_any_process_starts(cp_mode, ulysses_size):
    with pytest.raises(ValueError, match="cp_mode|ulysses_size"):
        validate_cp_mode(cp_mode, ulysses_size)


class HandWrittenAttention(nn.Module):
    """Attention computed by hand (no SDPA, no attention interface, no ``is_causal``): CP cannot reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 64)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = (hidden @ hidden.transpose(-1, -2)).softmax(-1)
        return self.proj(scores @ hidden)


def _llama_with_hand_written_attention() -> nn.Module:
    model = zoo_model("llama")
    model.model.layers[0].mlp = HandWrittenAttention()
    return model


@pytest.mark.parametrize("name", ["bloom", "mpt"])
def test_hand_written_alibi_attention_is_hooked(name):
    # Bloom's and MPT's ALiBi attention runs through CP (Note [hand-written ALiBi]; parity in tests/test_ulysses.py)
    assert len(attach_context_parallel_hooks(zoo_model(name))) == 2
    assert choose_mechanism(_traits(name), 2).name == "ulysses"
    assert runnable_modes(_traits(name), 4) == ["ulysses", "ring", "hybrid(ulysses_size=2)"]


def test_unreachable_attention_names_the_hugging_face_model_not_the_lightning_module():
    """Issue 26: the refusal named the LightningModule class (``M``) that holds the Hugging Face model."""
    import lightning as L

    class M(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _llama_with_hand_written_attention()

    with pytest.raises(ContextParallelInputError) as refusal:
        attach_context_parallel_hooks(M())
    assert str(refusal.value).startswith(
        "LlamaForCausalLM (`model`) has attention modules that context parallelism cannot reach:"
        " `model.model.layers.0.mlp` (HandWrittenAttention)"
    )


def _functional_error(rank: int, world_size: int, case: str) -> str:
    """The error each rank raises in a functional CP step that cannot be exact (``""``: none)."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    if case == "unreachable_session":
        from lightning_cp.mesh import ParallelLayout, build_device_mesh
        from lightning_cp.session import ContextParallelSession

        layout_mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
        model: nn.Module = _llama_with_hand_written_attention()
        try:
            ContextParallelSession(layout_mesh, data_context).prepare_model(model)
        except ContextParallelInputError as error:
            return str(error)
        return ""
    if case == "no_hooks":
        model = tiny_causal_lm("llama")  # hooks never attached: the model builds its mask from its shard
    else:
        torch.manual_seed(0)  # the same model on every rank (the functional API refuses replicas that differ)
        model = _ModelBypassingCP()
        attach_context_parallel_hooks(model)
    train_ctx, local = make_cp_batch_and_ctx(
        mesh, lm_batch(seq_len=64), cp_mode="ring" if case == "no_hooks" else "auto"
    )
    try:
        with train_ctx():
            # no KV cache: Hugging Face then builds a mask where a shard's positions jump (rank 0's head/tail)
            extra = {"use_cache": False} if case == "no_hooks" else {}
            model(input_ids=local["input_ids"], position_ids=local["position_ids"], **extra)
    except ContextParallelInputError as error:
        return str(error)
    return ""


class _AttentionBySdpaImportedByName(nn.Module):
    """Self-attention that calls an SDPA imported by name: CP's patched function never sees it."""

    is_causal = True
    num_heads = 4
    num_key_value_heads = 4

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = hidden.shape
        q, k, v = self.qkv(hidden).view(batch, seq, 3, 4, 4).permute(2, 0, 3, 1, 4)
        return sdpa_imported_by_name(q, k, v, is_causal=True).transpose(1, 2).reshape(batch, seq, 16)


class _ModelBypassingCP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 16)
        self.self_attn = _AttentionBySdpaImportedByName()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        return F.gelu(self.self_attn(self.embed(input_ids)))


def _functional_errors(rank: int, world_size: int) -> dict[str, str]:
    cases = ("no_hooks", "bypass", "unreachable_session")
    return {case: _functional_error(rank, world_size, case) for case in cases}


@pytest.fixture(scope="module")
def refusals() -> list[dict[str, str]]:
    """Every case in one pair of processes; a rank left waiting would time the run out."""
    return run_on_ranks(_functional_errors, timeout=120)


@pytest.mark.parametrize(
    "case,expected",
    [
        # rank 0's shard has a position jump, so only its model builds a mask; rank 1 must stop too
        ("no_hooks", r"refused on context-parallel rank\(s\) \[0\]; all ranks stop"),
        ("bypass", r"`self_attn` \(_AttentionBySdpaImportedByName\) finished its forward .*'ulysses'"),
        ("unreachable_session", r"cannot reach: `model.layers.0.mlp` \(HandWrittenAttention\)"),
    ],
)
def test_refusals_reach_every_rank(refusals, case, expected):
    errors = [by_case[case] for by_case in refusals]
    assert len(errors) == 2
    for error in errors:
        assert error, "a rank went on where another refused"
        assert re.search(expected, error), error
    if case == "no_hooks":
        assert "explicit `attn_mask`" in errors[0]
