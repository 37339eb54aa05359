"""Frozen full-sequence forwards under CP, and per-layer ``torch.compile`` with the ring."""

from __future__ import annotations

import copy

import torch
from distributed_harness import run_on_ranks
from models import lm_batch, tiny_causal_lm
from torch.distributed.device_mesh import init_device_mesh

from lightning_cp import (
    attach_context_parallel_hooks,
    attach_cp_sdpa_hooks,
    gather_cp_seq,
    make_cp_batch_and_ctx,
    make_target_cp_ctx,
    reduce_loss,
    token_correct_loss,
    token_loss_sum,
)
from lightning_cp.attention.switch import active_context_parallel


def _frozen_target(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    model = tiny_causal_lm("qwen2").eval().requires_grad_(False)
    attach_context_parallel_hooks(model)
    input_ids = lm_batch(seq_len=131)["input_ids"]
    full = model(input_ids=input_ids, output_hidden_states=True)
    cp_ctx, ids_buf, pos_buf, orig_len = make_target_cp_ctx(mesh["cp"], input_ids)
    padded_shape = tuple(ids_buf.shape)
    with cp_ctx:
        local_shape = tuple(ids_buf.shape)
        out = model(input_ids=ids_buf, position_ids=pos_buf, output_hidden_states=True)
        logits, hidden = gather_cp_seq(mesh["cp"], [out.logits, out.hidden_states[-1]], seq_dim=1, orig_len=orig_len)
    return {
        "logits": logits,
        "hidden": hidden,
        "ref_logits": full.logits,
        "ref_hidden": full.hidden_states[-1],
        "shapes": (padded_shape, local_shape, orig_len),
        "ring_off_after": active_context_parallel() is None,
    }


def test_target_forward_gathered_equals_full_forward():
    for result in run_on_ranks(_frozen_target):
        assert result["shapes"] == ((2, 132), (2, 66), 131)
        torch.testing.assert_close(result["logits"], result["ref_logits"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(result["hidden"], result["ref_hidden"], atol=1e-5, rtol=1e-5)
        assert result["ring_off_after"]


def _compiled_layers(rank: int, world_size: int) -> dict:
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("context_parallel",))
    cp_mesh = mesh["context_parallel"]
    model = tiny_causal_lm("llama")
    batch = lm_batch(seq_len=128)
    reference = copy.deepcopy(model)
    ref_loss = token_loss_sum(reference(input_ids=batch["input_ids"]).logits, batch["labels"])
    ref_loss = ref_loss / (batch["labels"] != -100).sum()

    attach_context_parallel_hooks(model)
    attach_cp_sdpa_hooks(model, cp_mesh)
    for layer in model.model.layers:
        layer.compile(backend="aot_eager", dynamic=False)
    with torch.no_grad():  # traced once outside CP first, with the shard's shape: the stale-graph trap
        model(input_ids=batch["input_ids"][:, :64])
    losses = []
    for _ in range(2):  # the second step runs the cached graphs
        train_ctx, local = make_cp_batch_and_ctx(mesh, batch)
        labels = local.pop("labels")
        with train_ctx():
            loss = token_correct_loss(model(**local).logits, labels, cp_mesh)
            loss.backward()
        losses.append(reduce_loss(loss, cp_mesh))
    return {"ref": ref_loss.detach(), "cp": losses}


def test_per_layer_compile_with_cp2_equals_eager_cp1():
    """Compiled decoder layers (aot_eager keeps CI fast; Dynamo's tracing is what matters) still run the ring."""
    for result in run_on_ranks(_compiled_layers):
        for loss in result["cp"]:
            torch.testing.assert_close(loss, result["ref"], rtol=1e-5, atol=0)
