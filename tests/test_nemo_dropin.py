"""NeMo AutoModel ``cp_utils`` users can switch imports: the behaviours they rely on (issue 17), on real gloo ranks.

One spawn of two ranks runs every collective case (``results``); the tests below read its answers:

1. the low-level path (``create_context_parallel_ctx`` alone or inside ``get_train_context``) switches the
   attention hooks on, so a right-padded batch with an ``attention_mask`` trains exactly as without CP;
2. no CP (no mesh, no CP dimension, CP size 1) returns ``contextlib.nullcontext`` and the batch itself;
3. ``make_cp_batch_for_te`` refuses a non-THD format before it touches the process group, in NeMo's words;
4. sequences shorter than ``2 * cp`` (down to one token, a rank holding only padding) run exactly,
   a packed row and a frozen-target forward too (every rank holds at least two positions);
5. ``position_ids`` come back ``[batch, seq]``, made or given as ``[1, seq]``;
7. a batch's ``_cp_make_batch_fn`` is called as NeMo calls it and never reaches the model;
8. a batch with neither ``input_ids`` nor ``inputs_embeds`` (or both) is refused with ``ContextParallelBatchError``
   on every rank (issue 23: it was a bare ``KeyError: 'inputs_embeds'``).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from distributed_harness import run_on_ranks, summed_gradients
from models import lm_batch, tiny_causal_lm
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lightning_cp import (
    attach_context_parallel_hooks,
    create_context_parallel_ctx,
    gather_cp_seq,
    get_train_context,
    make_cp_batch_and_ctx,
    make_cp_batch_for_te,
    make_target_cp_ctx,
    reduce_loss,
    token_correct_loss,
    token_loss_sum,
)
from lightning_cp.attention.switch import active_context_parallel

SEQ_LEN, PADDED = 64, 5  # point 1: the last 5 positions of each row are right padding


def _grads(model: torch.nn.Module, group: torch.distributed.ProcessGroup | None = None) -> dict:
    """Parameter gradients, summed over ``group`` when given (each CP rank holds its share)."""
    if group is not None:
        return summed_gradients(model, group)
    return {name: param.grad.clone() for name, param in model.named_parameters()}


def _reference(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    """Loss (token-loss sum over valid labels) and gradients without CP, the model called with ``batch``."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    loss = token_loss_sum(model(**inputs).logits, batch["labels"]) / (batch["labels"] != -100).sum()
    loss.backward()
    return loss.detach(), _grads(model)


def _padded_batch() -> dict:
    """Right padding marked by ``attention_mask``, its labels ignored, positions given."""
    batch = lm_batch(seq_len=SEQ_LEN)
    mask = torch.ones(2, SEQ_LEN, dtype=torch.long)
    mask[:, -PADDED:] = 0
    batch["labels"][:, -PADDED:] = -100
    return {**batch, "attention_mask": mask, "position_ids": torch.arange(SEQ_LEN).expand(2, -1).clone()}


def _low_level(mesh: DeviceMesh, model: torch.nn.Module, batch: dict, through_train_context: bool) -> tuple:
    """NeMo's low-level path: buffers sharded in place by ``create_context_parallel_ctx``, mask passed along."""
    buffers = [batch[key].clone() for key in ("input_ids", "labels", "position_ids", "attention_mask")]
    ids, labels, positions, mask = buffers
    cp_ctx = create_context_parallel_ctx(mesh, buffers, [1, 1, 1, 1], set(buffers))
    context = get_train_context(False, False, cp_ctx)() if through_train_context else cp_ctx
    with context:
        logits = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits
        loss = token_correct_loss(logits, labels, mesh)
        loss.backward()
    return reduce_loss(loss, mesh), _grads(model, mesh.get_group())


def _short_sequence(mesh: DeviceMesh, seq_len: int, load_balance: bool) -> dict:
    """CP loss and gradients of a ``seq_len``-token batch next to the no-CP ones (same weights)."""
    model = tiny_causal_lm("llama")
    cp_model = copy.deepcopy(model)
    batch = lm_batch(seq_len=seq_len, ignored_share=0.0)
    batch["labels"] = (batch["input_ids"] * 7 + 3) % 256  # every position a target, even with one token
    ref_loss, ref_grads = _reference(model, batch)
    attach_context_parallel_hooks(cp_model)
    train_ctx, local = make_cp_batch_and_ctx(mesh, batch, load_balance=load_balance)
    labels = local.pop("labels")
    with train_ctx():
        loss = token_correct_loss(cp_model(**local).logits, labels, mesh)
        loss.backward()
    return {
        "ref": (ref_loss, ref_grads),
        "cp": (reduce_loss(loss, mesh), _grads(cp_model, mesh.get_group())),
        "real_tokens": int((local["position_ids"] < seq_len).sum()),
    }


def record_cp_make_batch_fn(cp_mesh, tp_mesh, batch, *, loss_mask=None, padding_token_id=0):
    """A model's own batch-sharding hook, as NeMo calls it: returns what it was given."""
    names = [None if mesh is None else mesh.mesh_dim_names for mesh in (cp_mesh, tp_mesh)]
    return "model's ctx", {"names": names, "keys": sorted(batch), "loss_mask": loss_mask, "pad": padding_token_id}


def _no_cp(rank: int, world_size: int) -> dict:
    """Point 2: every way of asking for no CP."""
    batch = lm_batch(seq_len=16)
    te_batch = {**batch, "seq_lens": torch.tensor([[16], [16]]), "seq_lens_padded": torch.tensor([[16], [16]])}
    cp1 = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("data_parallel", "context_parallel"))
    dp_only = init_device_mesh("cpu", (world_size,), mesh_dim_names=("data_parallel",))
    out = {}
    for name, mesh in (("none", None), ("cp_size_1", cp1), ("no_cp_dim", dp_only)):
        train_ctx, same = make_cp_batch_and_ctx(mesh, batch)
        out[name] = (train_ctx is contextlib.nullcontext, same is batch)
    out["te_cp_size_1"] = make_cp_batch_and_ctx(cp1, te_batch, use_te=True)[0] is contextlib.nullcontext
    return out


def _attempt(case: Callable[[], Any]) -> Any:
    """``case()``, or the error it raised as text: one failing case must not hide the others' answers."""
    try:
        return case()
    except Exception as error:  # noqa: BLE001 - reported by the test that reads this case
        return f"{type(error).__name__}: {error}"


def _packed_short_row(mesh: DeviceMesh) -> dict:
    """A 3-token row packing documents of 1 and 2 tokens, CP next to each document run on its own."""
    model = tiny_causal_lm("llama")
    cp_model = copy.deepcopy(model)
    ids, labels = torch.tensor([[17, 45, 99]]), torch.tensor([[3, 8, 5]])
    total = sum(token_loss_sum(model(input_ids=ids[:, s]).logits, labels[:, s]) for s in (slice(0, 1), slice(1, 3)))
    (total / 3).backward()
    attach_context_parallel_hooks(cp_model)
    packed = {"input_ids": ids, "labels": labels, "position_ids": torch.tensor([[0, 0, 1]])}
    train_ctx, local = make_cp_batch_and_ctx(mesh, packed)
    local_labels = local.pop("labels")
    with train_ctx():
        loss = token_correct_loss(cp_model(**local).logits, local_labels, mesh)
        loss.backward()
    cp = (reduce_loss(loss, mesh), _grads(cp_model, mesh.get_group()))
    return {"ref": ((total / 3).detach(), _grads(model)), "cp": cp}


def _short_target(mesh: DeviceMesh) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """A 2-token frozen-target forward at cp=2 (one token per rank before padding), gathered and in full."""
    model = tiny_causal_lm("llama").eval().requires_grad_(False)
    attach_context_parallel_hooks(model)
    input_ids = torch.tensor([[17, 45], [99, 3]])
    cp_ctx, ids_buf, pos_buf, orig_len = make_target_cp_ctx(mesh, input_ids)
    with cp_ctx:
        local_len = ids_buf.size(1)
        logits = gather_cp_seq(mesh, [model(input_ids=ids_buf, position_ids=pos_buf).logits], 1, orig_len)[0]
    return logits, model(input_ids=input_ids).logits, (local_len, orig_len)


def _nemo_cases(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    results: dict = {"no_cp": _attempt(lambda: _no_cp(rank, world_size))}

    # 1. the low-level path, on its own and inside get_train_context
    model = tiny_causal_lm("llama")
    batch = _padded_batch()
    results["low_level_ref"] = _reference(copy.deepcopy(model), batch)
    for through_train_context in (False, True):
        cp_model = copy.deepcopy(model)
        attach_context_parallel_hooks(cp_model)
        results[f"low_level_{through_train_context}"] = _attempt(
            lambda: _low_level(mesh, cp_model, batch, through_train_context)  # noqa: B023 - called at once
        )
    results["off_after_low_level"] = active_context_parallel() is None
    te_batch = {**batch, "seq_lens": torch.tensor([[64], [64]]), "seq_lens_padded": torch.tensor([[64], [64]])}
    results["te_cp2_ctx"] = make_cp_batch_and_ctx(mesh, te_batch, use_te=True)[0] is contextlib.nullcontext

    # 4. short sequences, with and without load balancing, and a short packed row
    for seq_len, load_balance in ((1, True), (2, True), (3, True), (5, True), (1, False), (3, False)):
        results[f"short_{seq_len}_{load_balance}"] = _attempt(
            lambda: _short_sequence(mesh, seq_len, load_balance)  # noqa: B023 - called at once
        )
    results["short_packed"] = _attempt(lambda: _packed_short_row(mesh))
    results["short_target"] = _attempt(lambda: _short_target(mesh))

    # 5. position_ids per row, made or given as [1, S]
    plain = lm_batch(batch_size=3, seq_len=8)
    made = make_cp_batch_and_ctx(mesh, plain)[1]["position_ids"]
    given = make_cp_batch_and_ctx(mesh, {**plain, "position_ids": torch.arange(8).unsqueeze(0)})[1]["position_ids"]
    results["positions"] = (made, given)

    # 7. a model's own batch-sharding callable
    hooked = {**plain, "_cp_make_batch_fn": record_cp_make_batch_fn}
    cp_tp = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("cp", "tp"))
    ctx, answer = make_cp_batch_and_ctx(cp_tp, hooked, loss_mask=torch.ones(3, 8), padding_token_id=7)
    results["make_batch_fn"] = (ctx if isinstance(ctx, str) else repr(ctx), answer)
    results["make_batch_fn_caller_batch"] = sorted(hooked)
    results["make_batch_fn_no_mesh"] = _attempt(lambda: make_cp_batch_and_ctx(None, hooked)[1]["names"])

    # 8. no input (or two) at cp > 1: refused on every rank before any collective
    labels_only = {"labels": plain["labels"], "position_ids": torch.arange(8).unsqueeze(0)}
    both = {**plain, "inputs_embeds": torch.zeros(3, 8, 4)}
    for name, bad in (("no_input", labels_only), ("both_inputs", both)):
        results[name] = _attempt(lambda: make_cp_batch_and_ctx(mesh, bad))  # noqa: B023 - called at once
    return results


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_on_ranks(_nemo_cases)


def _assert_same(actual: tuple | str, expected: tuple) -> None:
    assert not isinstance(actual, str), actual
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=0)
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        torch.testing.assert_close(actual[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("through_train_context", [False, True])
def test_low_level_context_switches_the_hooks_on_and_gives_the_loss_without_cp(results, through_train_context):
    for result in results:
        _assert_same(result[f"low_level_{through_train_context}"], result["low_level_ref"])
        assert result["off_after_low_level"]


def test_no_cp_returns_nullcontext_and_the_batch_itself(results):
    for result in results:
        assert result["no_cp"] == {
            "none": (True, True),
            "cp_size_1": (True, True),
            "no_cp_dim": (True, True),
            "te_cp_size_1": True,
        }
        assert result["te_cp2_ctx"], "Transformer Engine runs its own ring: the context is nullcontext"


def test_te_batch_refuses_a_non_thd_format_before_touching_the_process_group():
    # A real two-rank mesh whose process groups were never created: asking it for its group raises.
    mesh = DeviceMesh("cpu", [0, 1], mesh_dim_names=("cp",), _init_backend=False, _rank=0)
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.ones(1, 4, dtype=torch.long)}
    # NeMo's own test matches these opening words (tests/unit_tests/distributed/test_cp_utils.py)
    with pytest.raises(ValueError, match="^Currently only 'thd' format is supported, got: bshd"):
        make_cp_batch_for_te(mesh, batch, qkv_format="bshd")


@pytest.mark.parametrize(
    "seq_len,load_balance,real_tokens",
    # real tokens per rank (0, 1): one token at cp=2 leaves rank 1 with padding only, and still runs exactly
    [
        (1, True, (1, 0)),
        (2, True, (1, 1)),
        (3, True, (1, 2)),
        (5, True, (2, 3)),
        (1, False, (1, 0)),
        (3, False, (2, 1)),
    ],
)
def test_sequences_shorter_than_the_chunks_run_exactly(results, seq_len, load_balance, real_tokens):
    held = []
    for result in results:
        case = result[f"short_{seq_len}_{load_balance}"]
        assert not isinstance(case, str), case
        _assert_same(case["cp"], case["ref"])
        held.append(case["real_tokens"] // 2)  # two rows
    assert tuple(held) == real_tokens


def test_a_packed_row_shorter_than_the_chunks_runs_exactly(results):
    for result in results:
        assert not isinstance(result["short_packed"], str), result["short_packed"]
        _assert_same(result["short_packed"]["cp"], result["short_packed"]["ref"])


def test_a_short_frozen_target_forward_holds_two_positions_per_rank_and_is_exact(results):
    for result in results:
        assert not isinstance(result["short_target"], str), result["short_target"]
        gathered, full, lengths = result["short_target"]
        assert lengths == (2, 2), "one token per rank would make Hugging Face's SDPA drop the causal mask"
        torch.testing.assert_close(gathered, full, atol=1e-5, rtol=1e-5)


def test_position_ids_come_back_per_row(results):
    for rank, result in enumerate(results):
        expected = [[0, 1, 6, 7], [2, 3, 4, 5]][rank]
        for positions in result["positions"]:
            assert positions.tolist() == [expected] * 3


def test_a_models_own_batch_sharding_callable_is_called_as_nemo_calls_it(results):
    for result in results:
        ctx, seen = result["make_batch_fn"]
        assert ctx == "model's ctx"
        assert seen["names"] == [("cp",), ("tp",)]
        assert seen["keys"] == ["input_ids", "labels"], "the callable never goes on to the model"
        assert seen["loss_mask"].shape == (3, 8) and seen["pad"] == 7
        assert result["make_batch_fn_caller_batch"] == ["_cp_make_batch_fn", "input_ids", "labels"]
        assert result["make_batch_fn_no_mesh"] == [None, None]


@pytest.mark.parametrize("case,found", [("no_input", "neither"), ("both_inputs", "`input_ids`, `inputs_embeds`")])
def test_a_batch_without_exactly_one_input_is_refused_with_the_batch_error(results, case, found):
    for result in results:
        assert isinstance(result[case], str), "the batch must be refused"
        assert result[case].startswith("ContextParallelBatchError: A CP batch needs exactly one of `input_ids`")
        assert f"this one has {found}" in result[case]
