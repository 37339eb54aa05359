"""The bytes each sequence-mixer mechanism moves per layer and rank: ``auto``'s rule, and the benchmark's theory.

Per row (batch entry) of ``S`` tokens, fp32, forward and backward together, as the benchmark counts them
(an all-to-all of N local bytes sends ``N·(cp−1)/cp``; an all-gather of N local bytes ``N·(cp−1)``; an
all-reduce of N bytes ``2·N·(cp−1)/cp``):

* all-to-all (Note [mixer all-to-all]): ``2 · 4 · S/cp · (cp−1)/cp · W``, ``W`` the numbers per token one
  pass trades: the convolution's channels in and out, the scan's inputs and its output (key heads or
  groups fewer than ``cp`` are repeated up to ``cp`` first).
* state passing (Note [state passing]): every segment's ``(A, B)`` pair and convolution window
  all-gathered (``N·(cp−1)``), their gradients all-reduced in the backward (``2·cp·N·(cp−1)/cp``):
  ``3 · (cp−1) · 4 · segments · (pair + channels·(kernel−1))``, whatever ``S``. Head/tail rows give each
  rank two segments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

FP32_BYTES = 4
#: Segments per rank and row of load-balanced (head/tail) unpacked rows.
HEAD_TAIL_SEGMENTS = 2


@dataclass(frozen=True)
class MixerTraffic:
    """The sizes that decide what a mixer's mechanisms move (see the module docstring)."""

    #: Channels of the causal convolution (0 without one) and its kernel width minus one.
    conv_channels: int
    halo: int
    #: Scan numbers per token one all-to-all pass trades, besides the repeated key heads / groups.
    scan_width: int
    #: Numbers per token of one key head or group, and how many there are (repeated up to ``cp``).
    shared_width: int
    shared_heads: int
    #: Numbers in one segment's ``(A, B)`` pair, all heads.
    pair: int

    def all_to_all_width(self, cp: int) -> int:
        """``W``: numbers per token one all-to-all pass trades at ``cp`` ranks."""
        shared = self.shared_heads if self.shared_heads % cp == 0 else cp
        return 2 * self.conv_channels + self.scan_width + self.shared_width * shared

    def all_to_all_bytes(self, cp: int, tokens: int) -> float:
        """Bytes a rank sends per row of ``tokens`` by the all-to-all, forward and backward."""
        return 2 * FP32_BYTES * tokens / cp * (cp - 1) / cp * self.all_to_all_width(cp)

    def state_passing_bytes(self, cp: int, segments: int = HEAD_TAIL_SEGMENTS) -> float:
        """Bytes a rank sends per row by state passing, forward and backward, with ``segments`` per rank."""
        return 3 * (cp - 1) * FP32_BYTES * segments * (self.pair + self.conv_channels * self.halo)

    def break_even_tokens(self, cp: int) -> int:
        """The row length from which state passing sends fewer bytes than the all-to-all (head/tail rows)."""
        per_token = self.all_to_all_bytes(cp, 1)
        return math.ceil(self.state_passing_bytes(cp) / per_token) if per_token else 0


def mixer_traffic(module: nn.Module, conv: nn.Module | None, kind: str) -> MixerTraffic | None:
    """The :class:`MixerTraffic` of a gated delta net, a Mamba-2 mixer or a lone causal convolution, else ``None``."""
    channels = conv.weight.size(0) if conv is not None else 0
    halo = conv.kernel_size[0] - 1 if conv is not None else 0
    match kind:
        case "gated delta net":
            heads, d_k, d_v = module.num_v_heads, module.head_k_dim, module.head_v_dim
            # q and k per key head; v, g, beta in and the output back per value head
            return MixerTraffic(
                channels, halo, heads * (2 * d_v + 2), 2 * d_k, module.num_k_heads, heads * d_k * (d_k + d_v)
            )
        case "Mamba-2 scan":
            heads, d_head, d_state = module.num_heads, module.head_dim, module.ssm_state_size
            # x, dt in and the output back per head; B and C per group; the pair: a decay and a state per head
            return MixerTraffic(
                channels, halo, heads * (2 * d_head + 1), 2 * d_state, module.n_groups, heads * (1 + d_head * d_state)
            )
        case "short convolution":
            return MixerTraffic(channels, halo, 0, 0, 1, 0)
    return None
