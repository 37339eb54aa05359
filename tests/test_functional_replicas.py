"""The functional API refuses a model whose replicas differ across the CP group (issue 26), on every rank.

torch seeds every process differently, so a model built without a seed is another model on every rank; under CP
each rank would train its own replica, silently. The strategies broadcast rank 0's weights at setup; the
functional API compares a fingerprint of the replicated parameters over the CP group at a model's first CP step.
One spawn of two gloo ranks runs every case in turn; each case's answer is the error it raised (``""``: none).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
import torch
from distributed_harness import run_on_ranks
from models import lm_batch, tiny_causal_lm
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

import lightning_cp as lcp
from lightning_cp.validation import ContextParallelInputError

INPUT_IDS = torch.arange(1, 17).view(1, 16)


def _step(mesh: DeviceMesh, model: torch.nn.Module) -> None:
    """One functional training step of ``model`` (hooked here) on a 32-token batch."""
    lcp.attach_context_parallel_hooks(model)
    train_ctx, local = lcp.make_cp_batch_and_ctx(mesh, lm_batch(seq_len=32))
    labels = local.pop("labels")
    with train_ctx():
        lcp.token_correct_loss(model(**local).logits, labels, mesh).backward()


def _target_forward(mesh: DeviceMesh, model: torch.nn.Module) -> None:
    """A frozen-target forward through ``make_target_cp_ctx``."""
    lcp.attach_context_parallel_hooks(model)
    cp_ctx, ids, positions, _ = lcp.make_target_cp_ctx(mesh, INPUT_IDS)
    with cp_ctx, torch.no_grad():
        model(input_ids=ids, position_ids=positions)


def _low_level_forward(mesh: DeviceMesh, model: torch.nn.Module) -> None:
    """NeMo's low-level path: buffers sharded in place by ``create_context_parallel_ctx``."""
    lcp.attach_context_parallel_hooks(model)
    ids, positions = INPUT_IDS.clone(), torch.arange(16).view(1, 16)
    with lcp.create_context_parallel_ctx(mesh, [ids, positions], [1, 1], {ids, positions}), torch.no_grad():
        model(input_ids=ids, position_ids=positions)


def _fsdp_sharded(rank: int, mesh: DeviceMesh) -> torch.nn.Module:
    """An unseeded model sharded with FSDP2 over the CP ranks: its pieces form one model, nothing to refuse."""
    from torch.distributed.fsdp import fully_shard

    model = tiny_causal_lm("llama", seed=rank)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _broadcast(rank: int) -> torch.nn.Module:
    """An unseeded model made the same on every rank by the one-line fix the refusal names."""
    model = tiny_causal_lm("llama", seed=rank)
    lcp.broadcast_replicated_state(model)
    return model


def _answer(run: Callable[[], None]) -> str:
    try:
        run()
    except ContextParallelInputError as error:
        return str(error)
    finally:
        gc.collect()  # a refused model is freed on every rank before the next case
    return ""


def _cases(rank: int, world_size: int) -> dict[str, str]:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    return {
        "seeded": _answer(lambda: _step(mesh, tiny_causal_lm("llama"))),
        "unseeded": _answer(lambda: _step(mesh, tiny_causal_lm("llama", seed=rank))),
        "broadcast": _answer(lambda: _step(mesh, _broadcast(rank))),
        "fsdp": _answer(lambda: _step(mesh, _fsdp_sharded(rank, mesh))),
        "unseeded_target": _answer(lambda: _target_forward(mesh, tiny_causal_lm("llama", seed=rank))),
        "unseeded_low_level": _answer(lambda: _low_level_forward(mesh, tiny_causal_lm("llama", seed=rank))),
    }


@pytest.fixture(scope="module")
def answers() -> list[dict[str, str]]:
    return run_on_ranks(_cases, timeout=180)


@pytest.mark.parametrize("case", ["seeded", "broadcast", "fsdp"])
def test_equal_replicas_and_sharded_models_run(answers, case):
    assert [by_case[case] for by_case in answers] == ["", ""]


@pytest.mark.parametrize("case", ["unseeded", "unseeded_target", "unseeded_low_level"])
def test_replicas_that_differ_are_refused_on_every_rank_with_the_fix(answers, case):
    errors = [by_case[case] for by_case in answers]
    assert errors[0] and errors[0] == errors[1], "every rank must raise, and the same error"
    assert errors[0].startswith("The replicas of `LlamaForCausalLM` differ across the context-parallel group: ")
    assert "differ between context-parallel ranks 0 and 1, e.g. `model.embed_tokens.weight` sums to" in errors[0]
    assert "`torch.manual_seed(0)`" in errors[0] and "`lightning_cp.broadcast_replicated_state(model)`" in errors[0]
