"""Train a tiny Llama (or ``--model``) with the Trainer and ContextParallelStrategy; write losses, weights (rank 0)."""

from __future__ import annotations

import argparse
import os
import signal
from datetime import timedelta

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
from torch.utils.data import DataLoader, DistributedSampler, default_collate

from lightning_cp import ContextParallelStrategy
from lightning_cp.callbacks import ContextParallelCallback


class LlamaModule(L.LightningModule):
    """A LightningModule as a user writes it: the loss is the Hugging Face model's own."""

    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.args = args
        self.model = zoo_model(args.model, seed=model_seed(args), **model_overrides(args))
        self.automatic_optimization = not args.manual
        self.train_losses: list[torch.Tensor] = []
        self.val_losses: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []

    def configure_model(self) -> None:
        if self.args.tp > 1:
            apply_tensor_parallel(self.model, self.device_mesh["tensor_parallel"])
        if self.args.layout in ("fsdp", "hsdp"):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_context_parallel"]
            if self.args.layout == "hsdp":  # replicas of the model, each sharded over data shard × context
                mesh = self.trainer.strategy.hsdp_mesh["data_parallel_replicate", "data_shard_context_parallel"]
            for layer in self.model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if batch_idx == 1 and self.global_rank == self.args.fail_rank:
            if self.args.die:
                os._exit(3)  # a rank that dies without a word
            raise RuntimeError("injected failure")
        if self.args.announce_steps:
            print(f"rank {self.global_rank} training step {batch_idx}", flush=True)
        if batch_idx == 1 and self.global_rank == self.args.stop_rank:
            print(f"stopping rank {self.global_rank}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)  # a rank that stops answering without dying
        loss = self.model(**batch).loss
        self.log("train_loss", loss)
        self.train_losses.append(loss.detach().clone())
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            self.manual_backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss = self.model(**batch).loss
        self.log("val_loss", loss)
        self.val_losses.append(loss.detach().clone())

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).logits

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.args.lr, momentum=self.args.momentum)

    def _loader(self, count: int) -> DataLoader:
        samples = training_samples(count, self.args.seq_len, self.args.packed)
        if self.args.global_rank_sampler:  # the mistake to detect: ranks of one CP group get different data
            sampler = DistributedSampler(
                samples, num_replicas=self.trainer.world_size, rank=self.global_rank, shuffle=False
            )
            return DataLoader(samples, batch_size=BATCH_SIZE, sampler=sampler)
        if self.args.diverge_at >= 0:  # the mistake to detect: a per-rank augmentation from batch k on
            return DataLoader(samples, batch_size=BATCH_SIZE, collate_fn=_RankAugmentation(self.args.diverge_at))
        return DataLoader(samples, batch_size=BATCH_SIZE)

    def train_dataloader(self) -> DataLoader:
        count = self.args.steps * self.args.accumulate * BATCH_SIZE * self.args.dp
        if self.args.stateful_loader:  # resumable mid-epoch; Lightning's sampler shuffles it anew every epoch
            from torchdata.stateful_dataloader import StatefulDataLoader

            samples = training_samples(count, self.args.seq_len, self.args.packed)
            return StatefulDataLoader(samples, batch_size=BATCH_SIZE)
        return self._loader(count)

    def val_dataloader(self) -> DataLoader:
        return self._loader(2 * BATCH_SIZE)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(BATCH_SIZE)


class _RankAugmentation:
    """Collates batches; from batch ``start`` on, ranks other than 0 perturb their tokens."""

    def __init__(self, start: int) -> None:
        self.start, self.batches = start, 0

    def __call__(self, samples: list[dict]) -> dict:
        batch = default_collate(samples)
        if self.batches >= self.start and rank_of_this_process() != 0:
            batch["input_ids"] = (batch["input_ids"] + 1) % 256
        self.batches += 1
        return batch


def _checkpointing(args: argparse.Namespace) -> list:
    if not args.save_dir:
        return []
    from lightning.pytorch.callbacks import ModelCheckpoint

    if args.save_every_n_steps:
        return [
            ModelCheckpoint(
                dirpath=args.save_dir, filename="{step}", every_n_train_steps=args.save_every_n_steps, save_top_k=-1
            )
        ]
    return [ModelCheckpoint(dirpath=args.save_dir, filename="{epoch}", every_n_epochs=1, save_top_k=-1)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2, help="processes per node")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or gpu (one GPU per process, NCCL)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes (each launched with its NODE_RANK)")
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size (Llama TP plan on every layer)")
    parser.add_argument("--layout", choices=("replicate", "fsdp", "hsdp"), default="replicate")
    parser.add_argument("--replicate", type=int, default=1, help="HSDP: data_parallel_replicate_size")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seq-len", type=int, default=130)
    parser.add_argument("--global-rank-sampler", action="store_true")
    parser.add_argument("--diverge-at", type=int, default=-1, help="ranks > 0 alter their batches from this one on")
    parser.add_argument("--validate", action="store_true")
    parser.add_argument("--predict", action="store_true")
    parser.add_argument("--fit", action="store_true", help="with --validate / --predict: train after them")
    parser.add_argument("--manual", action="store_true", help="manual optimization in training_step")
    parser.add_argument("--no-callback", action="store_true")
    parser.add_argument("--no-attention", action="store_true")
    parser.add_argument("--epochs", type=int, default=0, help="train this many epochs of --steps steps each")
    parser.add_argument("--save-dir", help="save a checkpoint at the end of every epoch into this directory")
    parser.add_argument("--save-every-n-steps", type=int, default=0, help="with --save-dir: save every n steps instead")
    parser.add_argument("--stateful-loader", action="store_true", help="a shuffled torchdata StatefulDataLoader")
    parser.add_argument("--consolidated", action="store_true", help="single-file checkpoints")
    parser.add_argument("--resume", help="checkpoint to resume from")
    parser.add_argument("--fail-rank", type=int, default=-1, help="this rank raises in its second training step")
    parser.add_argument("--die", action="store_true", help="with --fail-rank: the rank exits instead of raising")
    parser.add_argument("--announce-steps", action="store_true", help="print a line at each training step")
    parser.add_argument("--stop-rank", type=int, default=-1, help="this rank SIGSTOPs itself in its second step")
    parser.add_argument("--heartbeat-timeout", type=float, default=120, help="seconds; 0: no hang detection")
    parser.add_argument("--deterministic", action="store_true")
    parser.add_argument("--chunked-loss", type=int, default=0, help="tokens per loss chunk (0: off)")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--offload-activations", action="store_true")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--timeout", type=float, default=600, help="collective timeout in seconds")
    replica_sync_options(parser)
    model_options(parser)
    args = parser.parse_args()

    module = LlamaModule(args)
    if args.no_attention:  # a model whose attention the hooks cannot find
        module.model.model.layers = torch.nn.ModuleList()
    strategy = ContextParallelStrategy(
        cp_size=args.cp,
        cp_mode=args.cp_mode,
        mixer_mode=args.mixer_mode,
        ulysses_size=args.ulysses_size,
        data_parallel_size=args.dp,
        tensor_parallel_size=args.tp,
        data_parallel_replicate_size=args.replicate,
        chunked_loss=args.chunked_loss or False,
        activation_checkpointing=args.activation_checkpointing,
        offload_activations=args.offload_activations,
        save_distributed_checkpoint=not args.consolidated,
        timeout=timedelta(seconds=args.timeout),
        heartbeat_timeout=timedelta(seconds=args.heartbeat_timeout) if args.heartbeat_timeout else None,
        deterministic=args.deterministic,
    )
    skip_replica_sync_if_asked(strategy, args)
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        precision=args.precision,
        strategy=strategy,
        callbacks=([] if args.no_callback else [ContextParallelCallback()]) + _checkpointing(args),
        max_steps=-1 if args.epochs else args.steps,
        max_epochs=args.epochs or None,
        accumulate_grad_batches=args.accumulate,
        use_distributed_sampler=not args.global_rank_sampler,
        num_sanity_val_steps=0,
        limit_val_batches=2 if args.validate else 0,
        enable_checkpointing=bool(args.save_dir),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    result: dict = {}
    if args.validate:
        trainer.validate(module)
        result["val_losses"] = torch.stack(module.val_losses)
    if args.predict:
        result["predictions"] = trainer.predict(module)
    if args.fit or not (args.validate or args.predict):  # one launch may validate and predict first, then train
        trainer.fit(module, ckpt_path=args.resume)
        result["losses"] = torch.stack(module.train_losses).cpu()
        result["logged_train_loss"] = trainer.callback_metrics["train_loss"].clone()
        result["tokens_per_sec_logged"] = "tokens_per_sec" in trainer.callback_metrics
    first = next(module.model.parameters())
    result["hsdp_placements"] = str(getattr(first, "placements", None))
    result["weights"] = full_state_dict(module.model)
    result["deterministic_algorithms"] = torch.are_deterministic_algorithms_enabled()
    if trainer.global_rank == 0:
        torch.save(result, args.out)
    save_rank_weights(args.out, trainer.global_rank, result["weights"])


if __name__ == "__main__":
    main()
    exit_skipping_teardown()
