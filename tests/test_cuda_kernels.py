"""CP on a CUDA GPU: every SDPA kernel the ring can run, bf16 models end to end, and the sequence mixers.

Two gloo ranks share the one GPU these tests need (gloo carries CUDA tensors; NCCL refuses two ranks on one
device). Each kernel is forced with ``sdpa_kernel``, so a kernel that cannot run a ring block fails here instead
of another being picked silently. Without a GPU every test is skipped, and says so.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from distributed_harness import run_on_ranks
from mixer_zoo import MIXER_NAMES
from models import lm_batch, tiny_causal_lm
from test_hf_parity import _cp_run, _reference
from test_mixers import RTOL_GRAD, RTOL_LOSS, _case
from test_ring_attention import CASES, HEAD_SHAPES, _attention_and_grads, _inputs
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_cp.attention.switch import ring_attention
from lightning_cp.sharding.sequence import gather_sequence, shard_sequence

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible)")

#: (kernel, dtype) pairs the ring runs on CUDA: flash and cuDNN take fp16/bf16 only; efficient takes fp32 too.
KERNELS = [
    ("FLASH_ATTENTION", "bfloat16"),
    ("FLASH_ATTENTION", "float16"),
    ("EFFICIENT_ATTENTION", "float32"),
    ("EFFICIENT_ATTENTION", "bfloat16"),
    ("CUDNN_ATTENTION", "bfloat16"),
]


def _ring_with_kernel(rank: int, world_size: int, kernel: str, dtype_name: str, device: str = "cuda") -> dict:
    """Ring vs full attention with one SDPA kernel forced, for every rotation, load balance and head shape."""
    backend, dtype = getattr(SDPBackend, kernel), getattr(torch, dtype_name)
    mesh = init_device_mesh(device, (world_size,), mesh_dim_names=("context_parallel",))
    results = {}
    for (rotate_method, load_balance), (heads, kv_heads) in itertools.product(CASES, HEAD_SHAPES):
        key = (rotate_method, load_balance, heads, kv_heads)
        inputs = _inputs(dtype, heads, kv_heads, device)
        with sdpa_kernel([backend]):
            try:
                full = _attention_and_grads(*inputs)
            except RuntimeError as error:  # the kernel cannot take these shapes even without CP
                results[key] = {"unsupported": str(error).splitlines()[0]}
                continue
            shards = [shard_sequence(t, 2, world_size, rank, load_balance) for t in inputs]
            try:
                with ring_attention(mesh, load_balance=load_balance, rotate_method=rotate_method):
                    local = _attention_and_grads(*shards)
            except RuntimeError as error:
                results[key] = {"error": str(error).splitlines()[0]}
                continue
        with sdpa_kernel([SDPBackend.MATH]):
            truth = _attention_and_grads(*(t.double() for t in inputs))
        results[key] = {
            "ring": [t.cpu() for t in (gather_sequence(t, mesh, 2, load_balance) for t in local)],
            "full": [t.cpu() for t in full],
            "truth": [t.cpu() for t in truth],
        }
    return results


@pytest.mark.parametrize("kernel,dtype", KERNELS, ids=["-".join(k) for k in KERNELS])
def test_every_cuda_ring_kernel_equals_full_attention(kernel: str, dtype: str) -> None:
    """The ring's error against the fp64 truth is no worse than the same kernel's without CP (fp32: equal)."""
    results = run_on_ranks(_ring_with_kernel, kernel, dtype)[0]
    # a shape the kernel refuses without CP (GQA on the efficient kernel, say) is no case for the ring
    assert any("unsupported" not in case for case in results.values()), results
    for key, case in results.items():
        if "unsupported" in case:
            continue
        assert "error" not in case, f"{kernel} {dtype} {key}: {case.get('error')}"
        for name, ring, full, truth in zip(
            ("out", "dq", "dk", "dv"), case["ring"], case["full"], case["truth"], strict=True
        ):
            assert ring.dtype == getattr(torch, dtype)
            if dtype == "float32":
                torch.testing.assert_close(ring, full, atol=1e-4, rtol=1e-4, msg=f"{key} {name}")
                continue
            ring_error = (ring.double() - truth).abs().max().item()
            full_error = (full.double() - truth).abs().max().item()
            assert ring_error <= 2 * full_error + 1e-2 * truth.abs().max().item(), (key, name, ring_error, full_error)


def _bf16_model_run(rank: int, world_size: int, how: str, cp_mode: str, device: str = "cuda") -> dict:
    """A tiny Llama in bf16 on CUDA (weights in bf16, or fp32 weights under bf16 autocast as Lightning's
    ``bf16-mixed`` runs them): CP's loss and gradients, the plain run's in the same precision, and fp32 truth."""
    mesh = init_device_mesh(device, (1, world_size), mesh_dim_names=("data_parallel", "context_parallel"))
    truth_model = tiny_causal_lm("llama").to(device)
    batch = {key: value.to(device) for key, value in lm_batch(seq_len=256, ignored_share=0.25).items()}
    plain_model, cp_model = copy.deepcopy(truth_model), copy.deepcopy(truth_model)
    truth_loss, truth_grads = _reference(truth_model, batch)
    if how == "bf16_weights":
        plain_model, cp_model = plain_model.bfloat16(), cp_model.bfloat16()
    with torch.autocast(device, torch.bfloat16, enabled=how == "autocast"):
        plain_loss, plain_grads = _reference(plain_model, batch)
        cp_loss, cp_grads, _ = _cp_run(cp_model, mesh, batch, "logits", cp_mode)
    return {
        "loss": [float(x) for x in (cp_loss, plain_loss, truth_loss)],
        "grads": {
            name: [float((grads[name].double() - truth).abs().max()) for grads in (cp_grads, plain_grads)]
            + [float(truth.abs().max())]
            for name, truth in truth_grads.items()
        },
    }


@pytest.mark.parametrize("how", ["bf16_weights", "autocast"])
@pytest.mark.parametrize("cp_mode", ["ring", "ulysses"])
def test_bf16_training_on_cuda_is_as_close_to_fp32_as_without_cp(how: str, cp_mode: str) -> None:
    for result in run_on_ranks(_bf16_model_run, how, cp_mode):
        cp_loss, plain_loss, truth_loss = result["loss"]
        assert abs(cp_loss - truth_loss) <= 2 * abs(plain_loss - truth_loss) + 1e-2 * abs(truth_loss)
        for name, (cp_error, plain_error, scale) in result["grads"].items():
            assert cp_error <= 2 * plain_error + 2e-2 * scale, (name, cp_error, plain_error, scale)


def _mixers_on(rank: int, world_size: int, device: str) -> dict:
    return {family: _case(rank, world_size, family, "auto", 64, False, "none", device) for family in MIXER_NAMES}


def test_every_mixer_family_is_exact_on_cuda() -> None:
    """transformers' torch fallbacks on CUDA (no fla / mamba_ssm kernels): fp32 parity as on CPU."""
    for results in run_on_ranks(_mixers_on, "cuda", timeout=600):
        for family, result in results.items():
            assert "refused" not in result, (family, result["refused"])
            assert result["loss"] <= RTOL_LOSS and result["grad"] <= RTOL_GRAD, (family, result)
            assert not result["missing"], family
