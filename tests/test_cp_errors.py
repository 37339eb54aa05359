"""Error paths on real ranks: refused before any collective, same message everywhere, CP state restored."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_on_ranks
from models import lm_batch, tiny_causal_lm
from plain_lm import VOCAB_SIZE, plain_causal_lm
from torch.distributed.device_mesh import init_device_mesh

from lightning_cp import attach_context_parallel_hooks, make_cp_batch_and_ctx
from lightning_cp.attention import ledger
from lightning_cp.attention.switch import active_context_parallel, ring_attention
from lightning_cp.hooks import find_attention_modules


def _error_of(call) -> str | None:
    try:
        call()
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


def _run_model(mesh, model, batch, **kwargs):
    train_ctx, local = make_cp_batch_and_ctx(mesh, batch, **kwargs)
    local.pop("labels")
    with train_ctx():
        return model(**local).logits


def _error_cases(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    batch = lm_batch(seq_len=128)
    results = {}

    bad = {**batch, "attention_mask": torch.ones(2, 128, dtype=torch.long)}
    bad["attention_mask"][0, 0] = 0
    results["left_padding"] = _error_of(lambda: make_cp_batch_and_ctx(mesh, bad))

    model = tiny_causal_lm("llama")
    attach_context_parallel_hooks(model)

    def without_positions():
        train_ctx, local = make_cp_batch_and_ctx(mesh, batch)
        with train_ctx():
            model(input_ids=local["input_ids"])

    results["missing_position_ids"] = _error_of(without_positions)
    for module in find_attention_modules(model).values():
        module.is_causal = False
    # the ring's rules (Ulysses, which "auto" picks for this model, runs both exactly: tests/test_ulysses.py)
    results["non_causal_load_balanced"] = _error_of(lambda: _run_model(mesh, model, batch, cp_mode="ring"))
    results["restored_after_error"] = (
        active_context_parallel() is None
        and F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    )
    reference = model(input_ids=batch["input_ids"]).logits  # bidirectional, no CP
    from lightning_cp.sharding.sequence import gather_sequence

    local_logits = _run_model(mesh, model, batch, load_balance=False, cp_mode="ring")
    results["non_causal_without_balance_error"] = (
        (gather_sequence(local_logits, mesh, 1, load_balance=False) - reference).abs().max().item()
    )

    # bidirectional attention over a padded sequence: the ring would let every token see the padding
    odd = lm_batch(seq_len=127)
    results["non_causal_padded"] = _error_of(lambda: _run_model(mesh, model, odd, load_balance=False, cp_mode="ring"))

    # through transformers' attention interface every mode applies a window (tests/test_ulysses.py); a window of
    # attention written by hand, calling SDPA, would be attended beyond
    windowed = plain_causal_lm()
    for layer in windowed.layers:
        layer.self_attn.sliding_window = 64
    attach_context_parallel_hooks(windowed)
    train_ctx, local = make_cp_batch_and_ctx(mesh, batch, cp_mode="ring")

    def hand_written_window():
        with train_ctx():
            windowed(local["input_ids"] % VOCAB_SIZE, position_ids=local["position_ids"])

    results["sliding_window"] = _error_of(hand_written_window)

    q = torch.randn(1, 2, 32, 8)

    def explicit_mask():
        with ring_attention(mesh):
            F.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(1, 1, 32, 32, dtype=torch.bool))

    results["explicit_mask"] = _error_of(explicit_mask)

    def nested():
        with ring_attention(mesh), ring_attention(mesh):
            pass

    results["nested"] = _error_of(nested)

    def dropout():
        with ring_attention(mesh):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.1, is_causal=True)

    results["dropout"] = _error_of(dropout)

    def sharded_without_cp_ranks():
        from torch.distributed.fsdp import fully_shard

        from lightning_cp.strategies.gradients import check_sharded_parameters

        data_only = init_device_mesh("cpu", (world_size,), mesh_dim_names=("data_parallel",))
        check_sharded_parameters(fully_shard(torch.nn.Linear(4, 4), mesh=data_only), cp_size=2)

    results["sharded_without_cp_ranks"] = _error_of(sharded_without_cp_ranks)

    def tuple_batch():
        from lightning_cp.mesh import build_device_mesh, resolve_layout
        from lightning_cp.session import ContextParallelSession

        layout_mesh, data_context = build_device_mesh(resolve_layout(world_size, world_size, 1, 1), torch.device("cpu"))
        ContextParallelSession(layout_mesh, data_context).shard((batch["input_ids"],), require_labels=True)

    try:
        tuple_batch()
        results["tuple_batch"] = None
    except TypeError as err:
        results["tuple_batch"] = str(err)
    results["rotate_method"] = _error_of(lambda: make_cp_batch_and_ctx(mesh, batch, rotate_method="ring"))
    return results


@pytest.fixture(scope="module")
def error_results():
    return run_on_ranks(_error_cases)


@pytest.mark.parametrize(
    "case,message",
    [
        ("left_padding", "left padding or holes"),
        ("missing_position_ids", "without `position_ids`: it would number each shard's tokens from 0"),
        ("non_causal_load_balanced", "only supports causal attention"),
        ("non_causal_padded", "is not causal .* padded by 1 positions .* Use cp_mode='ulysses'"),
        ("sliding_window", "sliding window of 64 tokens, shorter than the sequence \\(128\\).* not attend through"),
        ("explicit_mask", "cannot apply an explicit `attn_mask`"),
        ("nested", "do not nest"),
        ("dropout", "does not support attention dropout"),
        ("sharded_without_cp_ranks", "do not include the context-parallel ranks"),
        ("tuple_batch", "needs each batch to be a dict"),
        ("rotate_method", "`rotate_method` must be one of"),
    ],
)
def test_every_rank_gets_the_same_clear_error(error_results, case, message):
    import re

    messages = [result[case] for result in error_results]
    assert messages[0] is not None and re.search(message, messages[0]), messages[0]
    assert messages[0] == messages[1]


def test_cp_state_is_restored_after_an_error_inside_the_context(error_results):
    assert all(result["restored_after_error"] for result in error_results)


def test_non_causal_attention_without_load_balancing_matches_full_attention(error_results):
    assert all(result["non_causal_without_balance_error"] < 1e-5 for result in error_results)


def _left_running_after_an_error_inside_attention(rank: int, world_size: int) -> tuple[str | None, bool]:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    model = tiny_causal_lm("llama")
    attach_context_parallel_hooks(model)
    for module in find_attention_modules(model).values():
        module.attention_dropout = 0.1  # refused by the ring inside the hooked attention module's forward
    error = _error_of(lambda: _run_model(mesh, model, lm_batch(seq_len=64), cp_mode="ring"))
    left_running = ledger.inside_hooked_module()
    model = None  # the ranks serve later cases: no hooked model may outlive this one
    gc.collect()
    return error, left_running


def test_a_forward_that_raised_inside_attention_leaves_no_module_running():
    """A module left "running" would stay alive and hooked, steer the functional API's choice of mechanism for
    the models that come after, and count as "inside a hooked module" outside CP."""
    for error, left_running in run_on_ranks(_left_running_after_an_error_inside_attention):
        assert error is not None and "dropout" in error, error
        assert not left_running


def _no_op_meshes(rank: int, world_size: int) -> dict:
    batch = lm_batch(seq_len=16)
    cp1 = init_device_mesh("cpu", (world_size, 1), mesh_dim_names=("data_parallel", "context_parallel"))
    dp_only = init_device_mesh("cpu", (world_size,), mesh_dim_names=("data_parallel",))
    return {
        "cp_size_1": make_cp_batch_and_ctx(cp1, batch)[1] is batch,
        "no_cp_dim": make_cp_batch_and_ctx(dp_only, batch)[1] is batch,
    }


def test_cp_of_size_one_or_no_cp_dimension_leaves_the_batch_alone():
    for result in run_on_ranks(_no_op_meshes):
        assert result == {"cp_size_1": True, "no_cp_dim": True}


def test_attention_no_mechanism_runs_is_refused_at_attach_time():
    model = tiny_causal_lm("llama", attn_implementation="paged|eager")
    with pytest.raises(ValueError, match="attn_implementation='paged|eager'"):
        attach_context_parallel_hooks(model)
    # flex_attention is attached: Ulysses runs it (tests/test_ulysses_kernels.py)
    assert attach_context_parallel_hooks(tiny_causal_lm("llama", attn_implementation="flex_attention"))
    # eager attention is attached (Ulysses runs it, and the masked ring under cp_mode="ring": tests/test_ulysses.py)
    assert attach_context_parallel_hooks(tiny_causal_lm("llama", attn_implementation="eager"))
