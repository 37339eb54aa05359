"""The Fabric strategy under its public import path (it lives in :mod:`lightning_cp.strategies.fabric`)."""

from lightning_cp.strategies.fabric import ContextParallelStrategy as ContextParallelStrategy
