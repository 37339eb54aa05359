"""Per-rank partitioning of packed (THD) sequences, as Transformer Engine's CP expects it.

A packed batch is one row of tokens holding several sequences, delimited by ``cu_seqlens_padded``
(cumulative lengths, each sequence padded to a multiple of ``2 * cp``). Every sequence is laid out
head/tail on its own, in sequence order (Note [head/tail layout] in :mod:`lightning_cp.sharding.sequence`).
This is what TE's ``thd_get_partitioned_indices`` computes on the GPU; the pure-torch version here
runs anywhere and is what the tests pin down, and :func:`partitioned_indices` uses TE's kernel when
TE and CUDA are there.
"""

from __future__ import annotations

import torch


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, multiple: int) -> None:
    """Raise ``ValueError`` unless ``cu_seqlens`` delimits ``total_tokens`` tokens in sequences of ``multiple``."""
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"`cu_seqlens` must be 1-D with at least two entries, got shape {tuple(cu_seqlens.shape)}.")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"`cu_seqlens` must start at 0, got {int(cu_seqlens[0])}.")
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    if (lengths < 0).any():
        raise ValueError(f"`cu_seqlens` must not decrease, got {cu_seqlens.tolist()}.")
    if int(cu_seqlens[-1]) != total_tokens:
        raise ValueError(
            f"`cu_seqlens` ends at {int(cu_seqlens[-1])} but the packed sequence holds {total_tokens} tokens."
        )
    if (lengths % multiple).any():
        raise ValueError(
            f"Every packed sequence must be padded to a multiple of 2 * cp = {multiple}; lengths {lengths.tolist()}."
        )


def thd_partitioned_indices(cu_seqlens_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices of the packed tokens that ``cp_rank`` keeps, in the order it stores them (pure torch)."""
    cu = cu_seqlens_padded.to("cpu", torch.long)
    validate_cu_seqlens(cu, int(cu[-1]), 2 * cp_size)
    pieces = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        chunk = (end - start) // (2 * cp_size)
        for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + index * chunk, start + (index + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)


def partitioned_indices(cu_seqlens_padded: torch.Tensor, total_tokens: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This rank's token indices: TE's CUDA kernel when TE is importable and the input is on CUDA, else ours."""
    validate_cu_seqlens(cu_seqlens_padded.cpu(), total_tokens, 2 * cp_size)
    if cu_seqlens_padded.is_cuda:
        try:
            import transformer_engine_torch as tex
        except ImportError:
            tex = None
        if tex is not None:
            return tex.thd_get_partitioned_indices(cu_seqlens_padded.int(), total_tokens, cp_size, cp_rank).long()
    return thd_partitioned_indices(cu_seqlens_padded, cp_size, cp_rank).to(cu_seqlens_padded.device)
