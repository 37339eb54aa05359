"""CP for a frozen forward whose outputs are needed in full (a teacher, a speculative-decoding target).

The sequence is sharded contiguously (no load balancing): the shards are thrown away after one
forward, so balancing buys nothing, and the gather is then a plain ordered concatenation. Unlike the
seed, nothing process-wide is left changed after the context exits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.batch import default_position_ids, pad_sequence_field
from lightning_cp.dispatch import ring_attention
from lightning_cp.functional import get_train_context
from lightning_cp.sharding import gather_sequence, shard_sequence


def _shard_in_place(buffer: torch.Tensor, cp_mesh: DeviceMesh) -> None:
    shard = shard_sequence(buffer, 1, cp_mesh.size(), cp_mesh.get_local_rank(), load_balance=False)
    buffer.resize_(shard.shape)
    buffer.copy_(shard)


def make_target_cp_ctx(
    cp_mesh: DeviceMesh, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[AbstractContextManager[None], torch.Tensor, torch.Tensor, int]:
    """Prepare a frozen model's forward under CP: ``(cp_ctx, input_ids_buf, position_ids_buf, orig_len)``.

    The buffers are fresh copies right-padded to a multiple of the CP size (``position_ids``, an
    arange when omitted, are expanded to the batch). Entering ``cp_ctx`` shards them in place to this
    rank's contiguous chunk and switches ring attention on; run the model on the buffers inside it and
    bring outputs back with :func:`gather_cp_seq` and ``orig_len``.
    """
    orig_len = input_ids.size(1)
    cp_size = cp_mesh.size()
    pad_len = -orig_len % cp_size
    if position_ids is None:
        position_ids = default_position_ids(orig_len, input_ids.device)
    ids_buf = pad_sequence_field("input_ids", input_ids, pad_len).clone()
    pos_buf = pad_sequence_field("position_ids", position_ids, pad_len).expand(input_ids.size(0), -1).clone()

    @contextmanager
    def cp_ctx() -> Iterator[None]:
        _shard_in_place(ids_buf, cp_mesh)
        _shard_in_place(pos_buf, cp_mesh)
        ring = ring_attention(cp_mesh, load_balance=False, global_seq_len=orig_len + pad_len)
        with get_train_context(False, False, ring)():
            yield

    return cp_ctx(), ids_buf, pos_buf, orig_len


def gather_cp_seq(
    cp_mesh: DeviceMesh,
    tensors: list[torch.Tensor],
    seq_dim: int,
    orig_len: int,
    *,
    load_balance: bool = False,
) -> list[torch.Tensor]:
    """Gather CP-sharded ``tensors`` back to full sequences of length ``orig_len`` along ``seq_dim``.

    The inverse of :func:`make_target_cp_ctx`'s sharding (contiguous chunks); pass
    ``load_balance=True`` for outputs of a batch sharded by :func:`make_cp_batch_and_ctx`. The gather
    is differentiable, so it also serves losses that need the whole sequence.
    """
    return [gather_sequence(t, cp_mesh, seq_dim, load_balance).narrow(seq_dim, 0, orig_len) for t in tensors]
