"""Lightning callbacks of lightning_cp."""

from lightning_cp.callbacks.context_parallel import ContextParallelCallback as ContextParallelCallback
