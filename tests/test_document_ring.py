"""Document-masked ring attention on 2 gloo ranks equals attention over each document on its own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh

from lightning_cp.attention.switch import ring_attention
from lightning_cp.sharding.packing import gather_packed, plan_packed_layout, shard_packed

# Row 0: a document shorter than a shard (3), one spanning both ranks (21), and two more; row 1 packs two.
DOCUMENTS = [[3, 21, 10, 6], [17, 23]]
SEQ_LEN, HEADS, KV_HEADS, DIM = 40, 4, 2, 8


def _inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, HEADS, SEQ_LEN, DIM, generator=generator)
    k = torch.randn(2, KV_HEADS, SEQ_LEN, DIM, generator=generator)
    v = torch.randn(2, KV_HEADS, SEQ_LEN, DIM, generator=generator)
    grad_out = torch.randn(2, HEADS, SEQ_LEN, DIM, generator=generator)
    return q, k, v, grad_out


def _per_document_reference(q, k, v, grad_out, is_causal):
    """Each document attended on its own with plain SDPA; outputs and gradients in packed order."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rows = []
    for row, lengths in enumerate(DOCUMENTS):
        pieces, start = [], 0
        for length in lengths:
            span = slice(start, start + length)
            pieces.append(
                F.scaled_dot_product_attention(
                    q[row : row + 1, :, span],
                    k[row : row + 1, :, span],
                    v[row : row + 1, :, span],
                    is_causal=is_causal,
                    enable_gqa=True,
                )
            )
            start += length
        rows.append(torch.cat(pieces, dim=2))
    out = torch.cat(rows)
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def _document_ring(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    q, k, v, grad_out = _inputs()
    results = {}
    for load_balance, is_causal in ((True, True), (False, True), (False, False)):
        layout = plan_packed_layout(DOCUMENTS, world_size, load_balance)
        local = [shard_packed(t, layout, rank, seq_dim=2).requires_grad_() for t in (q, k, v)]
        with ring_attention(mesh, load_balance=load_balance, documents=layout):
            out = F.scaled_dot_product_attention(*local, is_causal=is_causal, enable_gqa=True)
            out.backward(shard_packed(grad_out, layout, rank, seq_dim=2))
        ring = [gather_packed(t, layout, mesh, seq_dim=2) for t in (out.detach(), *(t.grad for t in local))]
        results[(load_balance, is_causal)] = {
            "ring": ring,
            "reference": _per_document_reference(q, k, v, grad_out, is_causal),
        }
    return results


def _autocast_runs(rank: int, world_size: int) -> list[list[torch.Tensor]]:
    """bf16 inputs, forward and backward inside CPU autocast, then the same without autocast."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    q, k, v, grad_out = (t.to(torch.bfloat16) for t in _inputs())
    layout = plan_packed_layout(DOCUMENTS, world_size, True)
    runs = []
    for enabled in (True, False):
        local = [shard_packed(t, layout, rank, seq_dim=2).requires_grad_() for t in (q, k, v)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled), ring_attention(mesh, documents=layout):
            out = F.scaled_dot_product_attention(*local, is_causal=True, enable_gqa=True)
            out.backward(shard_packed(grad_out, layout, rank, seq_dim=2))
        runs.append([out.detach(), *(t.grad for t in local)])
    return runs


def test_autocast_does_not_lower_the_document_ring_products():
    # Under autocast (CPU and CUDA) matmuls would run in bf16; the ring keeps its scores, merge and
    # backward in fp32, in the forward and in a backward called inside the autocast region alike.
    for autocast, plain in run_on_ranks(_autocast_runs):
        for name, got, expected in zip(("out", "dq", "dk", "dv"), autocast, plain, strict=True):
            assert got.dtype == torch.bfloat16, name
            torch.testing.assert_close(got, expected, atol=0, rtol=0, msg=f"{name} changed under autocast")


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_document_ring)


@pytest.mark.parametrize("load_balance,is_causal", [(True, True), (False, True), (False, False)])
def test_document_masked_ring_equals_per_document_attention(results, load_balance, is_causal):
    for rank_results in results:
        case = rank_results[(load_balance, is_causal)]
        for name, ring, reference in zip(("out", "dq", "dk", "dv"), case["ring"], case["reference"], strict=True):
            torch.testing.assert_close(ring, reference, atol=1e-5, rtol=1e-5, msg=f"{name} differs")


def test_layout_keeps_every_token_once_and_balances_causal_work():
    layout = plan_packed_layout(DOCUMENTS, 2, load_balance=True)
    # a document and the padding after it (document -(d + 1)) form one span of a multiple of 2 * cp
    spans = torch.where(layout.document < 0, -layout.document - 1, layout.document)
    for row in range(len(DOCUMENTS)):
        held = torch.cat([layout.sources(rank)[row] for rank in range(2)])
        assert sorted(held[held >= 0].tolist()) == list(range(SEQ_LEN))
        start_of = {int(span): int((spans[row] == span).nonzero()[0]) for span in spans[row].unique()}
        work = [
            sum(int(p) - start_of[int(spans[row, p])] + 1 for p in layout.positions(rank)[row]) for rank in range(2)
        ]
        assert work[0] == work[1]
