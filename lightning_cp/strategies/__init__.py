"""The Trainer and Fabric strategies: the mesh, the sampler, gradient reduction, replicas, checkpoints.

With :mod:`lightning_cp.callbacks`, the only part of the package that imports Lightning.

- :mod:`~lightning_cp.strategies.trainer` and :mod:`~lightning_cp.strategies.fabric`: the two strategies;
- :mod:`~lightning_cp.strategies.shared`: what they share (options, mesh, session, watchdog);
- :mod:`~lightning_cp.strategies.gradients`, :mod:`~lightning_cp.strategies.replicas`,
  :mod:`~lightning_cp.strategies.checkpoint`: parameters across ranks, and their files.
"""
