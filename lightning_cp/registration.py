"""``strategy="context_parallel"`` for the Trainer and Fabric, without importing Lightning for those who never use it.

Note [Lightning imported on demand]
-----------------------------------
Importing Lightning costs about 5 s of CPU per process (torchmetrics, torch._dynamo). The functional API, the
doctor and ``lightning_cp.launch`` never use it, and every rank of their jobs would pay it. So ``import
lightning_cp`` imports Lightning only where it is already imported; the strategies (``ContextParallelStrategy``,
``lightning_cp.strategies.*``) import it when first asked for.

Lightning finds a strategy by name in registries our strategy modules fill when imported: a script that imports
``lightning_cp`` and then ``lightning`` must still find ``"context_parallel"``. So until Lightning is imported, a
finder on ``sys.meta_path`` waits for the ``lightning`` package: once the package has run its ``__init__`` (which
imports Fabric and the Trainer whole), our strategy modules are imported, and they register themselves.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

_LIGHTNING = "lightning"


def register_strategies_with_lightning() -> None:
    """Register the strategies by name now if Lightning is imported, else as soon as it is (the Note above)."""
    if _LIGHTNING in sys.modules:
        _import_strategies()
    elif not any(isinstance(finder, _AfterLightningLoads) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterLightningLoads())


def _import_strategies() -> None:
    # Their modules register `strategy="context_parallel"` with Fabric and with the Trainer when imported.
    importlib.import_module("lightning_cp.strategies.fabric")
    importlib.import_module("lightning_cp.strategies.trainer")


class _AfterLightningLoads(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands the ``lightning`` package's spec back with a loader that, once the package has
    run, imports our strategy modules. Leaves ``sys.meta_path`` at its first use."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname != _LIGHTNING:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)  # the finders after this one, as the import would have asked
        if spec is None or spec.loader is None:
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_package(module)
            _import_strategies()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec
