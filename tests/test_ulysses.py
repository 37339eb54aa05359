"""Ulysses and the hybrid: loss and gradients under CP equal one plain process, for every attention variant."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from distributed_harness import run_on_ranks
from model_zoo import zoo_model
from models import lm_batch, tiny_causal_lm
from test_packed_training import _unpacked, packed_batch

from lightning_cp.attention import ulysses
from lightning_cp.mesh import ParallelLayout, build_device_mesh
from lightning_cp.session import ContextParallelSession
from lightning_cp.validation import ContextParallelInputError


def _averaged_grads(model, group) -> dict[str, torch.Tensor]:
    """Gradients averaged over the data × context ranks, as the strategies reduce them."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.clone() if param.grad is not None else torch.zeros_like(param)
        torch.distributed.all_reduce(grad, group=group)
        grads[name] = grad / torch.distributed.get_world_size(group)
    return grads


def _reference_loss(model, batch: dict, packed: bool) -> torch.Tensor:
    """The loss of one plain process: documents one by one for a packed batch; backward done."""
    if packed:
        return _unpacked(model, batch)[0]
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def _bypass(what: str | None) -> None:
    """Switch one part of the mechanism off in this rank's process (negative controls)."""
    if what == "order":  # take the gathered shards as if they were in sequence order
        monkeypatch_attr("lightning_cp.session", "gathered_order", lambda held: None)
    elif what == "window":  # rebuild the whole sequence's mask without the sliding window
        original = ulysses.span_mask
        monkeypatch_attr(
            "lightning_cp.attention.ulysses",
            "span_mask",
            lambda length, **kw: original(length, **{**kw, "window": None}),
        )


def monkeypatch_attr(module_name: str, name: str, value) -> None:
    import importlib

    setattr(importlib.import_module(module_name), name, value)


def _session_parity(
    rank: int, world_size: int, build, seq_len: int, cp_mode: str, ulysses_size, packed: bool, bypass=None
) -> dict:
    _bypass(bypass)
    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
    model = build()
    batch = packed_batch() if packed else lm_batch(seq_len=seq_len)
    reference = copy.deepcopy(model)
    ref_loss = _reference_loss(reference, batch, packed)
    session = ContextParallelSession(mesh, data_context, cp_mode=cp_mode, ulysses_size=ulysses_size)
    session.prepare_model(model)
    local = dict(batch)
    with session.step(local):
        loss = model(**local).loss
        loss.backward()
    grads = _averaged_grads(model, data_context.get_group())
    return {
        "mechanism": session.mechanism.name,
        "loss": loss.detach(),
        "ref_loss": ref_loss.detach(),
        "grads": grads,
        "ref_grads": {name: p.grad for name, p in reference.named_parameters()},
    }


def zoo(name: str):
    """A picklable builder of the zoo model ``name`` (the ranks are spawned processes)."""
    return functools.partial(zoo_model, name)


def assert_parity(results: list[dict], mechanism: str) -> None:
    for result in results:
        assert result["mechanism"] == mechanism
        torch.testing.assert_close(result["loss"], result["ref_loss"], rtol=1e-5, atol=0)
        for name, ref in result["ref_grads"].items():
            ref = torch.zeros_like(result["grads"][name]) if ref is None else ref
            torch.testing.assert_close(result["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("cp_mode", ["ulysses", "ring", "auto"])
def test_llama_session_parity(cp_mode, packed):
    results = run_on_ranks(_session_parity, tiny_causal_lm, 130, cp_mode, None, packed)
    assert_parity(results, "ring" if cp_mode == "ring" else "ulysses")


@pytest.mark.parametrize("packed", [False, True], ids=["plain", "packed"])
@pytest.mark.parametrize("cp_mode,ulysses_size,mechanism", [("hybrid", 2, "hybrid"), ("ring", None, "ring")])
def test_llama_four_ranks_parity(cp_mode, ulysses_size, mechanism, packed):
    results = run_on_ranks(_session_parity, tiny_causal_lm, 130, cp_mode, ulysses_size, packed, world_size=4)
    assert_parity(results, mechanism)


@pytest.mark.parametrize(
    "build,cp_mode,ulysses_size,world_size,bypass",
    [
        (tiny_causal_lm, "ulysses", None, 2, "order"),
        (tiny_causal_lm, "hybrid", 2, 4, "order"),
        (zoo("mistral"), "ulysses", None, 2, "window"),
    ],
    ids=["ulysses-order", "hybrid-order", "ulysses-window"],
)
def test_negative_controls_fail_when_a_part_is_bypassed(build, cp_mode, ulysses_size, world_size, bypass):
    results = run_on_ranks(_session_parity, build, 130, cp_mode, ulysses_size, False, bypass, world_size=world_size)
    with pytest.raises(AssertionError):
        assert_parity(results, results[0]["mechanism"])


#: Every attention variant at cp=2, through the session (the strategies' path): the mechanism "auto" picks.
ZOO_CASES = [
    ("llama", "ulysses"),
    ("qwen2", "ulysses"),
    ("mistral", "ulysses"),  # sliding window 16 < 130 tokens
    ("gemma2", "ulysses"),  # eager attention, logit softcapping, window on alternate layers
    ("gemma3", "ulysses"),  # mixed sliding / full layers
    ("gpt_oss", "ulysses"),  # attention sinks, window, MoE (eager)
    ("gpt_bigcode", "ulysses"),  # multi-query attention (1 key/value head) through the interface
    ("falcon", "ulysses"),  # multi-query attention by SDPA broadcasting, called directly
]


@pytest.mark.parametrize("name,mechanism", ZOO_CASES)
def test_zoo_models_are_exact_with_auto(name, mechanism):
    results = run_on_ranks(_session_parity, zoo(name), 130, "auto", None, False)
    assert_parity(results, mechanism)


#: Four processes: the hybrid (Ulysses 2 x ring 2) and the ring over 4 for multi-query models (one key/value
#: head: spread over the Ulysses ranks; repeated for the ring, where Falcon relies on SDPA broadcasting).
FOUR_RANK_ZOO_CASES = [
    ("gpt_bigcode", "hybrid", 2),
    ("falcon", "hybrid", 2),
    ("falcon", "ring", None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,cp_mode,ulysses_size", FOUR_RANK_ZOO_CASES)
def test_multi_query_models_on_four_ranks(name, cp_mode, ulysses_size):
    results = run_on_ranks(_session_parity, zoo(name), 130, cp_mode, ulysses_size, False, world_size=4)
    assert_parity(results, cp_mode)


def _hybrid_error(rank: int, world_size: int, name: str) -> str:
    try:
        _session_parity(rank, world_size, zoo(name), 130, "hybrid", 2, False)
    except ContextParallelInputError as error:
        return str(error)
    return ""


@pytest.mark.slow
def test_hybrid_refuses_a_window_its_ring_cannot_honour_on_every_rank():
    for error in run_on_ranks(_hybrid_error, "mistral", world_size=4, timeout=120):
        assert "sliding window of 16 tokens, shorter than the sequence" in error
        assert "Use `cp_mode='ulysses'`" in error
