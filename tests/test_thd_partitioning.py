"""THD (packed sequence) partitioning: hand-worked cases and properties, pure index maths."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from lightning_cp.sharding.thd import partitioned_indices, thd_partitioned_indices


def test_two_sequences_cp2_by_hand():
    # sequences of 8 and 4 tokens; cp=2 -> 4 chunks per sequence (2 and 1 tokens long)
    cu = torch.tensor([0, 8, 12])
    assert thd_partitioned_indices(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert thd_partitioned_indices(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]


def test_one_sequence_cp4_by_hand():
    cu = torch.tensor([0, 16])  # 8 chunks of 2 tokens
    expected = {0: [0, 1, 14, 15], 1: [2, 3, 12, 13], 2: [4, 5, 10, 11], 3: [6, 7, 8, 9]}
    for rank, indices in expected.items():
        assert thd_partitioned_indices(cu, 4, rank).tolist() == indices


def test_three_sequences_cp4_by_hand():
    cu = torch.tensor([0, 8, 24, 32])  # lengths 8, 16, 8 -> chunks of 1, 2, 1
    assert thd_partitioned_indices(cu, 4, 1).tolist() == [1, 6, 10, 11, 20, 21, 25, 30]


@pytest.mark.parametrize("cp_size", [2, 4])
def test_every_token_kept_by_exactly_one_rank_in_order_and_balanced(cp_size):
    cu = torch.tensor([0, 8 * cp_size, 10 * cp_size, 16 * cp_size, 24 * cp_size])
    per_rank = [thd_partitioned_indices(cu, cp_size, rank) for rank in range(cp_size)]
    assert sorted(torch.cat(per_rank).tolist()) == list(range(int(cu[-1])))
    for indices in per_rank:
        assert len(indices) == int(cu[-1]) // cp_size
        # within each sequence the kept tokens keep their order
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
            mine = indices[(indices >= start) & (indices < end)]
            assert torch.equal(mine, mine.sort().values)
    # causal work of a token: its position within its own sequence + 1
    starts = torch.repeat_interleave(cu[:-1], cu[1:] - cu[:-1])
    work = [int((idx - starts[idx] + 1).sum()) for idx in per_rank]
    assert len(set(work)) == 1


@pytest.mark.parametrize(
    "cu,total,message",
    [
        (torch.tensor([0, 8, 6]), 6, "must not decrease"),
        (torch.tensor([0, 8, 12]), 16, "ends at 12 but the packed sequence holds 16"),
        (torch.tensor([0, 6, 12]), 12, "multiple of 2 \\* cp = 4"),
        (torch.tensor([1, 8]), 8, "must start at 0"),
        (torch.tensor([[0, 8]]), 8, "must be 1-D"),
    ],
)
def test_inconsistent_packing_is_refused(cu, total, message):
    with pytest.raises(ValueError, match=message):
        partitioned_indices(cu, total, 2, 0)


_HAS_TE_ON_CUDA = torch.cuda.is_available() and importlib.util.find_spec("transformer_engine_torch") is not None


@pytest.mark.skipif(not _HAS_TE_ON_CUDA, reason="needs a CUDA GPU and Transformer Engine (transformer_engine_torch)")
@pytest.mark.parametrize("cp_size", [2, 4])
def test_our_partitioner_matches_transformer_engine_kernel(cp_size):
    import transformer_engine_torch as tex

    cu = torch.tensor([0, 8 * cp_size, 10 * cp_size, 16 * cp_size], dtype=torch.int32, device="cuda")
    for rank in range(cp_size):
        ours = thd_partitioned_indices(cu, cp_size, rank)
        theirs = tex.thd_get_partitioned_indices(cu, int(cu[-1]), cp_size, rank)
        assert ours.tolist() == theirs.long().cpu().tolist()
