"""Packed documents (position_ids restarting per document) on a Hugging Face Llama under CP=2.

CP=2 losses and gradients equal CP=1 with the same packing (Hugging Face's own document mask) and
the unpacked per-document computation; through the session (labels as Hugging Face takes them) and
the functional API (labels shifted per document), with load balancing on and off.
"""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import averaged_gradients, run_on_ranks, summed_gradients
from models import tiny_causal_lm

from lightning_cp import ContextParallelBatchError, make_cp_batch_and_ctx, reduce_loss, token_correct_loss
from lightning_cp.loss import token_loss_sum
from lightning_cp.mesh import ParallelLayout, build_device_mesh
from lightning_cp.session import ContextParallelSession
from lightning_cp.sharding.batch import next_token_labels
from lightning_cp.sharding.packing import document_ids, document_lengths, is_packed, next_token_labels_within_documents
from lightning_cp.sharding.te_batch import padded_packed_batch, thd_batch_for_rank

# 64 tokens per row; row 0 has a document shorter than a shard (5) and one spanning both ranks (37).
DOCUMENTS = [[5, 37, 22], [30, 20, 14]]


def packed_batch() -> dict:
    """Hugging Face padding-free packing: position_ids restart, each document's first label is -100."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1, 256, (2, 64), generator=generator)
    labels = input_ids.clone()
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in DOCUMENTS])
    labels[position_ids == 0] = -100
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def _grads(model) -> dict:
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _packed_cp1(model, batch):
    # Hugging Face masks per document only without a KV cache (it skips packing detection with one)
    loss = model(**batch, use_cache=False).loss
    loss.backward()
    return loss.detach(), _grads(model)


def _unpacked(model, batch):
    """Every document run on its own; token losses summed over all documents / all valid labels."""
    total, count = 0.0, 0
    for row, lengths in enumerate(DOCUMENTS):
        start = 0
        for length in lengths:
            ids = batch["input_ids"][row : row + 1, start : start + length]
            labels = next_token_labels(batch["labels"][row : row + 1, start : start + length])
            total = total + token_loss_sum(model(input_ids=ids).logits, labels)
            count += int((labels != -100).sum())
            start += length
    loss = total / count
    loss.backward()
    return loss.detach(), _grads(model)


def _session_run(model, mesh, data_context, batch, load_balance):
    session = ContextParallelSession(mesh, data_context, load_balance=load_balance)
    session.prepare_model(model)
    local = dict(batch)
    with session.step(local):
        loss = model(**local).loss  # the HF loss, made token-correct by the session
        loss.backward()
    # the session's loss gradient is |dp x cp| x this rank's share: averaging gives the full gradient
    return loss.detach(), averaged_gradients(model, data_context.get_group())


def _functional_run(model, mesh, batch, load_balance):
    cp_mesh = mesh["context_parallel"]
    documents = document_ids(document_lengths(batch))
    shifted = {**batch, "labels": next_token_labels_within_documents(batch["labels"], documents)}
    train_ctx, local = make_cp_batch_and_ctx(mesh, shifted, load_balance=load_balance)
    labels = local.pop("labels")
    with train_ctx():
        loss = token_correct_loss(model(**local).logits, labels, cp_mesh)
        loss.backward()
    return reduce_loss(loss, cp_mesh), summed_gradients(model, cp_mesh.get_group())


def _gathered_logits(model, mesh, data_context, batch):
    """Logits of a packed batch run under CP and gathered back to the original token order."""
    session = ContextParallelSession(mesh, data_context)
    session.prepare_model(model)
    local = dict(batch)
    with torch.no_grad(), session.step(local, require_labels=False):
        gathered = session.gather_outputs(
            model(input_ids=local["input_ids"], position_ids=local["position_ids"]).logits
        )
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    return gathered, reference


def _te_route(mesh, data_context, batch, rank):
    """The session's Transformer Engine route gives exactly the THD batch TE's partitioning defines."""
    session = ContextParallelSession(mesh, data_context, transformer_engine=True)
    local = dict(batch)
    step = session.shard(local, require_labels=True)
    padded = padded_packed_batch({**batch, "labels": local_labels_reference(batch)}, step.layout)
    expected = thd_batch_for_rank(padded, 2, rank)
    return {key: (local[key], expected[key]) for key in ("input_ids", "labels", "position_ids", "cu_seqlens_padded")}


def local_labels_reference(batch):
    return next_token_labels_within_documents(batch["labels"], document_ids(document_lengths(batch)))


def _packed_parity(rank: int, world_size: int) -> dict:
    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
    batch = packed_batch()
    model = tiny_causal_lm("llama")
    results = {
        "packed_cp1": _packed_cp1(copy.deepcopy(model), batch),
        "unpacked": _unpacked(copy.deepcopy(model), batch),
        "te_route": _te_route(mesh, data_context, batch, rank),
        "logits": _gathered_logits(copy.deepcopy(model), mesh, data_context, batch),
    }
    for load_balance in (True, False):
        results[("session", load_balance)] = _session_run(copy.deepcopy(model), mesh, data_context, batch, load_balance)
        results[("functional", load_balance)] = _functional_run(copy.deepcopy(model), mesh, batch, load_balance)
    return results


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_packed_parity)


def _assert_same(actual, expected):
    loss, grads = actual
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=0)
    assert grads.keys() == expected[1].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_hf_packed_cp1_equals_unpacked_documents(results):
    _assert_same(results[0]["packed_cp1"], results[0]["unpacked"])


@pytest.mark.parametrize("path", ["session", "functional"])
@pytest.mark.parametrize("load_balance", [True, False])
def test_cp2_packed_equals_cp1_packed_and_unpacked(results, path, load_balance):
    for rank_results in results:
        _assert_same(rank_results[(path, load_balance)], rank_results["packed_cp1"])
        _assert_same(rank_results[(path, load_balance)], rank_results["unpacked"])


def test_gathered_logits_equal_cp1_logits_in_original_order(results):
    for rank_results in results:
        gathered, reference = rank_results["logits"]
        torch.testing.assert_close(gathered, reference, atol=1e-5, rtol=1e-5)


def test_transformer_engine_route_gives_te_partitioned_thd_batch(results):
    for rank_results in results:
        for key, (routed, expected) in rank_results["te_route"].items():
            assert torch.equal(routed, expected), key


def test_packing_is_recognised_by_keys_or_restarting_positions():
    batch = packed_batch()
    assert is_packed(batch)
    assert not is_packed({"input_ids": batch["input_ids"], "position_ids": torch.arange(64).unsqueeze(0)})
    assert is_packed({"input_ids": batch["input_ids"], "cu_seqlens": torch.tensor([0, 64])})
    assert document_lengths(batch) == DOCUMENTS


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("cu_seqlens", torch.tensor([[0, 10, 64], [0, 30, 60]]), "ends at 60 but the packed row holds 64"),
        ("cu_seqlens", torch.tensor([[0, 40, 20, 64], [0, 30, 50, 64]]), "must not decrease"),
        ("cu_seqlens", torch.tensor([0, 10, 64]), "1-D `cu_seqlens` describes one packed row"),
        ("seq_lens", torch.tensor([[10, 54], [30, 20]]), "add up to 50 tokens but the packed row holds 64"),
        ("cu_seqlens", torch.tensor([[3, 64], [0, 64]]), "must start at 0"),
    ],
)
def test_inconsistently_delimited_documents_are_refused(key, value, message):
    with pytest.raises(ContextParallelBatchError, match=message):
        document_lengths({**packed_batch(), key: value})
