"""Train a small Llama with context parallelism on CPU through the functional API, next to CP=1.

Two gloo processes share every sequence (cp=2). Each step prints the CP=2 loss and the loss of the
same model trained without CP on the same data; with plain SGD both runs stay equal step by step.

    python examples/functional_llama_cp.py --seq-len 512 --steps 5
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import LlamaForCausalLM


def _parse_args() -> argparse.Namespace:
    """The command line, parsed before torch is imported: ``--help`` answers at once."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default: 512)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default: 2)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps (default: 5)")
    parser.add_argument("--cp", type=int, default=2, help="context-parallel ranks (CPU processes, default: 2)")
    parser.add_argument("--lr", type=float, default=0.5, help="SGD learning rate (default: 0.5)")
    return parser.parse_args()


def _model() -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # the same weights on every rank: unlike the strategies, the functional API copies none
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def _batch(step: int, args: argparse.Namespace) -> dict[str, torch.Tensor]:
    import torch

    generator = torch.Generator().manual_seed(step)
    input_ids = torch.randint(0, 512, (args.batch_size, args.seq_len), generator=generator)
    labels = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)
    return {"input_ids": input_ids, "labels": labels}


def _worker(rank: int, world_size: int, args: argparse.Namespace) -> None:
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import lightning_cp as lcp

    mesh = init_device_mesh("cpu", (args.cp,), mesh_dim_names=("context_parallel",))
    cp_mesh = mesh["context_parallel"]
    model = _model()
    reference = copy.deepcopy(model)
    lcp.attach_context_parallel_hooks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=args.lr)
    for step in range(args.steps):
        batch = _batch(step, args)
        train_ctx, local = lcp.make_cp_batch_and_ctx(mesh, batch)
        labels = local.pop("labels")
        with train_ctx():
            loss = lcp.token_correct_loss(model(**local).logits, labels, cp_mesh)
            loss.backward()
        for param in model.parameters():  # the cp ranks' gradients add up to the full one
            dist.all_reduce(param.grad, group=cp_mesh.get_group())
        optimizer.step()
        optimizer.zero_grad()

        ref_loss = lcp.token_loss_sum(reference(input_ids=batch["input_ids"]).logits, batch["labels"])
        ref_loss = ref_loss / (batch["labels"] != -100).sum()
        ref_loss.backward()
        ref_optimizer.step()
        ref_optimizer.zero_grad()

        cp_loss = lcp.reduce_loss(loss, cp_mesh)
        if rank == 0:
            print(
                f"step {step}: loss cp={args.cp} {cp_loss.item():.6f} | cp=1 {ref_loss.item():.6f}"
                f" | per-rank tokens {local['input_ids'].shape[1]} of {args.seq_len}",
                flush=True,
            )
    if rank == 0:
        worst = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters(), strict=True))
        print(f"largest weight difference after {args.steps} SGD steps: {worst:.2e}", flush=True)


def main() -> None:
    args = _parse_args()
    from lightning_cp.launch import run_on_local_ranks

    run_on_local_ranks(_worker, args, world_size=args.cp, timeout=1800)


if __name__ == "__main__":
    main()
