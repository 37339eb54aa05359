"""Model, data and launch helpers shared by the Trainer and Fabric scripts and their tests."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import torch
from model_zoo import ZOO_NAMES, zoo_model  # tests/ is on the path: pytest's pythonpath, or script_command's PYTHONPATH
from models import tiny_causal_lm  # noqa: F401 (re-exported to the scripts and tests)
from torch.utils.data import DistributedSampler

from lightning_cp.cp_mode import CP_MODES
from lightning_cp.mixers.mode import MIXER_MODES

TESTS_DIR = Path(__file__).resolve().parents[1]

#: ``--seed-per-rank`` builds rank r's model from seed INIT_SEED_PER_RANK + r.
INIT_SEED_PER_RANK = 1000
SEQ_LEN = 130  # not a multiple of 2 * cp: the padding path runs too
BATCH_SIZE = 2


def hf_style_samples(count: int, seq_len: int = SEQ_LEN, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Token sequences with Hugging Face labels (the model shifts them), -100 on an uneven share.

    Every third sample ignores the first 60% of its labels, so the CP shards of a batch hold very
    different numbers of valid labels; other samples ignore a few scattered positions.
    """
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        input_ids = torch.randint(1, 256, (seq_len,), generator=generator)
        labels = input_ids.clone()
        if index % 3 == 0:
            labels[: int(0.6 * seq_len)] = -100
        else:
            labels[torch.randint(0, max(seq_len, 1), (seq_len // 10,), generator=generator)] = -100
        samples.append({"input_ids": input_ids, "labels": labels})
    return samples


def packed_samples(count: int, seq_len: int = SEQ_LEN, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Rows of ``seq_len`` tokens packed from documents of 4-48 tokens, as Hugging Face's padding-free collator packs.

    ``position_ids`` restart at 0 for every document and each document's first label is -100 (no target across
    a boundary). Every row is cut into different documents, some shorter than a CP shard, some spanning shards.
    """
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        lengths, left = [], seq_len
        while left:
            length = min(left, int(torch.randint(4, 49, (), generator=generator)))
            length = left if left - length < 4 else length  # no document shorter than 4 tokens at the end
            lengths.append(length)
            left -= length
        input_ids = torch.randint(1, 256, (seq_len,), generator=generator)
        position_ids = torch.cat([torch.arange(length) for length in lengths])
        labels = input_ids.masked_fill(position_ids == 0, -100)
        samples.append({"input_ids": input_ids, "labels": labels, "position_ids": position_ids})
    return samples


def training_samples(count: int, seq_len: int = SEQ_LEN, packed: bool = False) -> list[dict[str, torch.Tensor]]:
    """The scripts' samples: :func:`packed_samples` with ``packed``, else :func:`hf_style_samples`."""
    return packed_samples(count, seq_len) if packed else hf_style_samples(count, seq_len)


#: Megatron-style tensor parallelism for the tiny Llama's decoder layers: attention heads and MLP columns
#: split over the tensor-parallel ranks (embeddings, norms and the LM head stay replicated).
LLAMA_TP_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def apply_tensor_parallel(model: torch.nn.Module, tp_mesh) -> torch.nn.Module:
    """Apply :data:`LLAMA_TP_PLAN` to every decoder layer of a Hugging Face Llama over ``tp_mesh``."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    plan = {name: styles[style]() for name, style in LLAMA_TP_PLAN.items()}
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, plan)
    return model


def replica_sync_options(parser: argparse.ArgumentParser) -> None:
    """Options of the replica-synchronisation tests: unseeded-like models, and bypassing the sync."""
    parser.add_argument("--seed-per-rank", action="store_true", help="each rank builds its model from its own seed")
    parser.add_argument("--skip-replica-sync", action="store_true", help="negative control: no broadcast at setup")


def model_options(parser: argparse.ArgumentParser) -> None:
    """Options choosing the model, the data and the CP mechanisms (``cp_mode``, see :mod:`lightning_cp.cp_mode`;
    ``mixer_mode``, :mod:`lightning_cp.mixers.mode`)."""
    parser.add_argument("--model", choices=ZOO_NAMES, default="llama", help="a tiny model of tests/model_zoo.py")
    parser.add_argument("--packed", action="store_true", help="rows packed from documents (position_ids restart)")
    parser.add_argument("--cp-mode", choices=CP_MODES, default="auto")
    parser.add_argument("--ulysses-size", type=int, default=None, help="the Ulysses group of --cp-mode hybrid")
    parser.add_argument("--mixer-mode", choices=MIXER_MODES, default="auto", help="sequence mixers' mechanism")
    parser.add_argument("--init-std", type=float, help="the config's initializer_range (default: the model's)")


def model_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The config fields ``--init-std`` replaces in the ``--model`` (none by default)."""
    return {} if args.init_std is None else {"initializer_range": args.init_std}


def model_seed(args: argparse.Namespace) -> int:
    """The model's seed: 0, or one per rank (as unseeded processes get) with ``--seed-per-rank``."""
    return INIT_SEED_PER_RANK + rank_of_this_process() if args.seed_per_rank else 0


def skip_replica_sync_if_asked(strategy: object, args: argparse.Namespace) -> None:
    """``--skip-replica-sync`` (negative control): this strategy, and no other in the process, skips the broadcast
    of rank 0's weights at setup."""
    if args.skip_replica_sync:
        strategy._synchronize_replicas = lambda module: None  # type: ignore[attr-defined]


def rank_of_this_process() -> int:
    """The global rank, read before the process group exists (Lightning sets it for the ranks it launches)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def save_rank_weights(out: str, rank: int, weights: dict[str, torch.Tensor]) -> None:
    """Every rank other than 0 writes its final weights beside ``out`` (rank 0 writes ``out`` itself)."""
    if rank:
        torch.save(weights, f"{out}.rank{rank}")


def exit_skipping_teardown() -> None:
    """End a finished script at once (results written), skipping interpreter teardown.

    gloo's threads now and then abort a process during teardown ("terminate called without an active
    exception", SIGABRT) after all of its work is done; the tests judge what the script wrote, not that.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def script_command(script: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run one of the scripts beside this file on a free master port."""
    from distributed_harness import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.pop("LOCAL_RANK", None)
    return [sys.executable, str(Path(__file__).with_name(script)), *args], env


def run_script(script: str, *args: str, timeout: float = 600, fresh: bool = False) -> subprocess.CompletedProcess:
    """Run one of the scripts beside this file on its ranks; return its exit code and what its ranks printed.

    By default its ``main()`` runs on the live group of ranks of ``tests/rank_pool.py``, as Lightning runs under a
    launcher of one's own (``LOCAL_RANK`` set: no process started): the seconds a launch spends starting
    interpreters and importing torch, transformers and Lightning are paid once per suite. ``fresh`` runs it as a
    user does, ``python script.py``, Lightning's launcher starting the other ranks: for the tests of what a
    launch itself does (exit codes, signals, tracebacks, the process's global state).
    """
    if not fresh:
        from rank_pool import run_script_in_pool

        return run_script_in_pool(Path(__file__).with_name(script), list(args), _world_size(args), timeout)
    command, env = script_command(script, *args)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=TESTS_DIR.parent)


def _world_size(args: tuple[str, ...]) -> int:
    """The ranks a script runs on: its ``--devices`` (Trainer scripts), else 2 × its ``--tp`` (Fabric), else 2."""
    options = dict(zip(args, args[1:], strict=False))
    return int(options.get("--devices", 2 * int(options.get("--tp", 1))))


def reference_sgd_run(
    steps: int,
    accumulate: int,
    lr: float,
    seq_len: int = SEQ_LEN,
    shuffled: bool = True,
    data_parallel: int = 1,
    init_seed: int = 0,
    autocast_dtype: torch.dtype | None = None,
    model_name: str = "llama",
    packed: bool = False,
    model_overrides: dict[str, object] | None = None,
) -> dict:
    """The same training on one process without CP: per-micro-batch losses and final weights.

    With ``autocast_dtype``, the forward runs under CPU autocast, as Lightning's ``"bf16-mixed"`` does.
    ``model_name`` is a :func:`~model_zoo.zoo_model` name (its ``"llama"`` is :func:`tiny_causal_lm`'s), built with
    the config fields ``model_overrides``; with ``packed``, the samples are :func:`packed_samples`, masked per
    document by Hugging Face itself.
    Each micro-batch is the *global* one: the batches of all ``data_parallel`` replicas together, as
    Lightning's DistributedSampler hands them out (shuffled with seed 0 for the Trainer, in order for
    Fabric), and its loss is the token mean over all of them.
    """
    model = zoo_model(model_name, seed=init_seed, **(model_overrides or {}))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    samples = training_samples(steps * accumulate * BATCH_SIZE * data_parallel, seq_len, packed)
    # Hugging Face masks packed documents apart only without a KV cache (it skips packing detection with one)
    options = {"use_cache": False} if packed else {}
    orders = [
        list(DistributedSampler(samples, num_replicas=data_parallel, rank=rank, shuffle=shuffled, seed=0))
        for rank in range(data_parallel)
    ]
    losses = []
    for step in range(steps):
        for micro in range(accumulate):
            start = (step * accumulate + micro) * BATCH_SIZE
            chosen = [samples[i] for order in orders for i in order[start : start + BATCH_SIZE]]
            batch = {key: torch.stack([s[key] for s in chosen]) for key in samples[0]}
            with torch.autocast("cpu", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                loss = model(**batch, **options).loss
            (loss / accumulate).backward()
            losses.append(loss.detach())
        optimizer.step()
        optimizer.zero_grad()
    return {"losses": torch.stack(losses), "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's weights as plain tensors, gathering DTensor shards (a collective: call on all ranks)."""
    from torch.distributed.tensor import DTensor

    return {
        key: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu().clone()
        for key, value in module.state_dict().items()
    }
