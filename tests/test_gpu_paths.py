"""The CUDA and Transformer Engine paths, checked on CPU where their logic allows it.

- fp32 grouped-query attention on CUDA: K/V heads are expanded for the ring's kernels (decision and expansion);
- the padding rule for torch's efficient kernel on CUDA (query blocks of 32);
- the Transformer Engine route, with a stand-in TE module (TE is not installable here) on 2 gloo ranks:
  the CP group reaches every TE attention module at setup, and every batch reaches the model as THD.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from distributed_harness import run_on_ranks
from models import lm_batch
from torch import nn

from lightning_cp.attention.switch import active_context_parallel, expand_kv_heads, needs_expanded_kv
from lightning_cp.attention.transformer_engine import te_context_parallel_modules, uses_transformer_engine_attention
from lightning_cp.mesh import ParallelLayout, build_device_mesh
from lightning_cp.session import ContextParallelSession
from lightning_cp.sharding.sequence import EFFICIENT_LSE_BLOCK, ring_pad_multiple, shard_multiple

# ----------------------------------------------------------------------------------- fp32 + GQA on CUDA


@pytest.mark.parametrize(
    "device_type,dtype,query_heads,kv_heads,enable_gqa,expected",
    [
        ("cuda", torch.float32, 8, 2, True, True),  # efficient kernel: no GQA
        ("cuda", torch.float64, 8, 2, True, True),
        ("cuda", torch.bfloat16, 8, 2, True, False),  # flash / cuDNN take GQA
        ("cuda", torch.float16, 8, 2, True, False),
        ("cuda", torch.float32, 8, 8, True, False),  # nothing to expand
        ("cuda", torch.float32, 8, 2, False, False),  # not GQA: SDPA would refuse the shapes itself
        ("cpu", torch.float32, 8, 2, True, False),  # CPU's flash kernel takes GQA in every dtype
    ],
)
def test_kv_heads_are_expanded_only_where_no_ring_kernel_takes_gqa(
    device_type, dtype, query_heads, kv_heads, enable_gqa, expected
):
    assert needs_expanded_kv(device_type, dtype, query_heads, kv_heads, enable_gqa) is expected


def test_expanded_kv_heads_give_what_enable_gqa_gives():
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 8, 16, 4, generator=generator)
    key, value = (torch.randn(2, 2, 16, 4, generator=generator) for _ in range(2))
    expanded_key, expanded_value = expand_kv_heads(query, key, value)
    assert expanded_key.shape == expanded_value.shape == (2, 8, 16, 4)
    grouped = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    plain = F.scaled_dot_product_attention(query, expanded_key, expanded_value, is_causal=True)
    torch.testing.assert_close(plain, grouped, atol=0, rtol=0)


def test_uneven_head_groups_are_refused_with_the_numbers():
    with pytest.raises(ValueError, match=r"query heads \(6\) to be a multiple of the key/value heads \(4\)"):
        expand_kv_heads(torch.zeros(1, 6, 4, 2), torch.zeros(1, 4, 4, 2), torch.zeros(1, 4, 4, 2))


# ----------------------------------------------------------------------------------- the efficient kernel's padding


@pytest.mark.parametrize("cp_size", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("load_balance", [True, False])
def test_on_cuda_every_query_block_of_the_ring_is_a_multiple_of_32(cp_size, load_balance):
    multiple = ring_pad_multiple(cp_size, load_balance, "cuda")
    # a query block is half a shard with load balancing (the ring's tail blocks), the whole shard without
    block = multiple // (2 * cp_size) if load_balance else multiple // cp_size
    assert block % EFFICIENT_LSE_BLOCK == 0
    assert multiple % shard_multiple(cp_size, load_balance) == 0


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("load_balance", [True, False])
def test_off_cuda_the_padding_stays_the_layout_multiple(cp_size, load_balance):
    assert ring_pad_multiple(cp_size, load_balance, torch.device("cpu")) == shard_multiple(cp_size, load_balance)


# ----------------------------------------------------------------------------------- Transformer Engine, stand-in


class DotProductAttention(nn.Module):
    """Stand-in for TE's ``DotProductAttention``: records its CP group calls; its "attention" returns the query."""

    def __init__(self) -> None:
        super().__init__()
        self.cp_calls: list[tuple] = []

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p") -> None:
        self.cp_calls.append((cp_group, list(cp_global_ranks), cp_stream, cp_comm_type))

    def forward(self, query, key, value, cu_seqlens_q=None, max_seqlen_q=None) -> torch.Tensor:
        return query


class MultiheadAttention(nn.Module):
    """Stand-in for TE's ``MultiheadAttention``: hands the CP group on to the modules inside, as TE's does."""

    def __init__(self) -> None:
        super().__init__()
        self.core_attention = DotProductAttention()

    def set_context_parallel_group(self, cp_group, cp_global_ranks, cp_stream, cp_comm_type="p2p") -> None:
        for index, child in enumerate(self.modules()):
            if index and hasattr(child, "set_context_parallel_group"):
                child.set_context_parallel_group(cp_group, cp_global_ranks, cp_stream, cp_comm_type)


for _stand_in in (DotProductAttention, MultiheadAttention):
    _stand_in.__module__ = "transformer_engine.pytorch.attention"


class _Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attention = MultiheadAttention()  # TE's name; no `self_attn`, no `is_causal`


class TEModel(nn.Module):
    """A model whose attention is TE's: it records every batch it gets and whether torch's ring was on."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 8)
        self.layers = nn.ModuleList([_Layer(), _Layer()])
        self.seen: list[dict] = []

    def forward(self, input_ids, labels, position_ids, cu_seqlens, max_seqlen, **thd) -> torch.Tensor:
        self.seen.append(
            {
                "input_ids": input_ids,
                "cu_seqlens": cu_seqlens,
                "max_seqlen": max_seqlen,
                "keys": sorted(["input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen", *thd]),
                "sdpa_ring_on": active_context_parallel() is not None,
            }
        )
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer.self_attention.core_attention(hidden, hidden, hidden, cu_seqlens, max_seqlen)
        return hidden.sum()


def test_the_outermost_te_modules_take_the_group_and_te_is_recognised_by_its_package():
    model = TEModel()
    assert uses_transformer_engine_attention(model)
    assert list(te_context_parallel_modules(model)) == ["layers.0.self_attention", "layers.1.self_attention"]
    assert not uses_transformer_engine_attention(nn.Sequential(nn.Linear(2, 2)))


def _te_route(rank: int, world_size: int) -> dict:
    mesh, data_context_mesh = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
    session = ContextParallelSession(mesh, data_context_mesh)
    model = TEModel()
    names = session.prepare_model(model)
    session.prepare_model(model)  # Lightning prepares again at validation: the group is set once
    plain = lm_batch(batch_size=2, seq_len=30, ignored_share=0.0)
    packed = {**lm_batch(batch_size=1, seq_len=24, ignored_share=0.0), "seq_lens": torch.tensor([[10, 14]])}
    plain_ids = plain["input_ids"]  # the session replaces the batch's contents with this rank's THD batch
    for batch in (plain, packed):
        with session.step(batch):
            model(**batch).backward()
    cp_group = mesh["context_parallel"].get_group()
    calls = [
        [(group is cp_group, ranks, stream, comm) for group, ranks, stream, comm in module.cp_calls]
        for module in model.modules()
        if isinstance(module, DotProductAttention)
    ]
    refused = ""
    try:
        ContextParallelSession(mesh, data_context_mesh, transformer_engine=True).prepare_model(nn.Linear(2, 2))
    except ValueError as error:
        refused = str(error)
    return {
        "names": names,
        "transformer_engine": session.transformer_engine,
        "calls": calls,
        "seen": model.seen,
        "plain_ids": plain_ids,
        "refused": refused,
    }


@pytest.fixture(scope="module")
def te_results():
    return run_on_ranks(_te_route)


def test_te_models_are_recognised_before_any_self_attention_check(te_results):
    for result in te_results:
        assert result["transformer_engine"] is True
        assert result["names"] == ["layers.0.self_attention", "layers.1.self_attention"]


def test_every_te_attention_module_gets_the_cp_group_once_at_setup(te_results):
    for result in te_results:
        # the CP group itself, its global ranks, no CUDA stream on CPU, TE's default ring communication
        assert result["calls"] == [[(True, [0, 1], None, "p2p")]] * 2


def test_every_batch_of_a_te_model_reaches_it_as_thd_with_nemo_cu_seqlens(te_results):
    for rank, result in enumerate(te_results):
        plain, packed = result["seen"]
        for seen in (plain, packed):
            assert not seen["sdpa_ring_on"], "TE runs its own ring: torch's SDPA ring must stay off"
            assert isinstance(seen["max_seqlen"], int)
            assert seen["input_ids"].ndim == 1
            assert "cu_seqlens_padded" in seen["keys"] and "padding_mask" in seen["keys"]
        # plain rows are one document each: 30 tokens padded to 32, 8-token chunks, rank r keeps r and 3 - r
        assert plain["cu_seqlens"].tolist() == [0, 32, 64] and plain["max_seqlen"] == 32
        rows = torch.cat([result["plain_ids"], torch.zeros(2, 2, dtype=torch.long)], dim=1)
        chunks = (rank, 3 - rank)
        expected = torch.cat([rows[row, 8 * chunk : 8 * chunk + 8] for row in range(2) for chunk in chunks])
        assert torch.equal(plain["input_ids"], expected)
        # packed: documents of 10 and 14 tokens padded to 12 and 16 (multiples of 2 * cp)
        assert packed["cu_seqlens"].tolist() == [0, 12, 28] and packed["max_seqlen"] == 16
        assert packed["input_ids"].numel() == 14


def test_te_requested_without_te_modules_is_refused(te_results):
    message = "Found no Transformer Engine module with `set_context_parallel_group` in `Linear`"
    assert message in te_results[0]["refused"]
