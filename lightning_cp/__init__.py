"""lightning_cp: context parallelism for PyTorch Lightning and Fabric, on GPU and on CPU."""

from lightning_cp.cpu_ring import install_cpu_ring

install_cpu_ring()

from lightning_cp.batch import ContextParallelBatchError  # noqa: E402
from lightning_cp.functional import (  # noqa: E402
    create_context_parallel_ctx,
    get_train_context,
    make_cp_batch_and_ctx,
)
from lightning_cp.hooks import attach_context_parallel_hooks, attach_cp_sdpa_hooks  # noqa: E402
from lightning_cp.loss import count_label_tokens, reduce_loss, token_correct_loss, token_loss_sum  # noqa: E402
from lightning_cp.strategy import ContextParallelStrategy  # noqa: E402
from lightning_cp.target import gather_cp_seq, make_target_cp_ctx  # noqa: E402
from lightning_cp.te_batch import make_cp_batch_for_te  # noqa: E402

__all__ = [
    "ContextParallelBatchError",
    "ContextParallelStrategy",
    "attach_context_parallel_hooks",
    "attach_cp_sdpa_hooks",
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
