"""lightning_cp: context parallelism for PyTorch Lightning and Fabric, on GPU and on CPU.

The rooms (dependencies point one way: callbacks → strategies → session → {hooks, attention, sharding, loss}):

- ``strategies/`` — the Trainer and Fabric strategies: mesh, sampler, gradient reduction, replicas, checkpoints;
- ``callbacks/`` — shards each batch and holds the CP context over forward and backward;
- ``session.py`` — what one process does around each micro-batch (shared by both strategies);
- ``hooks.py`` — model surgery at setup; ``attention/`` — every CP attention mechanism and the one
  module that touches private torch internals; ``sharding/`` — pure layout maths and batch preparation;
- ``loss.py``, ``loss_check.py`` — token-correct losses, and recognising wrong ones;
- ``mesh.py``, ``validation.py``, ``consistency.py``, ``watchdog.py``, ``rank_errors.py`` — mesh, input
  rules, same-batch check, hung ranks, one traceback per error;
- ``functional.py`` — the NeMo AutoModel ``cp_utils``-compatible facade (nothing inside imports it);
  ``doctor.py`` — proves CP exact on a user's model; ``launch.py`` — local multi-process runs.

Words, as used throughout:

- **shard**: the part of a sequence (or batch) one context-parallel rank holds; *sharding* cuts it.
- **share**: one rank's part of a loss or gradient; the shares summed over the ranks give the whole.
- **layout**: how positions are spread over the ranks (head/tail or contiguous; per document when
  packed), see Note [head/tail layout] in :mod:`lightning_cp.sharding.sequence`. Not the mesh.
- **mesh dim**: a named dimension of the device mesh (``data_parallel``, ``context_parallel``,
  ``tensor_parallel``, and the flattened ``data_context_parallel``); its size is a parallel size.
"""

from lightning_cp.attention.cpu_ring import install_cpu_ring

install_cpu_ring()

from lightning_cp.chunked_loss import apply_chunked_loss, chunked_logits  # noqa: E402
from lightning_cp.functional import (  # noqa: E402
    create_context_parallel_ctx,
    gather_cp_seq,
    get_train_context,
    make_cp_batch_and_ctx,
    make_target_cp_ctx,
)
from lightning_cp.hooks import attach_context_parallel_hooks, attach_cp_sdpa_hooks  # noqa: E402
from lightning_cp.loss import count_label_tokens, reduce_loss, token_correct_loss, token_loss_sum  # noqa: E402
from lightning_cp.memory import apply_activation_checkpointing, apply_memory_options, offload_activations  # noqa: E402
from lightning_cp.registration import register_strategies_with_lightning  # noqa: E402
from lightning_cp.sharding.batch import ContextParallelBatchError  # noqa: E402
from lightning_cp.sharding.te_batch import make_cp_batch_for_te  # noqa: E402
from lightning_cp.strategies.replicas import broadcast_replicated_state  # noqa: E402

# Lightning is imported on demand (Note [Lightning imported on demand] in lightning_cp.registration).
register_strategies_with_lightning()


def __getattr__(name: str) -> object:
    """``ContextParallelStrategy``, imported (with Lightning) when first asked for."""
    if name == "ContextParallelStrategy":
        from lightning_cp.strategies.trainer import ContextParallelStrategy

        return ContextParallelStrategy
    raise AttributeError(f"module 'lightning_cp' has no attribute {name!r}")


__all__ = [
    "apply_activation_checkpointing",
    "apply_chunked_loss",
    "apply_memory_options",
    "chunked_logits",
    "offload_activations",
    "ContextParallelBatchError",
    "ContextParallelStrategy",
    "attach_context_parallel_hooks",
    "attach_cp_sdpa_hooks",
    "broadcast_replicated_state",
    "count_label_tokens",
    "create_context_parallel_ctx",
    "gather_cp_seq",
    "get_train_context",
    "make_cp_batch_and_ctx",
    "make_cp_batch_for_te",
    "make_target_cp_ctx",
    "reduce_loss",
    "token_correct_loss",
    "token_loss_sum",
]
