"""The functional CP API, named and shaped like NeMo AutoModel's ``cp_utils`` so its users can switch.

Typical use, once per micro-batch::

    train_ctx, batch = make_cp_batch_and_ctx(device_mesh, batch)
    with train_ctx():
        loss = loss_fn(model(**batch).logits, batch["labels"])
        loss.backward()

One difference from the seed, on purpose: the batch is sharded out of place when
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
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_cp.batch import shard_cp_batch
from lightning_cp.cpu_ring import _cp_attention_module
from lightning_cp.dispatch import ring_attention, validate_rotate_method
from lightning_cp.mesh import cp_submesh, mesh_size
from lightning_cp.packing import is_packed, plan_packed_batch, shard_packed_batch
from lightning_cp.te_batch import make_cp_batch_for_te

#: SDPA kernels that torch's ring can run (CPU's flash kernel counts as FLASH_ATTENTION).
RING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


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
                stack.enter_context(torch._dynamo.utils.maybe_enable_compiled_autograd(True))
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

    options = _cp_attention_module()._cp_options
    saved_rotate_method = options.rotate_method
    try:
        if cp_rotate_method is not None:
            _cp_attention_module().set_rotate_method(validate_rotate_method(cp_rotate_method))
        with context_parallel(
            cp_mesh, buffers=cp_buffers, buffer_seq_dims=cp_seq_dims, no_restore_buffers=cp_no_restore_buffers
        ):
            yield
    finally:
        options.rotate_method = saved_rotate_method


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
    is laid out per document and attention is masked per document (:mod:`lightning_cp.packing`).
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
