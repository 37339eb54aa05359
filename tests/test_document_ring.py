"""Document-masked ring attention on 2 gloo ranks equals attention over each document on its own.

Also: no score-sized (local x local) tensor is ever allocated, and whole-document placement keeps
every token once and the work even.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_on_ranks
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_cp.attention.document_ring import plan_document_ring
from lightning_cp.attention.switch import ring_attention
from lightning_cp.sharding.packing import gather_packed, plan_packed_layout, shard_packed
from lightning_cp.sharding.te_batch import padded_packed_batch

# Row 0: a document shorter than a shard (3), one spanning both ranks (21), and two more; row 1 packs two.
DOCUMENTS = [[3, 21, 10, 6], [17, 23]]
# Many short documents: whole-document placement keeps them all on one rank or the other.
SHORT_DOCUMENTS = [[5, 7, 3, 9, 2, 4, 8, 2], [1, 6, 33]]
SEQ_LEN, HEADS, KV_HEADS, DIM = 40, 4, 2, 8
#: The layouts the ring runs on: per-document head/tail (TE's), contiguous, whole documents.
LAYOUTS = {
    "head_tail": {"load_balance": True},
    "contiguous": {"load_balance": False},
    "whole": {"load_balance": True, "whole_documents": True},
}
CASES = [
    ("head_tail", True, DOCUMENTS),
    ("contiguous", True, DOCUMENTS),
    ("contiguous", False, DOCUMENTS),
    ("head_tail", False, DOCUMENTS),
    ("whole", True, DOCUMENTS),
    ("whole", False, DOCUMENTS),
    ("whole", True, SHORT_DOCUMENTS),
    ("whole", False, SHORT_DOCUMENTS),
]


def _inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(2, HEADS, SEQ_LEN, DIM, generator=generator)
    k = torch.randn(2, KV_HEADS, SEQ_LEN, DIM, generator=generator)
    v = torch.randn(2, KV_HEADS, SEQ_LEN, DIM, generator=generator)
    grad_out = torch.randn(2, HEADS, SEQ_LEN, DIM, generator=generator)
    return q, k, v, grad_out


def _per_document_reference(q, k, v, grad_out, is_causal, documents):
    """Each document attended on its own with plain SDPA; outputs and gradients in packed order."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    rows = []
    for row, lengths in enumerate(documents):
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
    for name, is_causal, documents in CASES:
        layout = plan_packed_layout(documents, world_size, **LAYOUTS[name])
        local = [shard_packed(t, layout, rank, seq_dim=2).requires_grad_() for t in (q, k, v)]
        with ring_attention(mesh, load_balance=layout.load_balance, documents=layout):
            out = F.scaled_dot_product_attention(*local, is_causal=is_causal, enable_gqa=True)
            out.backward(shard_packed(grad_out, layout, rank, seq_dim=2))
        ring = [gather_packed(t, layout, mesh, seq_dim=2) for t in (out.detach(), *(t.grad for t in local))]
        results[(name, is_causal, str(documents))] = {
            "ring": ring,
            "reference": _per_document_reference(q, k, v, grad_out, is_causal, documents),
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


@pytest.mark.parametrize("layout,is_causal,documents", CASES)
def test_document_masked_ring_equals_per_document_attention(results, layout, is_causal, documents):
    for rank_results in results:
        case = rank_results[(layout, is_causal, str(documents))]
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


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op returns while open (what allocates a score matrix)."""

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max([self.numel, *sizes])
        return out


#: A row whose shard (256 tokens) makes a score block (256 x 256 per head) far larger than q/k/v/out.
WITNESS_DOCUMENTS = [[300, 40, 17, 100, 55]]
WITNESS_HEADS, WITNESS_DIM = 4, 8


def _largest_tensors(rank: int, world_size: int) -> dict[str, int]:
    """Largest tensor of the document ring (forward + backward) and of a dense masked attention, same shards."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    layout = plan_packed_layout(WITNESS_DOCUMENTS, world_size, True, whole_documents=True)
    local_len = layout.shard_index.size(-1)
    generator = torch.Generator().manual_seed(rank)
    q = torch.randn(1, WITNESS_HEADS, local_len, WITNESS_DIM, generator=generator, requires_grad=True)
    k, v = (torch.randn(1, 2, local_len, WITNESS_DIM, generator=generator, requires_grad=True) for _ in range(2))
    largest = {"local_len": local_len}
    for is_causal in (True, False):
        with ring_attention(mesh, documents=layout), _LargestTensor() as witness:
            F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True).sum().backward()
        largest[f"ring causal={is_causal}"] = witness.numel
    # negative control: what the old dense path did, a [local, local] mask and score block
    documents = layout.documents(rank)
    mask = (documents[:, :, None] == documents[:, None, :]).unsqueeze(1)
    with sdpa_kernel(SDPBackend.MATH), _LargestTensor() as witness:
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).sum().backward()
    largest["dense"] = witness.numel
    return largest


def test_no_score_sized_tensor_is_allocated():
    # A (local x local) tensor of one head is what the dense path allocates per block; the fused
    # kernels keep their tiles internal, so every tensor the ring creates is linear in the shard.
    for largest in run_on_ranks(_largest_tensors):
        score_block = largest["local_len"] ** 2
        assert largest["dense"] >= score_block, "negative control: the witness must see a dense score block"
        for name in ("ring causal=True", "ring causal=False"):
            assert largest[name] < score_block // 4, (name, largest[name], score_block)


def _mixed_lengths(seed: int, total: int) -> list[int]:
    """A row of ``total`` tokens: mostly short documents and a few long ones (long-tailed, as real data)."""
    rng = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(rng.choice([rng.randint(8, 200)] * 6 + [rng.randint(200, 1500)] * 3 + [rng.randint(1500, 6000)]))
    lengths[-1] -= sum(lengths) - total
    return [length for length in lengths if length]


@pytest.mark.parametrize("cp_size", [2, 4])
@pytest.mark.parametrize("is_causal", [True, False])
def test_whole_document_placement_covers_every_token_once_and_balances_work(cp_size, is_causal):
    rows = [_mixed_lengths(seed, 8192) for seed in range(6)]
    whole = plan_packed_layout(rows, cp_size, True, whole_documents=True)
    head_tail = plan_packed_layout(rows, cp_size, True)
    for row, lengths in enumerate(rows):
        held = torch.cat([whole.sources(rank)[row] for rank in range(cp_size)])
        assert sorted(held[held >= 0].tolist()) == list(range(sum(lengths)))
    assert whole.padded_len <= 1.05 * head_tail.padded_len
    plans = [plan_document_ring(whole, rank, is_causal) for rank in range(cp_size)]
    pairs = [plan.attended_pairs for plan in plans]
    assert max(pairs) / (sum(pairs) / cp_size) <= 1.1, pairs
    received = sum(plan.received_tokens for plan in plans)
    uniform = sum(plan_document_ring(head_tail, rank, is_causal).received_tokens for rank in range(cp_size))
    assert received < uniform, (received, uniform)  # K/V tokens moved, against per-document head/tail


def test_a_row_of_short_documents_needs_no_communication():
    layout = plan_packed_layout(SHORT_DOCUMENTS[:1], 2, True, whole_documents=True)
    for rank in range(2):
        plan = plan_document_ring(layout, rank, is_causal=True)
        assert plan.received_tokens == 0 and not plan.sends
        assert all(block.source == rank for block in plan.blocks)


def test_transformer_engine_batches_refuse_a_whole_document_layout():
    # TE partitions every document head/tail itself: a layout with whole documents would not match it.
    layout = plan_packed_layout([[3, 5]], 2, True, whole_documents=True)
    batch = {"input_ids": torch.arange(8).unsqueeze(0), "labels": torch.arange(8).unsqueeze(0)}
    with pytest.raises(ValueError, match="whole_documents=True"):
        padded_packed_batch(batch, layout)
