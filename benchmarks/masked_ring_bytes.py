"""Bytes each rank receives from the masked ring (Note [windowed ring]) for one attention layer, against theory.

The masked ring fetches, point to point, only the keys and values some query of a rank attends. With the
load-balanced layout (chunk ``c`` of ``2·cp`` on rank ``min(c, 2cp−1−c)``) and a window ``w`` no longer than
a chunk, a query sees the ``w−1`` keys before its chunk's start, so a rank receives ``w−1`` tokens of K/V for
each of its chunks whose previous chunk another rank holds; without a window, every other rank's key before
its last query. The backward sends the gradients of exactly those keys and values back to their owners (nothing
is fetched again: autograd keeps them), so a rank receives the gradients of its own keys that the others used.
Counted inside the point-to-point exchange, per rank; the theory is worked out from the layout alone,
independently of the fetch plan.

    python benchmarks/masked_ring_bytes.py --cp 2 4
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import backend_for, print_table, rank_device, save_measured_against_theory  # noqa: E402

from lightning_cp.attention import masked_ring  # noqa: E402
from lightning_cp.attention.masked_ring import AttentionVariant, masked_ring_attention  # noqa: E402
from lightning_cp.launch import run_on_local_ranks  # noqa: E402
from lightning_cp.sharding.sequence import shard_sequence  # noqa: E402


def theory_tokens(seq_len: int, cp: int, window: int | None) -> list[list[int]]:
    """``[destination][source]``: key tokens each rank needs from each other rank, from the chunk layout and the
    window alone (see the module docstring)."""
    chunk = seq_len // (2 * cp)
    owner = [min(c, 2 * cp - 1 - c) for c in range(2 * cp)]
    needed = [[0] * cp for _ in range(cp)]
    for destination in range(cp):
        chunks = (destination, 2 * cp - 1 - destination)
        for source in range(cp):
            if source == destination:
                continue
            if window is None:  # every position of the source up to the destination's last query
                needed[destination][source] = sum(chunk for c in range(max(chunks) + 1) if owner[c] == source)
        if window is not None:
            assert window <= chunk, "the formula holds for windows no longer than a chunk"
            for c in chunks:
                if c > 0 and owner[c - 1] != destination:
                    needed[destination][owner[c - 1]] += window - 1
    return needed


def _worker(rank: int, world_size: int, args: argparse.Namespace, window: int | None) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    device = rank_device(args.device, rank)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("context_parallel",))
    received = {"forward": 0, "backward": 0}
    phase = ["forward"]
    exchange = masked_ring.point_to_point_exchange

    def counting_exchange(outgoing, incoming, group):
        received[phase[0]] += sum(tensor.nbytes for tensor in incoming.values())
        return exchange(outgoing, incoming, group)

    masked_ring.point_to_point_exchange = counting_exchange
    generator = torch.Generator().manual_seed(0)
    shape_q = (args.batch_size, args.heads, args.seq_len, args.head_dim)
    shape_kv = (args.batch_size, args.kv_heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(s, generator=generator).to(device) for s in (shape_q, shape_kv, shape_kv))
    local = [shard_sequence(t, 2, world_size, rank, True).requires_grad_() for t in (q, k, v)]
    variant = AttentionVariant(1 / math.sqrt(args.head_dim), window)
    out = masked_ring_attention(*local, variant, mesh.get_group(), True)
    phase[0] = "backward"
    out.sum().backward()
    token_bytes = 2 * args.batch_size * args.kv_heads * args.head_dim * k.element_size()  # one token's K and V
    return {**received, "token_bytes": token_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--plot", default="benchmarks/masked_ring_bytes.png", help="PNG to write ('' to skip)")
    args = parser.parse_args()

    rows, bars = [], []
    for cp in args.cp:
        for window in (args.seq_len // 8, None):
            results = run_on_local_ranks(
                _worker, args, window, world_size=cp, backend=backend_for(args.device, cp), timeout=1800
            )
            token_bytes = results[0]["token_bytes"]
            needed = theory_tokens(args.seq_len, cp, window)
            # forward: the K/V this rank needs; backward: the gradients of its K/V that the others needed
            theory = [
                (sum(needed[rank]) * token_bytes, sum(row[rank] for row in needed) * token_bytes) for rank in range(cp)
            ]
            worst = max(range(cp), key=lambda rank: results[rank]["forward"])
            ratios = [
                measured / expected
                for result, expected_pair in zip(results, theory, strict=True)
                for measured, expected in zip((result["forward"], result["backward"]), expected_pair, strict=True)
                if expected
            ]
            whole = (cp - 1) / cp * args.seq_len * token_bytes  # what torch's ring gives every rank, per pass
            rows.append(
                [
                    cp,
                    "none" if window is None else f"{window} (S/8)",
                    f"{results[worst]['forward'] / 2**20:.2f}",
                    f"{results[worst]['backward'] / 2**20:.2f}",
                    f"{theory[worst][0] / 2**20:.2f} / {theory[worst][1] / 2**20:.2f}",
                    f"{min(ratios):.3f} … {max(ratios):.3f}",
                    f"{results[worst]['forward'] / whole:.3f}",
                ]
            )
            label = f"cp={cp}\nwindow={'none' if window is None else window}"
            bars.append((label, results[worst]["forward"] / 2**20, theory[worst][0] / 2**20))
    print_table(
        f"Masked ring K/V received per rank, one attention layer (seq {args.seq_len}, fp32, {args.heads} heads /"
        f" {args.kv_heads} kv heads × {args.head_dim}; the rank receiving most)",
        [
            "cp",
            "window",
            "fwd K,V MiB",
            "bwd dK,dV MiB",
            "theory fwd / bwd MiB",
            "measured / theory (every rank, fwd and bwd)",
            "fwd / torch's ring (cp−1)/cp·KV",
        ],
        rows,
    )
    if args.plot:
        save_measured_against_theory(
            args.plot,
            bars,
            "measured K,V (forward)",
            "theory",
            "MiB received per rank",
            "masked ring traffic per attention layer",
        )


if __name__ == "__main__":
    main()
