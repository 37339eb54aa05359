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

What still differs from NeMo AutoModel's ``cp_utils``, and why, is listed in the README ("Differences from
NeMo AutoModel's cp_utils"); the main one: the batch is sharded out of place when ``make_cp_batch_and_ctx``
returns, not in place when the context is entered, so tensors that require grad (``inputs_embeds``) keep
their autograd history.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp import attention
from lightning_cp.attention.switch import (
    ActiveContextParallel,
    ring_attention,
    rotation_for,
    switched_on,
    validate_rotate_method,
)
from lightning_cp.consistency import check_same_replicas
from lightning_cp.cp_mode import Mechanism, attention_traits, choose_mechanism, validate_cp_mode
from lightning_cp.hooks import hooked_attention_modules, hooked_model_count, hooked_models
from lightning_cp.mesh import (
    TENSOR_PARALLEL,
    ContextParallelGroups,
    cp_submesh,
    find_submesh,
    mesh_size,
    split_context_parallel,
)
from lightning_cp.mixers.exchange import batch_exchange
from lightning_cp.mixers.heads import route_loaded_mixer_functions
from lightning_cp.mixers.hooks import plan_hooked_mixers, with_mixers
from lightning_cp.mixers.mode import validate_mixer_mode
from lightning_cp.session import attention_context
from lightning_cp.sharding.batch import (
    default_position_ids,
    pad_sequence_field,
    padded_length,
    require_one_input,
    shard_cp_batch,
)
from lightning_cp.sharding.packing import is_packed, plan_packed_batch, shard_packed_batch
from lightning_cp.sharding.sequence import gather_sequence, ring_pad_multiple, shard_sequence
from lightning_cp.sharding.te_batch import make_cp_batch_for_te


def get_train_context(
    enable_loss_parallel: bool,
    enable_compiled_autograd: bool,
    cp_context: AbstractContextManager[Any] | None = None,
) -> Callable[[], AbstractContextManager[None]]:
    """Return a factory of the context one training micro-batch runs in (forward and backward).

    It optionally enables tensor-parallel loss parallelism and compiled autograd, and enters ``cp_context``
    when one is given. Unlike NeMo's, it does not restrict SDPA's kernels itself: the CP context does that
    under a ring (never the math kernel, which would bypass it), and leaves them free under Ulysses, whose
    whole-sequence attention may need the math kernel (fp32 grouped-query attention on CUDA has no other).
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
    for the context's duration only; the previous process-wide setting comes back on exit. While it is
    open, models given :func:`~lightning_cp.hooks.attach_context_parallel_hooks` drop their attention
    masks and run causal, exactly as inside :func:`make_cp_batch_and_ctx`'s context (the first buffer's
    length counts as the sequence length for the sliding-window check).
    """
    from torch.distributed.tensor.experimental import context_parallel

    _check_hooked_replicas(cp_mesh)
    saved_rotate_method = attention.rotate_method()
    try:
        attention.set_rotate_method(rotation_for(cp_mesh, cp_rotate_method or saved_rotate_method))
        torch_cp = context_parallel(
            cp_mesh, buffers=cp_buffers, buffer_seq_dims=cp_seq_dims, no_restore_buffers=cp_no_restore_buffers
        )
        seq_len = cp_buffers[0].size(cp_seq_dims[0]) if cp_buffers else None
        route_loaded_mixer_functions()  # an unhooked mixer stops instead of mixing one shard
        state = ActiveContextParallel(attention.load_balance_enabled(), seq_len, ring_group=cp_mesh.get_group())
        with switched_on(torch_cp, state, cp_mesh):
            yield
    finally:
        attention.set_rotate_method(saved_rotate_method)


#: For each CP group (by its process group's id): how many hooked models (in hooking order) were compared over it.
_REPLICAS_CHECKED: dict[int, int] = {}


def _check_hooked_replicas(cp_mesh: DeviceMesh) -> None:
    """Compare the replicated parameters of the models hooked since the last check over ``cp_mesh``, once each.

    Every rank of the CP group calls it at the same CP step (the functional API's entry points) and hooks the
    same models, so the decision to check rests on counts that are equal on every rank (never on which models
    the garbage collector has freed yet), every rank enters the one collective of
    :func:`~lightning_cp.consistency.check_same_replicas` alike, and all of them raise together for replicas that
    differ (a model built without a seed). A model is compared at its first CP step only: later steps cost nothing.
    """
    count = hooked_model_count()
    key = id(cp_mesh.get_group())
    done = _REPLICAS_CHECKED.get(key, 0)
    if done >= count:
        return
    check_same_replicas([(order, model) for order, model in hooked_models() if order >= done], cp_mesh)
    _REPLICAS_CHECKED[key] = count


#: NeMo AutoModel's batch key for a model's own batch-sharding callable (a model that owns its CP attention).
MAKE_BATCH_FN_KEY = "_cp_make_batch_fn"
#: Names accepted for the tensor-parallel mesh dimension, passed to that callable (ours, then NeMo's).
TP_DIM_NAMES: tuple[str, ...] = (TENSOR_PARALLEL, "tp")


def _no_cp_context(enable_loss_parallel: bool) -> Callable[[], AbstractContextManager[Any]]:
    """The context factory when lightning_cp runs no ring: ``contextlib.nullcontext``, which NeMo's callers expect.

    Only loss parallelism (tensor parallel) still needs a context of its own.
    """
    return get_train_context(True, False) if enable_loss_parallel else contextlib.nullcontext


def _split_make_batch_fn(batch: dict[str, Any]) -> tuple[Callable[..., Any] | None, dict[str, Any]]:
    """The model's own sharding callable (NeMo's ``_cp_make_batch_fn`` key) and the batch without that key.

    The key never stays in the batch, where ``model(**batch)`` would receive it; the caller's dict is
    left as it was (a batch without the key comes back as the same object).
    """
    if MAKE_BATCH_FN_KEY not in batch:
        return None, batch
    return batch[MAKE_BATCH_FN_KEY], {key: value for key, value in batch.items() if key != MAKE_BATCH_FN_KEY}


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
    cp_mode: str = "auto",
    ulysses_size: int | None = None,
    mixer_mode: str = "auto",
) -> tuple[Callable[[], AbstractContextManager[None]], dict[str, Any]]:
    """Shard ``batch`` for this rank's CP shard and return ``(train_ctx, sharded_batch)``.

    The CP dimension is found by name ("context_parallel" or "cp"). With no mesh, no such dimension,
    or a CP size of 1, this is a no-op: the batch itself comes back with ``contextlib.nullcontext``.
    Otherwise the batch is checked (see :func:`lightning_cp.sharding.batch.validate_cp_batch`),
    ``attention_mask`` is dropped, ``position_ids`` are added when missing (``[batch, seq]``, as given
    ``[1, seq]`` ones are expanded), every sequence field is right-padded to a multiple of ``2 * cp``
    (``cp`` without load balancing; two positions per rank at least) and sharded. ``loss_mask``,
    when given, is padded with zeros, sharded and returned as ``sharded_batch["loss_mask"]``.

    ``labels`` are sharded position by position, as given: feed labels already shifted (or
    ``shift_labels``), because a model that shifts labels itself would pair a shard's last token with
    the wrong successor. Enter ``train_ctx()`` around forward *and* backward.

    A packed batch (``cu_seqlens`` / ``seq_lens`` keys, or ``position_ids`` that restart per document)
    is laid out per document and attention is masked per document (:mod:`lightning_cp.sharding.packing`).
    ``use_te=True`` instead returns this rank's THD batch for Transformer Engine attention, which runs
    its own ring, as :func:`lightning_cp.sharding.te_batch.make_cp_batch_for_te` describes (``num_chunks`` and
    ``seq_lens_padding_value`` apply there). Without CP, and with ``use_te``, the context factory is
    ``contextlib.nullcontext`` as well (unless ``enable_loss_parallel``).

    A batch carrying a callable under ``"_cp_make_batch_fn"`` (NeMo's hook for a model that shards its
    own batch) is handed to it instead, as NeMo does: ``fn(cp_mesh, tp_mesh, batch_without_the_key,
    loss_mask=..., padding_token_id=...)`` (submeshes ``None`` where absent), its result returned as it is.

    ``cp_mode`` picks the mechanism (:mod:`lightning_cp.cp_mode`): ``"auto"`` decides from the attention
    modules hooked in this process (:func:`~lightning_cp.hooks.attach_context_parallel_hooks`), the ring
    when none are; ``ulysses_size`` sets the Ulysses group of ``"hybrid"``. The batch layout is the same
    for every mechanism. ``mixer_mode`` picks the mechanism of the hooked sequence mixers that are not
    attention (:mod:`lightning_cp.mixers.mode`; ``"auto"`` decides per layer).
    """
    cp_mesh = cp_submesh(device_mesh)
    make_batch_fn, batch = _split_make_batch_fn(batch)
    if make_batch_fn is not None:
        tp_mesh = find_submesh(device_mesh, TP_DIM_NAMES)
        return make_batch_fn(cp_mesh, tp_mesh, batch, loss_mask=loss_mask, padding_token_id=padding_token_id)
    validate_cp_mode(cp_mode, ulysses_size)
    validate_mixer_mode(mixer_mode)
    no_cp_ctx = _no_cp_context(enable_loss_parallel)
    if use_te:
        te_batch = make_cp_batch_for_te(
            cp_mesh,
            batch,
            padding_token_id=padding_token_id,
            num_chunks=num_chunks,
            seq_lens_padding_value=seq_lens_padding_value,
        )
        return no_cp_ctx, te_batch
    if mesh_size(cp_mesh) <= 1:
        return no_cp_ctx, batch
    validate_rotate_method(rotate_method)
    if loss_mask is not None:
        batch = {**batch, "loss_mask": loss_mask}
    cp_size, cp_rank = cp_mesh.size(), cp_mesh.get_local_rank()
    tp_size = mesh_size(find_submesh(device_mesh, TP_DIM_NAMES))
    seq_len = batch[require_one_input(batch)].size(1)  # refused on every rank before anything else is read
    mechanism = _hooked_models_mechanism(cp_size, tp_size, cp_mode, ulysses_size)
    mixer_plan = plan_hooked_mixers(cp_size, mixer_mode)
    layout = None
    if is_packed(batch):
        batch, layout = plan_packed_batch(batch, cp_size, load_balance, require_labels=True, whole_documents=True)
        sharded = shard_packed_batch(batch, layout, cp_rank, padding_token_id=padding_token_id)
        padded_len, span = layout.padded_len, layout.longest_document
    else:
        sharded, padded_len = shard_cp_batch(
            batch, cp_size, cp_rank, load_balance=load_balance, padding_token_id=padding_token_id
        )
        span = padded_len
    _check_hooked_replicas(cp_mesh)  # the first collective: every refusal above was raised on every rank alike
    groups = None if mechanism.name == "ring" else _groups(cp_mesh, mechanism.ulysses_size)

    def train_ctx() -> AbstractContextManager[None]:
        route_loaded_mixer_functions()  # an unhooked mixer stops instead of mixing one shard
        attend = attention_context(
            mechanism.name,
            cp_mesh,
            groups,
            seq_len=seq_len,
            padded_len=padded_len,
            layout=layout,
            load_balance=load_balance,
            rotate_method=rotate_method,
            global_seq_len=span,
        )
        if mixer_plan.mechanisms:
            exchange = batch_exchange(
                cp_mesh.get_group(),
                cp_size,
                cp_rank,
                seq_len=seq_len,
                padded_len=padded_len,
                load_balance=load_balance,
                layout=layout,
            )
            attend = with_mixers(attend, exchange)
        return get_train_context(enable_loss_parallel, False, attend)()

    return train_ctx, sharded


def _hooked_models_mechanism(cp_size: int, tp_size: int, cp_mode: str, ulysses_size: int | None) -> Mechanism:
    """The mechanism for the attention modules hooked in this process; the ring for ``"auto"`` without any."""
    modules = hooked_attention_modules()
    if not modules and cp_mode == "auto":
        return Mechanism("ring", 1, "auto: no hooked attention modules (the ring runs plain SDPA calls)")
    traits = [attention_traits(name, module, tp_size) for name, module in modules.items()]
    return choose_mechanism(traits, cp_size, cp_mode, ulysses_size)


#: The Ulysses / ring process groups, made once per CP group and Ulysses size (making groups takes collectives).
_GROUPS: dict[tuple[int, int], ContextParallelGroups] = {}


def _groups(cp_mesh: DeviceMesh, ulysses_size: int) -> ContextParallelGroups:
    key = (id(cp_mesh.get_group()), ulysses_size)
    if key not in _GROUPS:
        _GROUPS[key] = split_context_parallel(cp_mesh, ulysses_size)
    return _GROUPS[key]


def _shard_in_place(buffer: torch.Tensor, cp_mesh: DeviceMesh) -> None:
    shard = shard_sequence(buffer, 1, cp_mesh.size(), cp_mesh.get_local_rank(), load_balance=False)
    buffer.resize_(shard.shape)
    buffer.copy_(shard)


def make_target_cp_ctx(
    cp_mesh: DeviceMesh, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
) -> tuple[AbstractContextManager[None], torch.Tensor, torch.Tensor, int]:
    """Prepare a frozen model's forward under CP: ``(cp_ctx, input_ids_buf, position_ids_buf, orig_len)``.

    The buffers are fresh copies right-padded to a multiple of the CP size (32 times it on CUDA; ``position_ids``, an
    arange when omitted, are expanded to the batch). Entering ``cp_ctx`` shards them in place to this
    rank's contiguous chunk and switches ring attention on; run the model on the buffers inside it and
    bring outputs back with :func:`gather_cp_seq` and ``orig_len``.
    """
    _check_hooked_replicas(cp_mesh)
    orig_len = input_ids.size(1)
    cp_size = cp_mesh.size()
    # a multiple of cp (32·cp on CUDA), with at least two positions per rank (see padded_length)
    pad_len = padded_length(orig_len, cp_size, ring_pad_multiple(cp_size, False, input_ids.device)) - orig_len
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
