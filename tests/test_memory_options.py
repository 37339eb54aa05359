"""Chunked loss and activation checkpointing: the same loss and gradients, without the full logits.

Single-process checks of the mechanisms; the CP runs (Trainer and Fabric, cp=2) are in test_trainer.py
and test_fabric.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from distributed_harness import summed_gradients
from models import lm_batch, tiny_causal_lm

from lightning_cp.chunked_loss import DEFAULT_CHUNK_TOKENS, apply_chunked_loss
from lightning_cp.memory import apply_activation_checkpointing, chunk_tokens_of

VOCAB = 256


def _loss_and_grads(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _saved_shapes(model: torch.nn.Module, batch: dict) -> list[tuple[int, ...]]:
    """Shapes of every tensor autograd saves for backward during one forward (a memory witness)."""
    shapes: list[tuple[int, ...]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**batch).loss.backward()
    return shapes


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [7, 1024])
def test_chunked_loss_equals_the_full_loss_and_gradients(tied, chunk):
    model = tiny_causal_lm("llama", tie_word_embeddings=tied)
    batch = {"input_ids": lm_batch(seq_len=50)["input_ids"]}
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][0, :20] = -100
    loss, grads = _loss_and_grads(model, batch)
    chunked = copy.deepcopy(model)
    assert apply_chunked_loss(chunked, chunk) == ["LlamaForCausalLM"]
    chunked_loss, chunked_grads = _loss_and_grads(chunked, batch)
    torch.testing.assert_close(chunked_loss, loss, rtol=1e-5, atol=0)
    assert grads.keys() == chunked_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert chunked(**batch).logits is None
    assert chunked(input_ids=batch["input_ids"]).logits.shape == (*batch["input_ids"].shape, VOCAB)


def test_chunked_loss_never_saves_the_full_logits():
    """Memory witness: with the chunked loss no saved tensor spans all tokens × the vocabulary (control: without)."""
    model = tiny_causal_lm("llama")
    batch = lm_batch(seq_len=64)
    tokens = batch["input_ids"].numel()

    def full_logits_saved(shapes: list[tuple[int, ...]]) -> bool:
        return any(shape[-1:] == (VOCAB,) and torch.Size(shape).numel() >= tokens * VOCAB for shape in shapes)

    assert full_logits_saved(_saved_shapes(model, batch))
    apply_chunked_loss(model, 16)
    assert not full_logits_saved(_saved_shapes(model, batch))


def test_activation_checkpointing_keeps_the_gradients_and_saves_less():
    model = tiny_causal_lm("llama")
    batch = lm_batch(seq_len=64)
    loss, grads = _loss_and_grads(model, batch)
    saved = sum(torch.Size(shape).numel() for shape in _saved_shapes(model, batch))
    apply_activation_checkpointing(model)
    checkpointed_loss, checkpointed_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(checkpointed_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert sum(torch.Size(shape).numel() for shape in _saved_shapes(model, batch)) < saved


def test_a_model_that_changes_its_logits_before_the_loss_is_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        final_logit_softcapping=30.0,
    )
    with pytest.raises(ValueError, match="changes the logits before the loss"):
        apply_chunked_loss(Gemma2ForCausalLM(config))


@pytest.mark.parametrize("value,tokens", [(False, None), (True, DEFAULT_CHUNK_TOKENS), (100, 100)])
def test_the_chunked_loss_option_reads_as_tokens_per_chunk(value, tokens):
    assert chunk_tokens_of(value) == tokens


@pytest.mark.parametrize("value", [0, -3, "yes"])
def test_a_bad_chunked_loss_option_is_refused(value):
    with pytest.raises(ValueError, match="chunked_loss"):
        chunk_tokens_of(value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="offloading moves saved activations off a CUDA device")
def test_offloaded_activations_leave_the_device_during_the_forward():
    """Bytes kept on the GPU between forward and backward, counted by the allocator: fewer with offloading."""
    from lightning_cp.memory import offload_activations

    device = torch.device("cuda")
    model = tiny_causal_lm("llama").to(device)
    batch = {key: value.to(device) for key, value in lm_batch(seq_len=512).items()}

    def kept_on_device(offload: bool) -> tuple[int, torch.Tensor]:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        if offload:
            with offload_activations(device):
                loss = model(**batch).loss
        else:
            loss = model(**batch).loss
        kept = torch.cuda.memory_allocated(device) - before
        loss.backward()
        model.zero_grad(set_to_none=True)
        return kept, loss.detach()

    kept, loss = kept_on_device(False)
    kept_offloaded, offloaded_loss = kept_on_device(True)
    torch.testing.assert_close(offloaded_loss, loss)
    assert kept_offloaded < kept / 2, (kept_offloaded, kept)


def test_offloading_on_cpu_changes_nothing_and_says_so():
    from lightning_cp import memory

    model = tiny_causal_lm("llama")
    batch = lm_batch(seq_len=32)
    loss, grads = _loss_and_grads(model, batch)
    memory._warned_cpu_offload = False
    with pytest.warns(UserWarning, match="does nothing on CPU"), memory.offload_activations(torch.device("cpu")):
        offloaded_loss, offloaded_grads = _loss_and_grads(model, batch)
    torch.testing.assert_close(offloaded_loss, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(offloaded_grads[name], grad, rtol=0, atol=0)


def _functional_cp_parity(rank: int, world_size: int, tied: bool) -> dict:
    """The functional API at cp=2 with both options vs plain one-process training, the same weights and batch."""
    from torch.distributed.device_mesh import init_device_mesh

    import lightning_cp as lcp

    mesh = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("data_parallel", "context_parallel"))
    cp_mesh = mesh["context_parallel"]
    model = tiny_causal_lm("llama", tie_word_embeddings=tied)
    batch = lm_batch(seq_len=130)  # labels already shifted; a third ignored
    cp_model = copy.deepcopy(model)
    reference = model(**batch, shift_labels=batch["labels"]).loss
    reference.backward()
    lcp.attach_context_parallel_hooks(cp_model)
    lcp.apply_memory_options(cp_model, chunked_loss=16, activation_checkpointing=True)
    train_ctx, local = lcp.make_cp_batch_and_ctx(mesh, batch)
    labels = local.pop("labels")
    with train_ctx():
        count = lcp.count_label_tokens(labels, cp_mesh)
        loss = cp_model(**local, labels=labels, shift_labels=labels, num_items_in_batch=count).loss
        loss.backward()
    grads = summed_gradients(cp_model, cp_mesh.get_group())
    return {
        "loss": lcp.reduce_loss(loss, cp_mesh),
        "reference": reference.detach(),
        "grads": grads,
        "reference_grads": {name: p.grad.clone() for name, p in model.named_parameters()},
    }


@pytest.mark.parametrize("tied", [False, True])
def test_functional_cp2_with_both_options_equals_one_process(tied):
    from distributed_harness import run_on_ranks

    for result in run_on_ranks(_functional_cp_parity, tied):
        torch.testing.assert_close(result["loss"], result["reference"], rtol=1e-5, atol=0)
        for name, grad in result["reference_grads"].items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
