"""Ulysses and the hybrid: loss and gradients under CP equal one plain process, for every attention variant."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import averaged_gradients, new_process_groups_destroyed, run_on_ranks, summed_gradients
from model_zoo import zoo_model
from models import lm_batch, uncompiled_flex
from test_packed_training import _unpacked, packed_batch

from lightning_cp import session as session_module
from lightning_cp.attention import alibi, interface, ledger, masked_ring, ulysses
from lightning_cp.attention.switch import ulysses_attention
from lightning_cp.attention.ulysses import UlyssesExchange, UlyssesGroup
from lightning_cp.mesh import ParallelLayout, build_device_mesh
from lightning_cp.session import ContextParallelSession
from lightning_cp.sharding.sequence import gather_sequence, shard_sequence
from lightning_cp.sharding.ulysses import gathered_order, held_positions, padding_spans
from lightning_cp.validation import ContextParallelInputError


def _reference_loss(model, batch: dict, packed: bool) -> torch.Tensor:
    """The loss of one plain process: documents one by one for a packed batch; backward done."""
    if packed:
        return _unpacked(model, batch)[0]
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


#: Negative controls of the masked ring (Note [windowed ring]): the variant it runs, with one part dropped.
_RING_BYPASSES = {"ring-window": {"window": None}, "softcap": {"softcap": None}, "sinks": {"sinks": None}}


@contextmanager
def _bypassed(what: str | None) -> Iterator[None]:
    """Switch one part of the mechanism off in this process while open (negative controls)."""
    if what is None:
        yield
        return
    if what == "order":  # take the gathered shards as if they were in sequence order
        module, name, replacement = session_module, "gathered_order", lambda held: None
    elif what == "alibi-heads":  # every Ulysses rank takes the first heads' slopes
        module, name = alibi, "local_slopes"
        replacement = lambda slopes, rank, size: slopes.narrow(0, 0, slopes.numel() // size)  # noqa: E731
    elif what == "alibi":  # no position bias at all
        with _patched(alibi, "_bloom_slopes", lambda m: torch.zeros(m.num_heads)):
            with _patched(alibi, "_mpt_slopes", lambda m: torch.zeros(m.n_heads)):
                yield
        return
    elif what == "sdpa-ring":  # plain attention of a non-SDPA function on the local shard (no ring)
        module, name = interface, "_sdpa_ring"

        def replacement(scale, query, key, value):
            ledger.record_mechanism_call()  # as the ring would: else the hooks' safety net refuses the forward
            gqa = query.size(1) != key.size(1)
            local = torch._C._nn.scaled_dot_product_attention
            return local(query, key, value, is_causal=True, scale=scale, enable_gqa=gqa).transpose(1, 2)
    elif what == "documents":  # the masked ring attending across the documents of a packed row
        original_plan = masked_ring.plan_document_fetch

        def replacement(*args, **kwargs):
            plan = original_plan(*args, **kwargs)
            return dataclasses.replace(
                plan, documents=torch.zeros_like(plan.documents), key_documents=torch.zeros_like(plan.key_documents)
            )

        module, name = masked_ring, "plan_document_fetch"
    elif what in _RING_BYPASSES:  # the masked ring without the window, the softcap or the sinks
        original_variant = interface.ring_variant

        def replacement(*args, **kwargs):
            variant = original_variant(*args, **kwargs)
            return variant if variant is None else dataclasses.replace(variant, **_RING_BYPASSES[what])

        module, name = interface, "ring_variant"
    else:  # "window": rebuild the whole sequence's mask without the sliding window
        original = ulysses.span_mask
        module, name = ulysses, "span_mask"
        replacement = lambda length, **kw: original(length, **{**kw, "window": None})  # noqa: E731
    with _patched(module, name, replacement):
        yield


@contextmanager
def _patched(module, name: str, replacement) -> Iterator[None]:
    """``module.name`` replaced while open, put back after (the ranks' processes serve later cases)."""
    saved = getattr(module, name)
    setattr(module, name, replacement)
    try:
        yield
    finally:
        setattr(module, name, saved)


@dataclass(frozen=True)
class Case:
    """One session-level run (the strategies' path) against one plain process."""

    model: str
    cp_mode: str = "auto"
    ulysses_size: int | None = None
    packed: bool = False
    #: A part of the mechanism to switch off: the run must then differ from the reference.
    bypass: str | None = None
    #: The model's attention implementation, when not its zoo default (the reference then attends eagerly: torch
    #: has no CPU backward for flex_attention).
    attn: str | None = None
    #: The mechanism expected to run (a run refused with a ``ContextParallelInputError`` records ``"refused"``).
    expected: str = "ulysses"

    @property
    def id(self) -> str:
        parts = [self.model, *([self.attn] if self.attn else []), self.cp_mode]
        parts += [str(self.ulysses_size)] if self.ulysses_size else []
        parts += ["packed"] if self.packed else []
        parts += [f"without-{self.bypass}"] if self.bypass else []
        return "-".join(parts)


def _session_parity(rank: int, world_size: int, case: Case) -> dict:
    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
    overrides = {**ZOO_OVERRIDES.get(case.model, {}), **({"attn_implementation": case.attn} if case.attn else {})}
    model = zoo_model(case.model, **overrides)
    batch = packed_batch() if case.packed else lm_batch(seq_len=130)
    reference = copy.deepcopy(model)
    if case.attn:
        reference.set_attn_implementation("eager")
    ref_loss = _reference_loss(reference, batch, case.packed)
    session = ContextParallelSession(mesh, data_context, cp_mode=case.cp_mode, ulysses_size=case.ulysses_size)
    session.prepare_model(model)
    local = dict(batch)
    with _bypassed(case.bypass), session.step(local):
        loss = model(**local).loss
        loss.backward()
    grads = averaged_gradients(model, data_context.get_group())
    return {
        "mechanism": session.mechanism.name,
        "loss": loss.detach(),
        "ref_loss": ref_loss.detach(),
        "grads": grads,
        "ref_grads": {name: p.grad for name, p in reference.named_parameters()},
    }


def _run_cases(rank: int, world_size: int, cases: list[Case]) -> dict[str, dict]:
    """Every case in one set of processes (spawning ranks costs more than a tiny model's step)."""
    results = {}
    for case in cases:
        try:
            with new_process_groups_destroyed(), uncompiled_flex():
                results[case.id] = _session_parity(rank, world_size, case)
        except ContextParallelInputError as error:
            results[case.id] = {"mechanism": "refused", "error": str(error)}
    return results


def assert_parity(results: list[dict], mechanism: str) -> None:
    for result in results:
        assert result["mechanism"] == mechanism
        torch.testing.assert_close(result["loss"], result["ref_loss"], rtol=1e-5, atol=0)
        for name, ref in result["ref_grads"].items():
            ref = torch.zeros_like(result["grads"][name]) if ref is None else ref
            torch.testing.assert_close(result["grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)


def _largest_difference(results: list[dict]) -> float:
    """The largest relative difference from the reference, over the loss and every gradient (negative controls)."""
    differences = []
    for result in results:
        pairs = [(result["loss"], result["ref_loss"])]
        pairs += [(result["grads"][name], ref) for name, ref in result["ref_grads"].items() if ref is not None]
        differences += [float((cp - ref).abs().max() / ref.abs().max().clamp(min=1e-12)) for cp, ref in pairs]
    return max(differences)


def _check(results_by_rank: list[dict[str, dict]], case: Case) -> None:
    results = [by_case[case.id] for by_case in results_by_rank]
    if case.bypass is not None:
        assert all(result["mechanism"] == case.expected for result in results)
        assert _largest_difference(results) > 1e-2, "the run without a part of the mechanism was still exact"
    else:
        assert_parity(results, case.expected)


#: Larger initial weights where the default ones hide a feature: Gemma 2's softcapping (50) changes the
#: loss by 2e-7 at std 0.02 (inside the tolerance), by about 2 % at 0.2.
ZOO_OVERRIDES = {"gemma2": {"initializer_range": 0.2}}

#: The models whose attention the SDPA ring cannot run: windows (Mistral, Gemma 3 mixing windowed and full
#: layers), eager attention with softcapping (Gemma 2), eager attention with sinks and windows (gpt-oss).
VARIANT_MODELS = ("mistral", "gemma3", "gemma2", "gpt_oss")

#: Multi-query attention (one key/value head): through the interface (GPTBigCode), by SDPA broadcasting (Falcon).
MQA_MODELS = ("gpt_bigcode", "falcon")

#: Hand-written ALiBi attention.
ALIBI_MODELS = ("bloom", "mpt")

#: Two ranks. Llama in each mode, plain and packed; every attention variant with "auto" (Ulysses): Mistral's
#: window 16 < 130 tokens, Gemma 2's eager softcapped attention, Gemma 3's mixed sliding/full layers,
#: gpt-oss's sinks and MoE, multi-query attention through the interface (GPTBigCode) and by SDPA
#: broadcasting (Falcon); negative controls.
TWO_RANK_CASES = [
    *(
        Case("llama", mode, packed=packed, expected="ring" if mode == "ring" else "ulysses")
        for mode in ("ulysses", "ring", "auto")
        for packed in (False, True)
    ),
    *(Case(name) for name in ("qwen2", "mistral", "gemma2", "gemma3", "gpt_oss", "gpt_bigcode", "falcon")),
    *(Case(name, packed=True) for name in (*VARIANT_MODELS, *MQA_MODELS)),
    Case("llama", "ulysses", bypass="order"),
    Case("mistral", "ulysses", bypass="window"),
    # the ring runs every variant on unpacked rows and packed documents (the masked ring, Note [windowed ring]);
    # each part of it is needed (negative controls)
    *(Case(name, "ring", packed=packed, expected="ring") for name in VARIANT_MODELS for packed in (False, True)),
    Case("mistral", "ring", bypass="ring-window", expected="ring"),
    Case("gemma3", "ring", bypass="ring-window", expected="ring"),
    Case("gemma2", "ring", bypass="softcap", expected="ring"),
    Case("gpt_oss", "ring", bypass="sinks", expected="ring"),
    Case("mistral", "ring", packed=True, bypass="documents", expected="ring"),
    *(Case(name, "ring", packed=packed, expected="ring") for name in MQA_MODELS for packed in (False, True)),
    # flex_attention on the ring: plain causal layers on SDPA's ring (the document ring on packed rows), windows
    # on the masked ring; without the ring the plain layers attend inside the shard
    *(
        Case(name, "ring", packed=packed, attn="flex_attention", expected="ring")
        for name in ("llama", "mistral")
        for packed in (False, True)
    ),
    Case("llama", "ring", attn="flex_attention", bypass="sdpa-ring", expected="ring"),
    # hand-written ALiBi (Bloom, MPT): the module's core under CP (Note [hand-written ALiBi]); negative controls:
    # no bias at all (ring), every rank with the first heads' slopes (Ulysses)
    *(Case(name, mode, expected=mode) for name in ALIBI_MODELS for mode in ("ring", "ulysses")),
    Case("bloom", "auto"),
    Case("bloom", "ring", bypass="alibi", expected="ring"),
    Case("mpt", "ulysses", bypass="alibi-heads"),
]

#: Four ranks: the hybrid (Ulysses 2 x ring 2) and the ring over 4, plain and packed; multi-query models
#: (one key/value head: spread over the Ulysses ranks; repeated for the ring, where Falcon relies on SDPA
#: broadcasting); a negative control; every variant model on the ring over 4 and the hybrid (the masked ring
#: across the Ulysses groups), plain and packed, with negative controls.
FOUR_RANK_CASES = [
    *(
        Case("llama", mode, size, packed=packed, expected=mode)
        for mode, size in (("hybrid", 2), ("ring", None))
        for packed in (False, True)
    ),
    *(
        Case(name, mode, size, packed=packed, expected=mode)
        for name in MQA_MODELS
        for mode, size in (("hybrid", 2), ("ring", None))
        for packed in (False, True)
    ),
    Case("llama", "hybrid", 2, bypass="order", expected="hybrid"),
    *(
        Case(name, mode, size, packed=packed, expected=mode)
        for name in VARIANT_MODELS
        for mode, size in (("hybrid", 2), ("ring", None))
        for packed in (False, True)
    ),
    Case("gpt_oss", "hybrid", 2, packed=True, bypass="documents", expected="hybrid"),
    *(
        Case(name, "hybrid", 2, packed=packed, attn="flex_attention", expected="hybrid")
        for name in ("llama", "gpt_oss")
        for packed in (False, True)
    ),
    Case("gpt_oss", "hybrid", 2, bypass="sinks", expected="hybrid"),
    *(Case(name, "hybrid", 2, expected="hybrid") for name in ALIBI_MODELS),
    Case("bloom", "ring", expected="ring"),
    Case("bloom", "hybrid", 2, bypass="alibi-heads", expected="hybrid"),
    Case("mistral", "hybrid", 2, bypass="ring-window", expected="hybrid"),
]


@pytest.fixture(scope="module")
def two_rank_results() -> list[dict[str, dict]]:
    return run_on_ranks(_run_cases, TWO_RANK_CASES, timeout=900)


@pytest.fixture(scope="module")
def four_rank_results() -> list[dict[str, dict]]:
    return run_on_ranks(_run_cases, FOUR_RANK_CASES, world_size=4, timeout=900)


@pytest.mark.parametrize("case", TWO_RANK_CASES, ids=lambda case: case.id)
def test_two_ranks(two_rank_results, case):
    _check(two_rank_results, case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FOUR_RANK_CASES, ids=lambda case: case.id)
def test_four_ranks(four_rank_results, case):
    _check(four_rank_results, case)


def _raw_ulysses(
    rank: int, world_size: int, is_causal: bool, load_balance: bool, separate_padding: bool = True
) -> dict:
    """Ulysses on raw SDPA calls over padded, sharded q/k/v; gathered outputs and input gradients."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    generator = torch.Generator().manual_seed(5)
    seq_len, padded_len = 30, 32
    q, grad = (torch.randn(2, 4, seq_len, 8, generator=generator) for _ in range(2))
    k, v = (torch.randn(2, 2, seq_len, 8, generator=generator) for _ in range(2))
    pad = lambda t: F.pad(t, (0, 0, 0, padded_len - seq_len))  # noqa: E731
    local = [shard_sequence(pad(t), 2, world_size, rank, load_balance).requires_grad_() for t in (q, k, v)]
    held = held_positions(padded_len, world_size, load_balance, range(world_size))
    group = UlyssesGroup(torch.distributed.group.WORLD, world_size, rank)
    spans = padding_spans(seq_len, padded_len) if separate_padding else None
    exchange = UlyssesExchange(group, gathered_order(held), spans)
    with ulysses_attention(exchange):
        out = F.scaled_dot_product_attention(*local, is_causal=is_causal, enable_gqa=True)
    out.backward(shard_sequence(pad(grad), 2, world_size, rank, load_balance))
    gather = lambda t: gather_sequence(t.detach(), mesh, 2, load_balance)[:, :, :seq_len]  # noqa: E731
    reference = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = F.scaled_dot_product_attention(*reference, is_causal=is_causal, enable_gqa=True)
    ref_out.backward(grad)
    return {
        "cp": [gather(out), *(gather(t.grad) for t in local)],
        "reference": [ref_out.detach(), *(t.grad for t in reference)],
    }


#: (is_causal, load_balance, padding kept apart); the last one is the negative control.
RAW_CASES = [(True, True, True), (False, True, True), (False, False, True), (False, False, False)]


def _raw_cases(rank: int, world_size: int) -> list[dict]:
    return [_raw_ulysses(rank, world_size, *case) for case in RAW_CASES]


@pytest.fixture(scope="module")
def raw_results() -> list[list[dict]]:
    return run_on_ranks(_raw_cases)


@pytest.mark.parametrize(
    "index", range(len(RAW_CASES) - 1), ids=["causal-head-tail", "bidirectional-head-tail", "bidirectional-contiguous"]
)
def test_ulysses_attention_equals_plain_attention(raw_results, index):
    # bidirectional attention with padding: the padding is a document of its own, never attended by real tokens
    for by_case in raw_results:
        for cp, reference in zip(by_case[index]["cp"], by_case[index]["reference"], strict=True):
            torch.testing.assert_close(cp, reference, rtol=1e-5, atol=1e-6)


def test_negative_control_bidirectional_attention_sees_padding_without_its_span(raw_results):
    result = raw_results[0][-1]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(result["cp"][0], result["reference"][0], rtol=1e-5, atol=1e-6)


def _functional_zoo_parities(rank: int, world_size: int, runs: tuple[tuple[str, str], ...]) -> dict[str, dict]:
    """Each ``(zoo model, cp_mode)`` through ``make_cp_batch_and_ctx`` (hooks attached) vs one process."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_cp import attach_context_parallel_hooks, make_cp_batch_and_ctx, token_correct_loss
    from lightning_cp.loss import token_loss_sum

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    results = {}
    for name, cp_mode in runs:
        model = zoo_model(name, **ZOO_OVERRIDES.get(name, {}))
        batch = lm_batch(seq_len=130)  # labels already shifted: the functional API shards them as given
        reference = copy.deepcopy(model)
        ref_loss = (
            token_loss_sum(reference(input_ids=batch["input_ids"]).logits, batch["labels"])
            / (batch["labels"] != -100).sum()
        )
        ref_loss.backward()
        attach_context_parallel_hooks(model)
        train_ctx, local = make_cp_batch_and_ctx(mesh, batch, cp_mode=cp_mode)
        labels = local.pop("labels")
        with train_ctx():
            loss = token_correct_loss(model(**local).logits, labels, mesh["cp"])
            loss.backward()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        grads = summed_gradients(model)
        results[f"{name}-{cp_mode}"] = {
            "mechanism": "ulysses" if cp_mode == "auto" else cp_mode,
            "loss": total,
            "ref_loss": ref_loss.detach(),
            "grads": grads,
            "ref_grads": {n: p.grad for n, p in reference.named_parameters()},
        }
    return results


def test_functional_api_runs_zoo_models_exactly():
    # "auto" (Ulysses), and the masked ring under cp_mode="ring" (Note [windowed ring])
    runs = (*((name, "auto") for name in ("gemma2", "gpt_oss", "mistral", "gpt_bigcode")), ("gemma2", "ring"))
    runs += (("gpt_oss", "ring"), ("mistral", "ring"))
    by_rank = run_on_ranks(_functional_zoo_parities, runs)
    for name, cp_mode in runs:
        expected = "ulysses" if cp_mode == "auto" else cp_mode
        assert_parity([results[f"{name}-{cp_mode}"] for results in by_rank], expected)
