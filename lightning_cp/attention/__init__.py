"""Every CP attention mechanism, and the switch that turns one on.

- :mod:`~lightning_cp.attention.switch`: :func:`ring_attention` routes SDPA through a mechanism while open;
- :mod:`~lightning_cp.attention.cpu_ring`: torch's causal ring, taught the CPU SDPA kernel;
- :mod:`~lightning_cp.attention.document_ring`: packed documents, attention masked per document;
- :mod:`~lightning_cp.attention.transformer_engine`: Transformer Engine attention, which runs its own ring
  once given the CP group;
- :mod:`~lightning_cp.attention._torch`: every private torch name the package uses (nothing else
  touches torch internals); the few that other rooms need are re-exported here.
"""

from lightning_cp.attention._torch import compiled_autograd as compiled_autograd
from lightning_cp.attention._torch import flatten_mesh as flatten_mesh
from lightning_cp.attention._torch import load_balance_enabled as load_balance_enabled
from lightning_cp.attention._torch import rotate_method as rotate_method
from lightning_cp.attention._torch import set_rotate_method as set_rotate_method
