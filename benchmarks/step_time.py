"""Step time of the Lightning path (strategy + callback) vs the functional core written by hand.

Both paths train the same Llama-shaped model on the same ranks and data with plain SGD: first the
Lightning Trainer with ContextParallelStrategy + ContextParallelCallback, then, in the same processes,
a hand-written loop with ``make_cp_batch_and_ctx``, a token-correct loss, a gradient all-reduce and
the optimizer step. Reported: the median step time of each after warm-up, and their ratio; and the
cost of the per-step check that the CP group holds one batch (on by default), timed on the same
batches in the same processes, as a share of the Lightning step.

    python benchmarks/step_time.py --cp 2 --seq-len 4096
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from common import llama, lm_batch, print_table, save_plot, synchronized_time  # noqa: E402

import lightning_cp as lcp  # noqa: E402
from lightning_cp.callbacks import ContextParallelCallback  # noqa: E402
from lightning_cp.consistency import check_same_batch  # noqa: E402
from lightning_cp.sharding.batch import next_token_labels  # noqa: E402


class _Module(L.LightningModule):
    def __init__(self, args: argparse.Namespace) -> None:
        super().__init__()
        self.model = llama(torch.device("cpu"), layers=args.layers, hidden=args.hidden)
        self.lr = args.lr

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class _StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self._start = synchronized_time(trainer.strategy.root_device)

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        self.times.append(synchronized_time(trainer.strategy.root_device) - self._start)


def _functional_steps(args: argparse.Namespace, mesh: object, samples: list[dict], device: torch.device) -> list[float]:
    """The hand-written loop's step times, under the autocast that ``args.precision`` means for the Trainer."""
    cp_mesh = mesh["context_parallel"]
    model = llama(device, layers=args.layers, hidden=args.hidden)
    lcp.attach_context_parallel_hooks(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    times = []
    for sample in samples:
        start = synchronized_time(device)
        batch = {key: value.unsqueeze(0).to(device) for key, value in sample.items()}
        batch["labels"] = next_token_labels(batch["labels"])
        train_ctx, local = lcp.make_cp_batch_and_ctx(mesh, batch)
        labels = local.pop("labels")
        with train_ctx():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed"):
                logits = model(**local).logits
            loss = lcp.token_correct_loss(logits, labels, cp_mesh)
            loss.backward()
        grads = [param.grad for param in model.parameters()]
        flat = torch._utils._flatten_dense_tensors(grads)  # one bucketed all-reduce, as DDP would
        dist.all_reduce(flat, group=cp_mesh.get_group())
        for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(reduced)
        optimizer.step()
        optimizer.zero_grad()
        times.append(synchronized_time(device) - start)
    return times


def _batch_check_times(samples: list[dict], cp_mesh: object, device: torch.device) -> list[float]:
    """Seconds taken by the CP group's same-batch check (fingerprint + all-gather) on each batch."""
    times = []
    for step, sample in enumerate(samples):
        batch = {key: value.unsqueeze(0).to(device) for key, value in sample.items()}
        start = synchronized_time(device)
        check_same_batch(batch, cp_mesh, step)
        times.append(synchronized_time(device) - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda needs one GPU per rank")
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=7, help="measured steps (median reported)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--precision", choices=("32-true", "bf16-mixed"), default=None, help="32-true on CPU, bf16-mixed on CUDA"
    )
    parser.add_argument("--plot", default="benchmarks/step_time.png", help="PNG to write ('' to skip)")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16-mixed" if args.device == "cuda" else "32-true")

    total = args.warmup + args.steps
    samples = [
        {k: v[0] for k, v in lm_batch(args.seq_len, 1, torch.device("cpu"), seed=i).items()} for i in range(total)
    ]
    timer = _StepTimer()
    trainer = L.Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=args.cp,
        precision=args.precision,
        strategy=lcp.ContextParallelStrategy(cp_size=args.cp),
        callbacks=[ContextParallelCallback(), timer],
        max_steps=total,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(_Module(args), train_dataloaders=DataLoader(samples, batch_size=1))
    functional = _functional_steps(args, trainer.strategy.device_mesh, samples, trainer.strategy.root_device)
    check = _batch_check_times(samples, trainer.strategy.cp_mesh, trainer.strategy.root_device)
    lightning_median = statistics.median(timer.times[args.warmup :])
    functional_median = statistics.median(functional[args.warmup :])
    check_median = statistics.median(check[args.warmup :])
    if trainer.global_rank == 0:
        print_table(
            f"Step time, cp={args.cp}, sequence {args.seq_len}, {args.precision}, median of {args.steps} steps"
            f" after {args.warmup}",
            ["Lightning path s", "functional by hand s", "Lightning / by hand", "batch check ms", "check / step"],
            [
                [
                    f"{lightning_median:.3f}",
                    f"{functional_median:.3f}",
                    f"{lightning_median / functional_median:.3f}",
                    f"{check_median * 1e3:.2f}",
                    f"{check_median / lightning_median:.4f}",
                ]
            ],
        )
        if args.plot:

            def draw(figure: object) -> None:
                axes = figure.subplots()
                axes.plot(timer.times, "o-", label="Lightning path")
                axes.plot(functional, "s-", label="functional by hand")
                axes.axvline(args.warmup - 0.5, color="grey", linestyle=":")
                axes.set(xlabel="step", ylabel="seconds", title=f"step time, cp={args.cp}, seq {args.seq_len}")
                axes.legend()

            save_plot(args.plot, draw)


if __name__ == "__main__":
    main()
