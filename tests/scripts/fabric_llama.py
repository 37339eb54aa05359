"""Train a tiny Llama (or ``--model``) with Fabric and ContextParallelStrategy in a user loop; write results, rank 0."""

from __future__ import annotations

import argparse
import atexit

import lightning as L
import torch
from common import (
    BATCH_SIZE,
    apply_tensor_parallel,
    exit_skipping_teardown,
    full_state_dict,
    model_options,
    model_overrides,
    model_seed,
    rank_of_this_process,
    replica_sync_options,
    save_rank_weights,
    skip_replica_sync_if_asked,
    training_samples,
    zoo_model,
)
from torch.utils.data import DataLoader

from lightning_cp import chunked_logits
from lightning_cp.fabric import ContextParallelStrategy


def shard_over_data_and_context(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
    """FSDP2 over the flattened data × context mesh."""
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_context_parallel"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


#: With --announce-steps, the script's own cleanup (a `finally` block, an atexit handler) says that it ran.
_announce_cleanup = False


def _cleanup(what: str) -> None:
    if _announce_cleanup:
        print(f"rank {rank_of_this_process()} {what} ran", flush=True)


def main() -> None:
    global _announce_cleanup
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layout", choices=("replicate", "fsdp"), default="replicate")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size; the world is 2 × tp processes")
    parser.add_argument("--chunked-loss", type=int, default=0, help="tokens per loss chunk (0: off)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--custom-loss", action="store_true", help="loss from logits via the strategy's helper")
    parser.add_argument("--announce-steps", action="store_true", help="print a line at each training step")
    replica_sync_options(parser)
    model_options(parser)
    args = parser.parse_args()
    _announce_cleanup = args.announce_steps
    atexit.register(_cleanup, "atexit handler")

    def parallelize(model: torch.nn.Module, device_mesh) -> torch.nn.Module:
        if args.tp > 1:
            apply_tensor_parallel(model, device_mesh["tensor_parallel"])
        return shard_over_data_and_context(model, device_mesh) if args.layout == "fsdp" else model

    strategy = ContextParallelStrategy(
        parallelize_fn=parallelize,
        cp_size=2,
        cp_mode=args.cp_mode,
        mixer_mode=args.mixer_mode,
        ulysses_size=args.ulysses_size,
        tensor_parallel_size=args.tp,
        chunked_loss=args.chunked_loss or False,
        activation_checkpointing=args.activation_checkpointing,
    )
    skip_replica_sync_if_asked(strategy, args)
    fabric = L.Fabric(accelerator="cpu", devices=2 * args.tp, strategy=strategy)
    fabric.launch()
    # parameters become DTensors under FSDP2: the optimizer comes after
    model = fabric.setup(zoo_model(args.model, seed=model_seed(args), **model_overrides(args)))
    optimizer = fabric.setup_optimizers(torch.optim.SGD(model.parameters(), lr=args.lr))
    samples = training_samples(args.steps * BATCH_SIZE, packed=args.packed)
    loader = fabric.setup_dataloaders(DataLoader(samples, batch_size=BATCH_SIZE))
    losses = []
    for step, batch in enumerate(loader):
        if args.announce_steps:
            print(f"rank {fabric.global_rank} training step {step}", flush=True)
        with strategy.context_parallel(batch):
            if args.custom_loss and args.chunked_loss:  # a loss of one's own, from hidden states in chunks
                hidden = model.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
                logits = chunked_logits(hidden.last_hidden_state, model.lm_head, args.chunked_loss)
                loss = strategy.token_correct_loss(logits, batch["labels"])
            elif args.custom_loss:
                logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
                loss = strategy.token_correct_loss(logits, batch["labels"])
            else:
                loss = model(**batch).loss
            fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach().clone())
    weights = full_state_dict(model)
    if fabric.global_rank == 0:
        torch.save({"losses": torch.stack(losses), "weights": weights}, args.out)
    save_rank_weights(args.out, fabric.global_rank, weights)


if __name__ == "__main__":
    try:
        main()
    finally:
        _cleanup("finally block")
    exit_skipping_teardown()
