"""Shared pieces of the benchmarks: the model, synthetic batches, memory measurement, tables, plots.

Memory on CPU is the peak resident set size (VmHWM) during one training step minus the resident size
just before it; the peak is reset through /proc/self/clear_refs before each step, and glibc is made to
hand freed memory back (a fixed mmap threshold, set by :func:`release_freed_memory_to_os` before the
ranks start, and ``malloc_trim``), so memory kept from an earlier, larger step does not hide a peak. It covers
activations, temporaries, communication buffers and gradients of one forward + backward; weights,
optimizer-free gradient buffers and libraries are in the baseline. On CUDA it is the peak of
torch's allocator (``max_memory_allocated``) over the same step, minus what was allocated before.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor.experimental._context_parallel import _attention as torch_cp_attention
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 1024


def llama(
    device: torch.device,
    layers: int = 2,
    hidden: int = 256,
    heads: int = 4,
    seed: int = 0,
    vocab: int = VOCAB,
    kv_heads: int | None = None,
) -> LlamaForCausalLM:
    """A Llama-shaped model (GQA, RMSNorm, SwiGLU, RoPE) small enough for long sequences on a CPU.

    ``kv_heads`` defaults to half the query heads (at least one).
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 2),
        max_position_embeddings=1 << 20,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).to(device)


def lm_batch(
    seq_len: int, batch_size: int, device: torch.device, seed: int = 0, vocab: int = VOCAB
) -> dict[str, torch.Tensor]:
    """Random tokens with Hugging Face labels."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(device)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def functional_training_step(model: torch.nn.Module, mesh: Any, cp_mesh: Any, batch: dict) -> torch.Tensor:
    """One forward + backward through ``make_cp_batch_and_ctx`` with the model's token-correct HF loss.

    ``batch`` holds position-aligned labels. The gradient buffers stay allocated (``zero_grad`` without
    ``set_to_none``): they are part of every measured baseline. Returns this rank's loss share.
    """
    import lightning_cp as lcp

    train_ctx, local = lcp.make_cp_batch_and_ctx(mesh, batch)
    labels = local.pop("labels")
    with train_ctx():
        count = lcp.count_label_tokens(labels, cp_mesh)
        loss = model(**local, labels=labels, shift_labels=labels, num_items_in_batch=count).loss
        loss.backward()
    model.zero_grad(set_to_none=False)
    return loss.detach()


def backend_for(device: str, world_size: int) -> str:
    """NCCL with one GPU per rank; gloo otherwise (CPU, or ranks sharing a GPU)."""
    if device == "cuda" and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def rank_device(device: str, rank: int) -> torch.device:
    """The device a rank computes on: its own GPU when there are enough, else GPU 0, or the CPU."""
    if device == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def synchronized_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the work queued on ``device`` is done (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _CountingRotater:
    """Wraps one of torch's rotaters and adds the bytes it delivers from other ranks to ``counts[label]``."""

    def __init__(self, inner: Any, group: dist.ProcessGroup, counts: dict[str, int], label: str) -> None:
        self.inner, self.counts, self.label = inner, counts, label
        self.world_size = dist.get_world_size(group)
        self.gathers_once = type(inner).__name__ == "_AllGatherRotater"
        self.exchanged = False

    def exchange_buffers(self, buffer: torch.Tensor) -> None:
        if not self.gathers_once:
            self.counts[self.label] += buffer.nbytes
        elif not self.exchanged:
            self.counts[self.label] += buffer.nbytes * (self.world_size - 1)
        self.exchanged = True
        self.inner.exchange_buffers(buffer)

    def next_buffer(self) -> torch.Tensor:
        return self.inner.next_buffer()


def count_ring_rotations(counts: dict[str, int]) -> None:
    """From now on in this process, add the bytes torch's ring rotaters deliver to this rank to ``counts``.

    Keys: ``"forward_kv"`` and ``"backward_kv"`` (K/V received in the forward and backward passes) and
    ``"dkv"`` (K/V gradients passed round the ring in the backward). ``counts`` must default to 0
    (a ``defaultdict(int)``). Each rotater counts over its own process group, so a ring over part of
    the CP ranks (the hybrid's) is counted right.
    """
    attention = torch_cp_attention  # torch's private ring internals: counted here, outside the package
    create, forward, backward = (
        attention._create_rotater,
        attention._templated_ring_attention,
        attention._templated_ring_attention_backward,
    )
    phase = {"name": "forward"}

    def counting_create(group: dist.ProcessGroup, seq_dim: int, method: Any = None) -> _CountingRotater:
        label = "dkv" if method is not None else f"{phase['name']}_kv"
        return _CountingRotater(create(group, seq_dim, method), group, counts, label)

    def in_phase(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            phase["name"] = name
            return fn(*args, **kwargs)

        return wrapped

    attention._create_rotater = counting_create
    attention._templated_ring_attention = in_phase("forward", forward)
    attention._templated_ring_attention_backward = in_phase("backward", backward)


def release_freed_memory_to_os() -> None:
    """Make glibc serve large tensors with mmap (so freeing them lowers RSS); call before spawning ranks."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))


def _trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: RSS deltas may then under-count after larger steps
        pass


def _rss_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def measure_peak_mib(step: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Run ``step`` once; return (peak memory above the level before it in MiB, seconds taken)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        _trim_heap()
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        before = _rss_kib("VmRSS") * 1024
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = _rss_kib("VmHWM") * 1024
    return (peak - before) / 2**20, time.perf_counter() - start


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Print rows as a Markdown table under ``title`` and return the text."""
    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text + "\n", flush=True)
    return text


def save_plot(path: str, draw: Callable[[object], None]) -> None:
    """Draw with matplotlib (``pip install matplotlib``) into a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure = plt.figure(figsize=(10, 4))
    draw(figure)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}", flush=True)


def save_measured_against_theory(
    path: str, bars: Sequence[tuple[str, float, float]], measured: str, theory: str, ylabel: str, title: str
) -> None:
    """A PNG at ``path`` of paired bars, ``(label, measured, theory)`` each: what a script counted beside its theory."""

    def draw(figure: object) -> None:
        axes = figure.subplots()
        positions = range(len(bars))
        axes.bar([p - 0.2 for p in positions], [b[1] for b in bars], 0.4, label=measured)
        axes.bar([p + 0.2 for p in positions], [b[2] for b in bars], 0.4, label=theory)
        axes.set_xticks(list(positions), [b[0] for b in bars])
        axes.set(ylabel=ylabel, title=title)
        axes.legend()

    save_plot(path, draw)
