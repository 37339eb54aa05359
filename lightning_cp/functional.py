"""The functional CP API, named and shaped like NeMo AutoModel's ``cp_utils`` so its users can switch.

Typical use, once per micro-batch::

    train_ctx, batch = make_cp_batch_and_ctx(device_mesh, batch)
    with train_ctx():
        loss = loss_fn(model(**batch).logits, batch["labels"])
        loss.backward()

It also holds the frozen-target functions (:func:`make_target_cp_ctx`, :func:`gather_cp_seq`): CP for a
forward whose outputs are needed in full (a teacher, a speculative-decoding target), sharded contiguously
(the shards are thrown away after one forward, so balancing buys nothing, and the gather is then a plain
ordered concatenation); unlike NeMo's, nothing process-wide is left changed after the context exits.

This module is the facade only: nothing inside the package imports it.

One difference from NeMo AutoModel's ``cp_utils``, on purpose: the batch is sharded out of place when
``make_cp_batch_and_ctx`` returns, not in place when the context is entered. The returned batch is
what goes into the model, inside or outside the context, and tensors that require grad
(``inputs_embeds``) keep their autograd history.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention import sdpa_kernel

from lightning_cp import attention
from lightning_cp.attention.switch import RING_SDPA_BACKENDS, ring_attention, validate_rotate_method
from lightning_cp.mesh import cp_submesh, mesh_size
from lightning_cp.sharding.batch import default_position_ids, pad_sequence_field, shard_cp_batch
from lightning_cp.sharding.packing import is_packed, plan_packed_batch, shard_packed_batch
from lightning_cp.sharding.sequence import gather_sequence, shard_sequence
from lightning_cp.sharding.te_batch import make_cp_batch_for_te


def get_train_context(
    enable_loss_parallel: bool,
    enable_compiled_autograd: bool,
    cp_context: AbstractContextManager[Any] | None = None,
) -> Callable[[], AbstractContextManager[None]]:
    """Return a factory of the context one training micro-batch runs in (forward and backward).

    It optionally enables tensor-parallel loss parallelism and compiled autograd, and, when a CP
    context is given, restricts SDPA to the kernels the ring supports (never the math kernel, which
    would bypass the ring) and enters ``cp_context``.
    """

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            if enable_loss_parallel:
                from torch.distributed.tensor.parallel import loss_parallel

                stack.enter_context(loss_parallel())
            if enable_compiled_autograd:
                stack.enter_context(attention.compiled_autograd())
            if cp_context is not None:
                stack.enter_context(sdpa_kernel(RING_SDPA_BACKENDS))
                stack.enter_context(cp_context)
            yield

    return context


@contextlib.contextmanager
def create_context_parallel_ctx(
    cp_mesh: DeviceMesh,
    cp_buffers: list[torch.Tensor],
    cp_seq_dims: list[int],
    cp_no_restore_buffers: set[torch.Tensor],
    cp_rotate_method: str | None = None,
) -> Iterator[None]:
    """torch's ``context_parallel`` over ``cp_mesh``, with the ring running on CPU tensors as well.

    Like torch's, it shards ``cp_buffers`` *in place* along ``cp_seq_dims`` on entry and restores all
    but ``cp_no_restore_buffers`` on exit. ``cp_rotate_method`` ("allgather" or "alltoall") applies
    for the context's duration only; the previous process-wide setting comes back on exit.
    """
    from torch.distributed.tensor.experimental import context_parallel

    saved_rotate_method = attention.rotate_method()
    try:
        if cp_rotate_method is not None:
            attention.set_rotate_method(validate_rotate_method(cp_rotate_method))
        with context_parallel(
            cp_mesh, buffers=cp_buffers, buffer_seq_dims=cp_seq_dims, no_restore_buffers=cp_no_restore_buffers
        ):
            yield
    finally:
        attention.set_rotate_method(saved_rotate_method)


def make_cp_batch_and_ctx(
    device_mesh: DeviceMesh | None,
    batch: dict[str, Any],
    loss_mask: torch.Tensor | None = None,
    use_te: bool = False,
    padding_token_id: int = 0,
    num_chunks: int = 1,
    seq_lens_padding_value: int = -1000,
    *,
    load_balance: bool = True,
    rotate_method: str = "allgather",
    enable_loss_parallel: bool = False,
) -> tuple[Callable[[], AbstractContextManager[None]], dict[str, Any]]:
    """Shard ``batch`` for this rank's CP shard and return ``(train_ctx, sharded_batch)``.

    The CP dimension is found by name ("context_parallel" or "cp"). With no mesh, no such dimension,
    or a CP size of 1, this is a no-op: the batch comes back unchanged with a context that does nothing
    CP-related. Otherwise the batch is checked (see :func:`lightning_cp.batch.validate_cp_batch`),
    ``attention_mask`` is dropped, ``position_ids`` are added when missing, every sequence field is
    right-padded to a multiple of ``2 * cp`` (``cp`` without load balancing) and sharded. ``loss_mask``,
    when given, is padded with zeros, sharded and returned as ``sharded_batch["loss_mask"]``.

    ``labels`` are sharded position by position, as given: feed labels already shifted (or
    ``shift_labels``), because a model that shifts labels itself would pair a shard's last token with
    the wrong successor. Enter ``train_ctx()`` around forward *and* backward.

    A packed batch (``cu_seqlens`` / ``seq_lens`` keys, or ``position_ids`` that restart per document)
    is laid out per document and attention is masked per document (:mod:`lightning_cp.sharding.packing`).
    ``use_te=True`` instead returns this rank's THD batch for Transformer Engine attention, which runs
    its own ring, as :func:`lightning_cp.te_batch.make_cp_batch_for_te` describes (``num_chunks`` and
    ``seq_lens_padding_value`` apply there).
    """
    cp_mesh = cp_submesh(device_mesh)
    if use_te:
        te_batch = make_cp_batch_for_te(
            cp_mesh,
            batch,
            padding_token_id=padding_token_id,
            num_chunks=num_chunks,
            seq_lens_padding_value=seq_lens_padding_value,
        )
        return get_train_context(enable_loss_parallel, False), te_batch
    if mesh_size(cp_mesh) <= 1:
        return get_train_context(enable_loss_parallel, False), batch
    if loss_mask is not None:
        batch = {**batch, "loss_mask": loss_mask}
    cp_size, cp_rank = cp_mesh.size(), cp_mesh.get_local_rank()
    layout = None
    if is_packed(batch):
        batch, layout = plan_packed_batch(batch, cp_size, load_balance, require_labels=True)
        sharded = shard_packed_batch(batch, layout, cp_rank, padding_token_id=padding_token_id)
        span = layout.longest_document
    else:
        sharded, span = shard_cp_batch(
            batch, cp_size, cp_rank, load_balance=load_balance, padding_token_id=padding_token_id
        )
    validate_rotate_method(rotate_method)

    def train_ctx() -> AbstractContextManager[None]:
        ring = ring_attention(
            cp_mesh, load_balance=load_balance, rotate_method=rotate_method, global_seq_len=span, documents=layout
        )
        return get_train_context(enable_loss_parallel, False, ring)()

    return train_ctx, sharded


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

    @contextlib.contextmanager
    def cp_ctx() -> Iterator[None]:
        _shard_in_place(ids_buf, cp_mesh)
        _shard_in_place(pos_buf, cp_mesh)
        with ring_attention(cp_mesh, load_balance=False, global_seq_len=orig_len + pad_len):
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
