"""Ring attention over gloo equals full attention, forward and backward: on CPU, and on CUDA when a GPU is present."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_on_ranks
from models import DEVICES
from torch.distributed.device_mesh import init_device_mesh

import lightning_cp  # noqa: F401  (installs the CPU ring)
from lightning_cp.attention.switch import ring_attention
from lightning_cp.functional import create_context_parallel_ctx
from lightning_cp.sharding.sequence import gather_sequence, shard_sequence

CASES = list(itertools.product(("allgather", "alltoall"), (True, False)))
# (query heads, key/value heads): multi-head and grouped-query attention.
HEAD_SHAPES = ((4, 4), (8, 2))


def _inputs(dtype: torch.dtype, heads: int, kv_heads: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(1234)
    # On CUDA every query block of the ring must be a multiple of 32 (`ring_pad_multiple`): 128 = 4 blocks of 32.
    batch, seq, dim = 2, 128 if device == "cuda" else 64, 16
    q = torch.randn(batch, heads, seq, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seq, dim, generator=generator)
    grad_out = torch.randn(batch, heads, seq, dim, generator=generator)
    return tuple(t.to(device, dtype) for t in (q, k, v, grad_out))


def _attention_and_grads(q, k, v, grad_out):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.size(1) != k.size(1))
    out.backward(grad_out)
    return [out.detach(), q.grad, k.grad, v.grad]


def _ring_vs_full(rank: int, world_size: int, dtype: torch.dtype, device: str) -> dict:
    mesh = init_device_mesh(device, (world_size,), mesh_dim_names=("context_parallel",))
    results = {}
    for (rotate_method, load_balance), (heads, kv_heads) in itertools.product(CASES, HEAD_SHAPES):
        inputs = _inputs(dtype, heads, kv_heads, device)
        shards = [shard_sequence(t, 2, world_size, rank, load_balance) for t in inputs]
        with ring_attention(mesh, load_balance=load_balance, rotate_method=rotate_method):
            local = _attention_and_grads(*shards)
        gathered = [gather_sequence(t, mesh, 2, load_balance) for t in local]
        results[(rotate_method, load_balance, heads, kv_heads)] = {
            "ring": gathered,
            "full": _attention_and_grads(*inputs),
            "fp32": _attention_and_grads(*(t.float() for t in inputs)),
        }
    return results


@pytest.fixture(scope="module", params=DEVICES)
def fp32_results(request):
    return run_on_ranks(_ring_vs_full, torch.float32, request.param)[0]


@pytest.fixture(scope="module", params=DEVICES)
def bf16_results(request):
    return run_on_ranks(_ring_vs_full, torch.bfloat16, request.param)[0]


@pytest.mark.parametrize("rotate_method,load_balance", CASES)
@pytest.mark.parametrize("heads,kv_heads", HEAD_SHAPES)
def test_fp32_ring_equals_full_attention(fp32_results, rotate_method, load_balance, heads, kv_heads):
    case = fp32_results[(rotate_method, load_balance, heads, kv_heads)]
    # On CUDA fp32 grouped-query attention runs with K/V heads expanded (the efficient kernel has no GQA).
    tolerance = 1e-5 if case["ring"][0].device.type == "cpu" else 1e-4
    for name, ring, full in zip(("out", "dq", "dk", "dv"), case["ring"], case["full"], strict=True):
        torch.testing.assert_close(ring, full, atol=tolerance, rtol=tolerance, msg=f"{name} differs")


@pytest.mark.parametrize("rotate_method,load_balance", CASES)
@pytest.mark.parametrize("heads,kv_heads", HEAD_SHAPES)
def test_bf16_ring_error_is_no_worse_than_bf16_full_attention(
    bf16_results, rotate_method, load_balance, heads, kv_heads
):
    """bf16 cannot match bit for bit; the ring must be as close to the fp32 truth as bf16 SDPA is."""
    case = bf16_results[(rotate_method, load_balance, heads, kv_heads)]
    for name, ring, full, truth in zip(
        ("out", "dq", "dk", "dv"), case["ring"], case["full"], case["fp32"], strict=True
    ):
        assert ring.dtype == torch.bfloat16
        ring_error = (ring.float() - truth).abs().max().item()
        full_error = (full.float() - truth).abs().max().item()
        scale = truth.abs().max().item()
        assert ring_error <= 2 * full_error + 1e-2 * scale, f"{name}: ring {ring_error}, full {full_error}"


def _torch_context_parallel_in_place(rank: int, world_size: int) -> dict:
    """torch's own in-place ``context_parallel`` API (wrapped by create_context_parallel_ctx) on CPU."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    q, k, v, grad_out = _inputs(torch.float32, 4, 4)
    full = _attention_and_grads(q, k, v, grad_out)
    buffers = [t.clone() for t in (q, k, v, grad_out)]
    with create_context_parallel_ctx(mesh, buffers, [2, 2, 2, 2], set(buffers), cp_rotate_method="alltoall"):
        local = _attention_and_grads(*buffers)
    from torch.distributed.tensor.experimental._attention import _cp_options, context_parallel_unshard

    return {
        "ring": context_parallel_unshard(mesh, local, [2, 2, 2, 2]),
        "full": full,
        "rotate_method_after": _cp_options.rotate_method.name,
    }


def test_torch_context_parallel_runs_on_cpu_and_restores_rotate_method():
    result = run_on_ranks(_torch_context_parallel_in_place)[0]
    for ring, full in zip(result["ring"], result["full"], strict=True):
        torch.testing.assert_close(ring, full, atol=1e-5, rtol=1e-5)
    assert result["rotate_method_after"] == "ALL_GATHER"
