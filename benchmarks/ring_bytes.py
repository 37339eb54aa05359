"""Bytes each rank receives from the ring for one attention layer, against 2·(cp−1)/cp·|K,V|.

|K,V| is the size of one layer's keys and values for the whole sequence. In the forward pass a rank
must receive every other rank's K/V once, (cp−1)/cp·|K,V|; the backward pass receives them again,
hence 2·(cp−1)/cp·|K,V| for K/V. The backward also passes the K/V gradients round the ring (in
fp32), which is reported in its own column. Bytes are counted inside torch's rotaters: what an
all-gather or all-to-all delivers to this rank from the others.

    python benchmarks/ring_bytes.py --cp 2 4
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
from common import backend_for, count_ring_rotations, print_table, rank_device, save_measured_against_theory  # noqa: E402

import lightning_cp  # noqa: E402,F401  (installs the CPU ring)
from lightning_cp.attention.switch import ring_attention  # noqa: E402
from lightning_cp.launch import run_on_local_ranks  # noqa: E402
from lightning_cp.sharding.sequence import shard_sequence  # noqa: E402


def _worker(rank: int, world_size: int, args: argparse.Namespace, rotate_method: str) -> dict:
    device = rank_device(args.device, rank)
    dtype = getattr(torch, args.dtype)
    mesh = init_device_mesh(device.type, (world_size,), mesh_dim_names=("context_parallel",))
    counts: dict[str, int] = defaultdict(int)
    count_ring_rotations(counts)
    generator = torch.Generator().manual_seed(0)
    shape_q = (args.batch_size, args.heads, args.seq_len, args.head_dim)
    shape_kv = (args.batch_size, args.kv_heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(s, generator=generator).to(device, dtype) for s in (shape_q, shape_kv, shape_kv))
    local = [shard_sequence(t, 2, world_size, rank, True).requires_grad_() for t in (q, k, v)]
    with ring_attention(mesh, rotate_method=rotate_method):
        out = F.scaled_dot_product_attention(*local, is_causal=True, enable_gqa=args.heads != args.kv_heads)
        out.sum().backward()
    return {"counts": dict(counts), "kv_bytes": k.nbytes + v.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="default: float32 on CPU, bfloat16 on CUDA (fp32 grouped-query attention on CUDA rotates K/V expanded"
        " to the query heads, since its kernel has no GQA)",
    )
    parser.add_argument("--plot", default="benchmarks/ring_bytes.png", help="PNG to write ('' to skip)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    rows, bars = [], []
    for cp in args.cp:
        for rotate_method in ("allgather", "alltoall"):
            results = run_on_local_ranks(
                _worker, args, rotate_method, world_size=cp, backend=backend_for(args.device, cp), timeout=1800
            )
            counts, kv_bytes = results[0]["counts"], results[0]["kv_bytes"]
            kv_received = counts.get("forward_kv", 0) + counts.get("backward_kv", 0)
            theory = 2 * (cp - 1) / cp * kv_bytes
            rows.append(
                [
                    cp,
                    rotate_method,
                    f"{counts.get('forward_kv', 0) / 2**20:.2f}",
                    f"{counts.get('backward_kv', 0) / 2**20:.2f}",
                    f"{theory / 2**20:.2f}",
                    f"{kv_received / theory:.3f}",
                    f"{counts.get('dkv', 0) / 2**20:.2f}",
                ]
            )
            bars.append((f"cp={cp}\n{rotate_method}", kv_received / 2**20, theory / 2**20))
    print_table(
        f"Ring traffic received per rank, one attention layer (seq {args.seq_len}, {args.dtype}, "
        f"{args.heads} heads / {args.kv_heads} kv heads × {args.head_dim})",
        [
            "cp",
            "rotation",
            "fwd K,V MiB",
            "bwd K,V MiB",
            "theory 2(cp−1)/cp·KV MiB",
            "measured / theory",
            "bwd dK,dV MiB",
        ],
        rows,
    )
    if args.plot:
        save_measured_against_theory(
            args.plot,
            bars,
            "measured K,V",
            "theory 2(cp−1)/cp·KV",
            "MiB received per rank",
            "ring traffic per attention layer",
        )


if __name__ == "__main__":
    main()
