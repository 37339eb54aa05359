"""CP=2 on two gloo ranks gives the CP=1 loss and gradients for unmodified Hugging Face models (CPU; CUDA too)."""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import run_on_ranks, summed_gradients
from models import DEVICES, lm_batch, tiny_causal_lm
from torch.distributed.device_mesh import init_device_mesh

from lightning_cp import (
    attach_context_parallel_hooks,
    count_label_tokens,
    make_cp_batch_and_ctx,
    reduce_loss,
    token_correct_loss,
    token_loss_sum,
)
from lightning_cp.loss import _process_group
from lightning_cp.sharding.sequence import ring_pad_multiple


def _reference(model, batch):
    """Loss and gradients without CP: sum of token losses / number of valid labels."""
    logits = model(input_ids=batch["input_ids"]).logits
    count = (batch["labels"] != -100).sum()
    loss = token_loss_sum(logits, batch["labels"]) / count
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _cp_run(model, mesh, batch, mode: str, cp_mode: str = "auto"):
    cp_mesh = mesh["context_parallel"]
    attach_context_parallel_hooks(model)
    if mode == "inputs_embeds":
        embeds = model.get_input_embeddings()(batch["input_ids"])
        batch = {"inputs_embeds": embeds, "labels": batch["labels"]}
    train_ctx, local = make_cp_batch_and_ctx(mesh, batch, cp_mode=cp_mode)
    labels = local.pop("labels")
    with train_ctx():
        if mode == "hf_loss":
            # The model's own loss: shift_labels stops it from shifting inside the shard, and
            # num_items_in_batch (the global count) makes its sum-reduction token-correct.
            count = count_label_tokens(labels, cp_mesh)
            loss = model(**local, labels=labels, shift_labels=labels, num_items_in_batch=count).loss
        else:
            loss = token_correct_loss(model(**local).logits, labels, cp_mesh)
        loss.backward()
    return reduce_loss(loss, cp_mesh), summed_gradients(model, _process_group(cp_mesh)), local["position_ids"].shape[-1]


def _parity(
    rank: int,
    world_size: int,
    family: str,
    seq_len: int,
    ignored_share: float,
    mode: str,
    device: str,
    cp_mode: str = "auto",
) -> dict:
    mesh = init_device_mesh(device, (1, world_size), mesh_dim_names=("data_parallel", "context_parallel"))
    model = tiny_causal_lm(family).to(device)
    batch = {key: value.to(device) for key, value in lm_batch(seq_len=seq_len, ignored_share=ignored_share).items()}
    cp_model = copy.deepcopy(model)
    ref_loss, ref_grads = _reference(model, batch)
    cp_loss, cp_grads, local_len = _cp_run(cp_model, mesh, batch, mode, cp_mode)
    return {"ref_loss": ref_loss, "cp_loss": cp_loss, "ref_grads": ref_grads, "cp_grads": cp_grads, "local": local_len}


CASES = [
    # family, sequence length, share of ignored labels, how the loss/inputs are fed
    ("llama", 128, 0.0, "logits"),
    ("llama", 130, 1 / 3, "logits"),
    ("qwen2", 128, 0.0, "logits"),
    ("qwen2", 130, 1 / 3, "logits"),
    ("llama", 130, 1 / 3, "hf_loss"),
    ("llama", 128, 1 / 3, "inputs_embeds"),
]


#: Each case of ``CASES`` on ``device`` with ``cp_mode="auto"``, then the ring and Ulysses asked for explicitly.
RUNS = [(*case, "auto") for case in CASES] + [("llama", 130, 1 / 3, "hf_loss", mode) for mode in ("ring", "ulysses")]


def _parities(rank: int, world_size: int, device: str) -> list[dict]:
    """Every run of ``RUNS`` in one pair of processes (spawning ranks costs more than a tiny model's step)."""
    return [
        _parity(rank, world_size, family, seq_len, share, mode, device, cp_mode)
        for family, seq_len, share, mode, cp_mode in RUNS
    ]


@pytest.fixture(scope="module", params=DEVICES)
def results_by_rank(request) -> tuple[str, list[list[dict]]]:
    return request.param, run_on_ranks(_parities, request.param)


@pytest.mark.parametrize("index", range(len(RUNS)), ids=["-".join(map(str, run)) for run in RUNS])
def test_cp2_loss_and_gradients_equal_cp1(results_by_rank, index):
    # "auto" picks Ulysses for these hooked models; the ring and Ulysses asked for explicitly are exact too
    device, by_rank = results_by_rank
    seq_len = RUNS[index][1]
    multiple = ring_pad_multiple(2, True, device)  # 4 on CPU; 128 on CUDA (the efficient kernel's 32-query blocks)
    padded = -(-seq_len // multiple) * multiple
    for results in by_rank:
        result = results[index]
        assert result["local"] == padded // 2
        torch.testing.assert_close(result["cp_loss"], result["ref_loss"], rtol=1e-5, atol=0)
        assert result["cp_grads"].keys() == result["ref_grads"].keys()
        for name, ref in result["ref_grads"].items():
            torch.testing.assert_close(result["cp_grads"][name], ref, rtol=1e-4, atol=1e-6, msg=name)
