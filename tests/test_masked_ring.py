"""The masked ring (Note [windowed ring]): windows, softcapping and sinks on the ring, against dense attention.

Raw q/k/v on real gloo ranks (outputs and every input gradient), unpacked rows and packed documents in every
packed layout, the fetch plan's skipped blocks and the K/V it moves, and negative controls: each variant
ignored, or the documents ignored, gives a different result.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from distributed_harness import run_on_ranks

from lightning_cp.attention.masked_ring import AttentionVariant, masked_ring_attention, plan_document_fetch, plan_fetch
from lightning_cp.sharding.packing import gather_packed, plan_packed_layout, shard_packed
from lightning_cp.sharding.sequence import gather_sequence, shard_sequence

SEQ_LEN, HEADS, KV_HEADS, DIM, WINDOW = 64, 4, 2, 8, 6


def _dense(q, k, v, window: int | None, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Reference attention on whole sequences: causal, windowed, softcapped, with sinks, as Hugging Face's eager."""
    k, v = (t.repeat_interleave(q.size(1) // k.size(1), dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    position = torch.arange(q.size(2))
    distance = position[:, None] - position[None, :]
    allowed = (distance >= 0) & (distance < (window or q.size(2)))
    scores = scores.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        column = sinks.view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        return torch.softmax(torch.cat([scores, column], -1), -1)[..., :-1] @ v
    return torch.softmax(scores, -1) @ v


#: (window, softcap, with sinks, load balanced)
VARIANTS = [
    (WINDOW, None, False, True),
    (WINDOW, None, False, False),
    (None, 5.0, False, True),
    (WINDOW, 5.0, True, True),
    (None, None, True, True),
]


def _raw_cases(rank: int, world_size: int) -> list[dict]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    generator = torch.Generator().manual_seed(3)
    q, grad = (torch.randn(2, HEADS, SEQ_LEN, DIM, generator=generator) * 2 for _ in range(2))
    k, v = (torch.randn(2, KV_HEADS, SEQ_LEN, DIM, generator=generator) * 2 for _ in range(2))
    sinks = torch.randn(HEADS, generator=generator)
    results = []
    for window, softcap, with_sinks, load_balance in VARIANTS:
        sink = sinks.clone().requires_grad_() if with_sinks else None
        local = [shard_sequence(t, 2, world_size, rank, load_balance).requires_grad_() for t in (q, k, v)]
        variant = AttentionVariant(1 / math.sqrt(DIM), window, softcap, sink)
        out = masked_ring_attention(*local, variant, mesh.get_group(), load_balance)
        out.backward(shard_sequence(grad, 2, world_size, rank, load_balance))
        reference = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_sink = sinks.clone().requires_grad_() if with_sinks else None
        ref_out = _dense(*reference, window, softcap, ref_sink)
        ref_out.backward(grad)
        cp = [gather_sequence(t.detach(), mesh, 2, load_balance) for t in (out, *(t.grad for t in local))]
        expected = [ref_out.detach(), *(t.grad for t in reference)]
        if with_sinks:  # each rank's sink gradient is its queries' share: the sum over ranks is the whole
            torch.distributed.all_reduce(sink.grad)
            cp.append(sink.grad)
            expected.append(ref_sink.grad)
        ignored = _dense(*(t.detach() for t in (q, k, v)), None, None, None)  # every variant ignored
        results.append({"cp": cp, "reference": expected, "plain": ignored})
    return results


@pytest.fixture(scope="module")
def raw_results() -> list[list[dict]]:
    return run_on_ranks(_raw_cases, timeout=120)


@pytest.mark.parametrize(
    "index",
    range(len(VARIANTS)),
    ids=["window", "window-contiguous", "softcap", "window-softcap-sinks", "sinks"],
)
def test_masked_ring_equals_dense_attention(raw_results, index):
    for by_case in raw_results:
        for cp, reference in zip(by_case[index]["cp"], by_case[index]["reference"], strict=True):
            torch.testing.assert_close(cp, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("index", range(len(VARIANTS)))
def test_negative_control_the_variant_changes_the_result(raw_results, index):
    result = raw_results[0][index]
    assert (result["plain"] - result["reference"][0]).abs().max() > 1e-2


def test_fetch_plan_skips_blocks_outside_the_window_and_moves_less():
    # cp=4, 136 positions in chunks of 17 > window 16: rank 0 (chunks 0 and 7) needs only the end of chunk 6
    # (rank 1) — nothing from ranks 2 and 3 (skipped blocks)
    plan = plan_fetch(136, 4, 0, True, 16)
    assert plan.skipped == (2, 3)
    assert list(plan.needed) == [1]
    assert plan.received_tokens == 15  # positions 104 … 118 of chunk 6 (102 … 118)
    full = plan_fetch(136, 4, 0, True, None)
    assert full.skipped == () and full.received_tokens == 3 * 34  # every other shard, whole
    # window = S/8 at cp=2: each rank receives window - 1 tokens instead of a whole shard (rank 0) or chunk (rank 1)
    received = [
        (plan_fetch(1024, 2, rank, True, 128).received_tokens, plan_fetch(1024, 2, rank, True, None).received_tokens)
        for rank in range(2)
    ]
    assert received == [(127, 512), (127, 256)]


#: Row 0: a short document, one longer than the window spanning the ranks, two more; row 1 packs two.
DOCUMENTS = [[3, 21, 10, 6], [17, 23]]
#: The packed layouts the ring shards into: per-document head/tail, contiguous, short documents kept whole.
PACKED_LAYOUTS = {
    "head_tail": {"load_balance": True},
    "contiguous": {"load_balance": False},
    "whole": {"load_balance": True, "whole_documents": True},
}
#: (layout, window, softcap, with sinks)
PACKED_CASES = [
    ("head_tail", WINDOW, 5.0, True),
    ("contiguous", WINDOW, None, False),
    ("whole", WINDOW, None, True),
    ("head_tail", None, 5.0, False),
]


def _per_document_dense(q, k, v, window, softcap, sinks) -> torch.Tensor:
    """:func:`_dense` on each document of :data:`DOCUMENTS` on its own, back in packed order."""
    rows = []
    for row, lengths in enumerate(DOCUMENTS):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        pieces = [
            _dense(*(t[row : row + 1, :, start : start + n] for t in (q, k, v)), window, softcap, sinks)
            for start, n in zip(starts, lengths, strict=True)
        ]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows)


def _packed_cases(rank: int, world_size: int) -> dict[str, dict]:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    generator = torch.Generator().manual_seed(4)
    q, grad = (torch.randn(2, HEADS, 40, DIM, generator=generator) * 2 for _ in range(2))
    k, v = (torch.randn(2, KV_HEADS, 40, DIM, generator=generator) * 2 for _ in range(2))
    sinks = torch.randn(HEADS, generator=generator)
    results = {}
    for name, window, softcap, with_sinks in PACKED_CASES:
        layout = plan_packed_layout(DOCUMENTS, world_size, **PACKED_LAYOUTS[name])
        # negative control: the same layout with every token in one document (packing ignored)
        merged = dataclasses.replace(layout, document=torch.zeros_like(layout.document))
        sink = sinks.clone().requires_grad_() if with_sinks else None
        local = [shard_packed(t, layout, rank, seq_dim=2).requires_grad_() for t in (q, k, v)]
        variant = AttentionVariant(1 / math.sqrt(DIM), window, softcap, sink)
        out = masked_ring_attention(*local, variant, mesh.get_group(), layout.load_balance, layout)
        out.backward(shard_packed(grad, layout, rank, seq_dim=2))
        ignored = masked_ring_attention(*(t.detach() for t in local), variant, mesh.get_group(), True, merged)
        reference = [t.clone().requires_grad_() for t in (q, k, v)]
        ref_sink = sinks.clone().requires_grad_() if with_sinks else None
        ref_out = _per_document_dense(*reference, window, softcap, ref_sink)
        ref_out.backward(grad)
        cp = [gather_packed(t.detach(), layout, mesh, seq_dim=2) for t in (out, *(t.grad for t in local))]
        expected = [ref_out.detach(), *(t.grad for t in reference)]
        if with_sinks:
            torch.distributed.all_reduce(sink.grad)
            cp.append(sink.grad)
            expected.append(ref_sink.grad)
        results[name + str(window)] = {
            "cp": cp,
            "reference": expected,
            "ignored": gather_packed(ignored.detach(), layout, mesh, seq_dim=2),
        }
    return results


@pytest.fixture(scope="module")
def packed_results() -> list[dict[str, dict]]:
    return run_on_ranks(_packed_cases, timeout=120)


@pytest.mark.parametrize("layout,window,softcap,with_sinks", PACKED_CASES)
def test_masked_ring_on_packed_rows_equals_each_document_alone(packed_results, layout, window, softcap, with_sinks):
    for by_case in packed_results:
        result = by_case[layout + str(window)]
        for cp, reference in zip(result["cp"], result["reference"], strict=True):
            torch.testing.assert_close(cp, reference, rtol=1e-4, atol=1e-5)
        # negative control: attending across the documents of the row gives a different output
        assert (result["ignored"] - result["reference"][0]).abs().max() > 1e-2


def test_packed_fetch_plan_moves_only_the_attended_keys_of_each_document():
    # whole-document placement of short documents: each stays on one rank, so no rank needs another's keys
    whole = plan_packed_layout([[5, 7, 3, 9, 2, 4, 8, 2]], 2, load_balance=True, whole_documents=True)
    assert [plan_document_fetch(whole, rank, None).received_tokens for rank in range(2)] == [0, 0]
    # one 64-token document split head/tail: with a window of 6 a rank receives window - 1 keys per chunk
    # boundary it does not hold the keys before, as on an unpacked row
    split = plan_packed_layout([[64]], 2, load_balance=True)
    for rank in range(2):
        packed, unpacked = plan_document_fetch(split, rank, WINDOW), plan_fetch(64, 2, rank, True, WINDOW)
        assert packed.received_tokens == unpacked.received_tokens
        assert torch.equal(packed.key_positions, unpacked.key_positions)
