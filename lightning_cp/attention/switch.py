"""Switching ring attention on and off: torch's CP dispatcher plus the process-wide state we keep.

torch's context-parallel options (load balancing, rotate method) are process-wide globals. The
context manager here sets them for its duration and puts every one of them back on exit, also when
the body raises, so a later non-CP call in the same process is unaffected.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_cp.attention import _torch, ledger
from lightning_cp.attention.cpu_ring import SDPA_SEQ_DIM
from lightning_cp.attention.document_ring import DocumentMaskedAttention
from lightning_cp.attention.ledger import inside_hooked_module, record_mechanism_call
from lightning_cp.attention.ulysses import UlyssesExchange, ulysses_sdpa
from lightning_cp.sharding.packing import PackedLayout
from lightning_cp.validation import ContextParallelInputError, check_qkv, refuse_together, ring_refusal

ROTATE_METHODS: tuple[str, ...] = ("allgather", "alltoall")
#: SDPA kernels that torch's ring can run (CPU's flash kernel counts as FLASH_ATTENTION).
RING_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


#: The CP mechanisms: torch's ring of key/value shards, Ulysses' all-to-all of heads, or Ulysses inside
#: groups of ranks with the ring across the groups.
MECHANISMS: tuple[str, ...] = ("ring", "ulysses", "hybrid")


@dataclass(frozen=True)
class ActiveContextParallel:
    """What the model hooks need to know about the CP attention that is switched on."""

    load_balance: bool
    #: Longest span one query can attend (the padded sequence, or the longest packed document), when known.
    global_seq_len: int | None
    #: The documents of a packed batch, when the ring's attention is document-masked.
    documents: PackedLayout | None = None
    #: One of :data:`MECHANISMS`.
    mechanism: str = "ring"
    #: The Ulysses trade of this micro-batch (``"ulysses"`` and ``"hybrid"``).
    ulysses: UlyssesExchange | None = None
    #: Padding positions after each (unpacked) row: bidirectional attention would see them under a ring.
    padding: int = 0
    #: The ranks the ring runs over (``"ring"``: the CP group; ``"hybrid"``: one rank per Ulysses group).
    ring_group: dist.ProcessGroup | None = None


_active: ActiveContextParallel | None = None


def active_context_parallel() -> ActiveContextParallel | None:
    """The ring attention currently switched on in this process, or ``None``."""
    return _active


def validate_rotate_method(rotate_method: str) -> str:
    """Return ``rotate_method`` if torch's ring knows it, else raise a ``ValueError`` naming the choices."""
    if rotate_method not in ROTATE_METHODS:
        raise ValueError(f"`rotate_method` must be one of {ROTATE_METHODS}, got {rotate_method!r}.")
    return rotate_method


def rotation_for(cp_mesh: DeviceMesh, rotate_method: str) -> str:
    """The ring rotation to run over ``cp_mesh``: ``rotate_method``, except "allgather" over gloo on CUDA.

    torch's functional ``all_gather_tensor``, which the "allgather" rotation calls, kills the process with a
    segmentation fault when a gloo group carries CUDA tensors (torch 2.11 on an H200; torch's own
    ``context_parallel`` crashes alike), while the "alltoall" rotation runs. Both rotations give the same
    result, so "alltoall" is used there, with a warning. Gloo on CUDA is what two ranks sharing one GPU need.
    """
    validate_rotate_method(rotate_method)
    if rotate_method == "allgather" and cp_mesh.device_type == "cuda" and _is_gloo(cp_mesh):
        warnings.warn(
            "rotate_method='allgather' over a gloo group on CUDA tensors crashes the process in torch's"
            " functional all_gather (segmentation fault); the ring rotates with 'alltoall' instead (same"
            " result). Use NCCL, one GPU per rank, to run 'allgather'.",
            stacklevel=3,
        )
        return "alltoall"
    return rotate_method


def _is_gloo(cp_mesh: DeviceMesh) -> bool:
    return dist.get_backend(cp_mesh.get_group()) == "gloo"


def _cast_as_autocast_would(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q/k/v in the dtype autocast gives SDPA (its lower-precision dtype), when autocast is on.

    Under mixed precision (``precision="bf16-mixed"`` / ``"16-mixed"``), rotary embeddings leave q and k
    in fp32 while v is already bf16; autocast would cast all three when the SDPA op runs. The checks
    below run before that, so they see what the kernel will get. The ring merges in fp32 regardless.
    """
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(tensor.to(dtype) if tensor.is_floating_point() else tensor for tensor in tensors)


#: dtypes for which a GQA-capable ring kernel (flash, cuDNN) runs on CUDA; others get the efficient kernel.
_GQA_KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def needs_expanded_kv(device_type: str, dtype: torch.dtype, query_heads: int, kv_heads: int, enable_gqa: bool) -> bool:
    """Whether K/V heads must be repeated to the query heads before the ring's SDPA kernel runs.

    Under the ring only the flash, efficient and cuDNN kernels may run (never math). On CUDA, flash and
    cuDNN take grouped-query attention but only fp16/bf16; the efficient kernel, which fp32 gets, is
    documented in torch 2.13 without GQA (``F.scaled_dot_product_attention``: "GQA ... works only for
    Flash_attention and math kernel on CUDA"). So fp32 GQA on CUDA would find no kernel. CPU's flash
    kernel takes GQA in every dtype.
    """
    return enable_gqa and query_heads != kv_heads and device_type == "cuda" and dtype not in _GQA_KERNEL_DTYPES


def expand_kv_heads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``key`` and ``value`` with each head repeated for its group of query heads (what ``enable_gqa`` means).

    Query head ``h`` attends with key/value head ``h // (query_heads // kv_heads)``, as in torch's GQA.
    """
    query_heads, kv_heads = query.size(-3), key.size(-3)
    if query_heads % kv_heads:
        raise ValueError(
            f"Grouped-query attention needs the query heads ({query_heads}) to be a multiple of the key/value"
            f" heads ({kv_heads})."
        )
    repeats = query_heads // kv_heads
    return key.repeat_interleave(repeats, dim=-3), value.repeat_interleave(repeats, dim=-3)


def _check_ring_call(
    attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool, load_balance: bool, group: Any
) -> None:
    """Refuse what the ring cannot compute, on every rank of the group alike.

    From a hooked attention module the verdict is the same on every rank (the hooks dropped the mask).
    A call from anywhere else may carry a mask on one rank only (a model that builds one where its
    shard's positions jump), so those ranks agree first (:func:`~lightning_cp.validation.refuse_together`).
    """
    reason = ring_refusal(attn_mask, dropout_p, is_causal, load_balance)
    if inside_hooked_module():
        if reason is not None:
            raise ContextParallelInputError(reason)
    else:
        refuse_together(reason, group)


def _broadcast_kv_heads(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Key/value with one head meant to broadcast over several query heads (multi-query attention that
    relies on SDPA broadcasting, as Falcon's does), repeated to the query heads: the ring needs them equal."""
    if key.size(-3) == 1 and query.size(-3) > 1 and not enable_gqa:
        return expand_kv_heads(query, key, value)
    return key, value


def _guarded(sdpa: Callable[..., torch.Tensor], load_balance: bool, group: Any) -> Callable[..., torch.Tensor]:
    """``sdpa`` preceded by the ring's input checks, so a bad call fails clearly before any kernel runs."""

    @functools.wraps(sdpa)
    def guarded_sdpa(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        _check_ring_call(attn_mask, dropout_p, is_causal, load_balance, group)
        query, key, value = _cast_as_autocast_would(query, key, value)
        check_qkv(query, key, value)
        key, value = _broadcast_kv_heads(query, key, value, enable_gqa)
        record_mechanism_call()
        if needs_expanded_kv(query.device.type, query.dtype, query.size(-3), key.size(-3), enable_gqa):
            key, value = expand_kv_heads(query, key, value)
            enable_gqa = False
        return sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    return guarded_sdpa


def _document_sdpa(layout: PackedLayout, cp_mesh: DeviceMesh) -> Callable[..., torch.Tensor]:
    """An SDPA replacement that runs the document-masked ring over ``cp_mesh`` for ``layout``."""
    attention = DocumentMaskedAttention(layout, cp_mesh.get_group())

    def document_masked_sdpa(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        _check_ring_call(attn_mask, dropout_p, True, False, cp_mesh.get_group())
        query, key, value = _cast_as_autocast_would(query, key, value)
        check_qkv(query, key, value)
        key, value = _broadcast_kv_heads(query, key, value, enable_gqa)
        record_mechanism_call()
        # The document ring chooses its own precisions (fp32 scores and merge); autocast must not recast them.
        with torch.autocast(query.device.type, enabled=False):
            return attention(query, key, value, is_causal=is_causal, scale=scale)

    return document_masked_sdpa


def _refuse_nesting() -> None:
    """Raise before anything is switched on when ring attention is already on in this process."""
    if _active is not None:
        raise RuntimeError(
            "Ring attention is already switched on in this process; context-parallel contexts do not nest."
        )


def _mechanism_sdpa(
    torch_sdpa: Callable[..., torch.Tensor], state: ActiveContextParallel, ring_mesh: DeviceMesh | None
) -> Callable[..., torch.Tensor]:
    """The SDPA that runs ``state``'s mechanism in place of ``torch_sdpa`` (torch's ring SDPA, for a ring)."""
    if state.mechanism == "ulysses":
        assert state.ulysses is not None
        return ulysses_sdpa(torch_sdpa, state.ulysses)
    assert ring_mesh is not None
    if state.documents is None:
        ring = _guarded(torch_sdpa, state.load_balance, ring_mesh.get_group())
    else:
        ring = _document_sdpa(state.documents, ring_mesh)
    if state.mechanism == "hybrid":
        assert state.ulysses is not None
        return ulysses_sdpa(ring, state.ulysses)
    return ring


@contextmanager
def switched_on(
    dispatcher: AbstractContextManager[Any], state: ActiveContextParallel, ring_mesh: DeviceMesh | None
) -> Iterator[None]:
    """Enter ``dispatcher`` (what routes SDPA to a ring) and make CP look the same to the model while open.

    Every public way of entering CP comes through here: :func:`ring_attention` with lightning_cp's
    dispatcher, :func:`ulysses_attention` with none, and the NeMo-style ``create_context_parallel_ctx``
    with torch's own ``context_parallel``. So whichever is open, the hooked attention modules see
    ``state`` (they drop masks; attention goes through ``state.mechanism``), SDPA checks its inputs first
    (or runs the document-masked ring for ``state.documents``), and under a ring only the kernels the
    ring can run are allowed. Contexts do not nest: the inner one's exit would switch the outer one's
    dispatcher off. Everything is put back on exit, also when the body raises.
    """
    global _active
    _refuse_nesting()
    ledger.reset()  # a forward that raised in an earlier context may have left a module behind
    with dispatcher:
        torch_sdpa = F.scaled_dot_product_attention
        try:
            F.scaled_dot_product_attention = _mechanism_sdpa(torch_sdpa, state, ring_mesh)
            _active = state
            # Never the math kernel under a ring: it would compute plain attention on the local shards.
            with nullcontext() if state.mechanism == "ulysses" else sdpa_kernel(RING_SDPA_BACKENDS):
                yield
        finally:
            _active = None
            F.scaled_dot_product_attention = torch_sdpa  # torch restores only its own wrapper
            ledger.reset()  # a forward that raised would keep its module alive, and "inside a hooked module"


@contextmanager
def ulysses_attention(
    exchange: UlyssesExchange, *, global_seq_len: int | None = None, documents: PackedLayout | None = None
) -> Iterator[None]:
    """Run attention by Ulysses while open (Note [Ulysses] in :mod:`lightning_cp.attention.ulysses`).

    Inputs are this rank's sequence shards, in any layout ``exchange.order`` puts back in order;
    ``exchange.spans`` lists each row's documents (packed rows), which attention never crosses;
    ``documents``: the packed layout they come from, if any.
    """
    state = ActiveContextParallel(False, global_seq_len, documents, mechanism="ulysses", ulysses=exchange)
    with switched_on(nullcontext(), state, None):
        yield


@contextmanager
def ring_attention(
    cp_mesh: DeviceMesh,
    *,
    load_balance: bool = True,
    rotate_method: str = "allgather",
    global_seq_len: int | None = None,
    documents: PackedLayout | None = None,
    ulysses: UlyssesExchange | None = None,
    padding: int = 0,
) -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` through the ring over ``cp_mesh`` while open.

    Q/K/V given to SDPA are taken as this rank's sequence shards. ``load_balance`` must match how the
    inputs were sharded (head/tail chunks when ``True``, contiguous chunks when ``False``). With
    ``documents`` (a packed batch sharded by :func:`lightning_cp.sharding.packing.shard_packed_batch`), the
    document-masked ring runs instead of torch's. With ``ulysses`` (the hybrid), q/k/v are first traded
    by Ulysses inside that group, and the ring runs over ``cp_mesh`` on what the group holds together
    (Note [hybrid layout] in :mod:`lightning_cp.sharding.sequence`). ``padding``: positions padded after
    each unpacked row (bidirectional attention is then refused: the ring would let every token see them).
    Backward passes must run inside the context: the ring's backward is dispatched through it as well.
    """
    _refuse_nesting()
    dispatcher = _torch.ring_dispatcher(cp_mesh, SDPA_SEQ_DIM, load_balance, rotation_for(cp_mesh, rotate_method))
    mechanism = "ring" if ulysses is None else "hybrid"
    state = ActiveContextParallel(
        load_balance,
        global_seq_len,
        documents,
        mechanism=mechanism,
        ulysses=ulysses,
        padding=padding,
        ring_group=cp_mesh.get_group(),
    )
    with switched_on(dispatcher, state, cp_mesh):
        yield
