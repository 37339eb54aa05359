"""``lightning_cp doctor``: prove that CP is exact on *your* model, or say why it is not.

The model runs once without CP and once with CP on ``cp_size`` local processes (gloo on CPU), on the
same batch and weights, through the same path the strategies use. The report gives the loss
difference, the worst relative gradient difference per parameter group, the attention modules the
hooks saw, the CP mechanism chosen (and, for a refused model, the modes that would run it), how many
attention calls really went through it, and a verdict with the likely causes when it is not exact.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lightning_cp.attention import ledger
from lightning_cp.attention.interface import uses_attention_interface
from lightning_cp.cp_mode import attention_traits, runnable_modes, validate_cp_mode
from lightning_cp.hooks import find_attention_modules
from lightning_cp.launch import run_on_local_ranks
from lightning_cp.loss_check import closest_loss, wrong_losses
from lightning_cp.mesh import build_device_mesh, resolve_layout
from lightning_cp.mixers import switch as mixer_switch
from lightning_cp.mixers.detect import find_sequence_mixers
from lightning_cp.mixers.mode import validate_mixer_mode
from lightning_cp.sharding.batch import IGNORE_INDEX
from lightning_cp.strategies.gradients import average_replicated_gradients

if TYPE_CHECKING:
    from lightning_cp.session import ContextParallelSession

#: Known causes of inexact CP, with what to do about each.
CAUSES: dict[str, str] = {
    "local_attention": (
        "attention that never reached the ring: some attention ran on the local shard only (SDPA imported by"
        " name, an attention implementation other than 'sdpa', or a compiled layer that traced SDPA on local"
        " tensors). Call `torch.nn.functional.scaled_dot_product_attention` through the module, use"
        " attn_implementation='sdpa', and attach_cp_sdpa_hooks for compiled layers."
    ),
    "masked_attention": (
        "sliding-window attention outside transformers' attention interface, which no mode can mask (use"
        " sequences no longer than the window), or non-causal attention, which the ring would replace by plain"
        " causal attention (use cp_mode='ulysses', or turn load balancing off for bidirectional attention)."
    ),
    "mechanism_refused": (
        "the CP mode asked for cannot run this model's attention exactly (see the error); the report lists the"
        " modes that can. Pass one of them as `cp_mode=` (strategies, make_cp_batch_and_ctx, doctor --cp-mode)."
    ),
    "local_mixer": (
        "a sequence mixer that is not attention (a gated delta net, a Mamba scan, a causal convolution, a"
        " recurrence) did not go through CP, or no mixer mechanism can run it as asked (see the error). Use"
        " mixer_mode='auto' or 'gather' (strategies, make_cp_batch_and_ctx, doctor --mixer-mode)."
    ),
    "unhooked_mixing": (
        "a module mixes positions by a route lightning_cp does not see (a cumsum, a shift or a recurrence written"
        " by hand): its output differs from the plain run while its inputs did not (see `first differing"
        " module`). Run it through a mixer function transformers names (e.g. `causal_conv1d_forward`), or train"
        " this model without context parallelism."
    ),
    "missing_position_ids": "the model was called without the sharded `position_ids`; pass them.",
    "labels_shifted_after_sharding": (
        "labels shifted after sharding: the loss pairs each token of a shard with its neighbour in the shard,"
        " which after load-balanced sharding is not its successor. Shift labels before sharding (lightning_cp"
        " does it for Hugging Face labels) and compute the loss on position-aligned labels."
    ),
    "loss_not_token_correct": (
        "a loss that is a mean over this shard's labels, not a share of the whole sequence's mean. Use the"
        " model's own Hugging Face loss, or `strategy.token_correct_loss(logits, batch['labels'])`."
    ),
    "padded_sequence": (
        "a sequence length that is not a multiple of 2 * cp: lightning_cp pads it (exact), but torch's own"
        " context_parallel would silently turn load balancing off at this length."
    ),
}

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


#: The session of the CP run under way in this doctor process, for :func:`token_correct_loss`.
_cp_session: ContextParallelSession | None = None


def default_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """What a Lightning ``training_step`` usually returns: the Hugging Face model's own loss."""
    return model(**batch).loss


def token_correct_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of position-aligned ``labels`` for a ``loss_fn`` of your own, exact under CP.

    It stands for ``strategy.token_correct_loss``, which a training step calls for a loss of its own
    (the doctor has no strategy): in the doctor's CP run it is the loss of the whole sequence with this
    rank's share of the gradient; in the run without CP, the mean over the valid labels.
    """
    if _cp_session is None:
        return _cross_entropy_mean(logits, labels)
    return _cp_session.token_correct_loss(logits, labels)


@dataclass
class DoctorReport:
    """The outcome of :func:`check`."""

    exact: bool
    cp_size: int
    seq_len: int
    loss_reference: float
    loss_cp: float | None
    grad_differences: dict[str, float] = field(default_factory=dict)
    attention_modules: list[str] = field(default_factory=list)
    attention_calls: int = 0
    #: Attention calls that went through the CP mechanism.
    mechanism_calls: int = 0
    #: Which mechanism ran and why (the line the strategies print).
    mechanism: str = ""
    #: For a model refused by the mode asked for: the explicit ``cp_mode`` values that would run it.
    runnable_modes: list[str] = field(default_factory=list)
    #: For a model no CP mode can run: why (then ``runnable_modes`` is empty).
    no_mode_reason: str | None = None
    causes: list[str] = field(default_factory=list)
    error: str | None = None
    #: Sequence mixers that are not attention (gated delta nets, Mamba layers, convolutions), hooked.
    mixers: list[str] = field(default_factory=list)
    #: Mixer forwards under CP, and those whose every part went through a CP mechanism.
    mixer_calls: int = 0
    mixer_calls_through_cp: int = 0
    #: The first module (innermost, in execution order) whose CP output differs from the plain run's.
    first_divergence: str | None = None

    def render(self) -> str:
        """The report as text for a terminal."""
        lines = [f"lightning_cp doctor: cp={self.cp_size}, sequence {self.seq_len} tokens"]
        lines.append(f"  loss without CP {self.loss_reference:.6f}")
        if self.loss_cp is not None:
            relative = abs(self.loss_cp - self.loss_reference) / max(abs(self.loss_reference), 1e-12)
            lines.append(f"  loss with CP    {self.loss_cp:.6f}   (relative difference {relative:.1e})")
        if self.grad_differences:
            lines.append("  worst relative gradient difference per parameter group:")
            lines += [f"    {name:<40} {value:.1e}" for name, value in self.grad_differences.items()]
        lines.append(f"  attention modules hooked: {len(self.attention_modules)}")
        lines += [f"    {name}" for name in self.attention_modules]
        if self.mechanism:
            lines.append(f"  {self.mechanism}")
        lines.append(
            f"  attention calls under CP: {self.attention_calls}, through the CP mechanism: {self.mechanism_calls}"
        )
        if self.mixers:
            lines.append(f"  sequence mixers hooked: {len(self.mixers)}")
            lines += [f"    {name}" for name in self.mixers]
            lines.append(
                f"  mixer forwards under CP: {self.mixer_calls}, wholly through CP: {self.mixer_calls_through_cp}"
            )
        if self.first_divergence:
            lines.append(f"  first differing module: {self.first_divergence}")
        if self.error:
            lines.append(f"  CP run stopped with: {self.error}")
            if self.no_mode_reason is not None:
                lines.append(f"  no CP mode can run this model at cp={self.cp_size}: {self.no_mode_reason}")
            elif self.runnable_modes:
                runnable = ", ".join(f"cp_mode='{mode}'" for mode in self.runnable_modes)
                lines.append(f"  modes that would run this model at cp={self.cp_size}: {runnable}")
        lines.append(f"verdict: {'EXACT within tolerance' if self.exact else 'NOT EXACT'}")
        label = "note" if self.exact else "likely cause"
        lines += [f"  {label} [{cause}]: {CAUSES[cause]}" for cause in self.causes]
        return "\n".join(lines)


def synthetic_batch(vocab_size: int, seq_len: int, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens with Hugging Face labels, a third of them ignored and unevenly spread over the shards."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    labels = input_ids.clone()
    labels.view(-1)[: batch_size * seq_len // 3] = IGNORE_INDEX
    return {"input_ids": input_ids, "labels": labels}


def _parameter_group(name: str) -> str:
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or name


def _relative_grad_differences(model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, float]:
    worst: dict[str, float] = {}
    for name, param in model.named_parameters():
        if param.grad is None or name not in reference:
            continue
        ref = reference[name]
        difference = float((param.grad - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
        group = _parameter_group(name)
        worst[group] = max(worst.get(group, 0.0), difference)
    return worst


def _cross_entropy_mean(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def _vocab_size(model: nn.Module) -> int:
    """The vocabulary size in the model's Hugging Face-style ``config``, to draw the random batch's tokens."""
    vocab_size = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab_size, int):
        return vocab_size
    embeddings = [
        f"`{name}` ({module.num_embeddings} rows)"
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    ]
    raise ValueError(
        f"`{type(model).__name__}` has no `config.vocab_size`, so the doctor cannot tell below which id to draw"
        f" the random batch's tokens (its embeddings: {', '.join(embeddings) or 'none'}). Give the vocabulary"
        " size: `--vocab-size N` on the command line, `check(..., vocab_size=N)`, or pass your own `batch=`."
    )


def _check_default_loss_applies(model: nn.Module) -> None:
    """Refuse the default loss for a model whose ``forward`` takes no ``labels``: it cannot return ``.loss``."""
    parameters = inspect.signature(model.forward).parameters.values()
    if any(parameter.name == "labels" or parameter.kind is parameter.VAR_KEYWORD for parameter in parameters):
        return
    raise ValueError(
        f"`{type(model).__name__}.forward` takes no `labels`, so the doctor's default loss (a Hugging Face"
        " model's own `model(**batch).loss`) cannot run on it. Give the loss your training step computes:"
        " `check(factory, loss_fn=my_loss)`, or `--loss package.module:my_loss` on the command line, where"
        " `my_loss(model, batch)` returns `lightning_cp.doctor.token_correct_loss(logits, batch['labels'])`."
    )


def _reference_batch(batch: dict[str, torch.Tensor], shift_labels: bool) -> dict[str, torch.Tensor]:
    """The whole batch as a CP step hands it to the loss, so that both runs compute the same loss.

    Hugging Face labels are shifted (aligned with positions) and also passed as ``shift_labels``, so a
    Hugging Face model does not shift them again and a loss of your own sees aligned labels in both runs.
    """
    from lightning_cp.sharding.batch import next_token_labels as shifted

    reference = {key: value.clone() for key, value in batch.items()}
    if shift_labels and "shift_labels" not in reference:
        reference["labels"] = reference["shift_labels"] = shifted(reference["labels"])
    return reference


#: The cause each loss of :func:`lightning_cp.loss_check.wrong_losses` stands for.
_WRONG_LOSS_CAUSES = {
    "shard_mean": "loss_not_token_correct",
    "labels_shifted_in_shard": "labels_shifted_after_sharding",
    "input_ids_shifted_in_shard": "labels_shifted_after_sharding",
}


def _error_cause(message: str) -> str | None:
    for needle, cause in (
        ("Sequence mixer", "local_mixer"),
        ("mixer_mode=", "local_mixer"),
        ("mixer all-to-all", "local_mixer"),
        ("sliding window", "masked_attention"),
        ("is not causal", "masked_attention"),
        ("without `position_ids`", "missing_position_ids"),
        ("Found no self-attention modules", "local_attention"),
        ("cannot reach", "local_attention"),
        ("without any attention call going through it", "local_attention"),
        ("cannot run this model exactly", "mechanism_refused"),
        ("Ulysses cannot give each rank whole heads", "mechanism_refused"),
        ("attn_implementation=", "local_attention"),
    ):
        if needle in message:
            return cause
    return None


#: Why no CP mode runs a model whose attention CP does not reach (the ``local_attention`` refusals).
_UNREACHABLE_ATTENTION = (
    "its attention does not go through `torch.nn.functional.scaled_dot_product_attention` (called through the"
    " module attribute) or transformers' attention interface, and every CP mode (ring, Ulysses, hybrid) runs"
    " attention only through those; see the error above for the module and how to change it"
)


def _modes_after_refusal(
    error: str, modules: dict[str, nn.Module], cp_size: int, batch: dict[str, torch.Tensor], ran: str
) -> tuple[list[str], str | None]:
    """The explicit modes that would run a model refused with ``error`` under mechanism ``ran``, or why none would.

    Only a refusal about the mode (``mechanism_refused``, ``masked_attention``) or about attention that bypassed
    the mechanism (``local_attention``) is answered; for any other (missing ``position_ids``, say) the mode is
    not the question: ``([], None)``. Attention that bypassed the ring is run by Ulysses only when it comes
    through transformers' attention interface (Ulysses calls that function on whole sequences, whatever SDPA it
    calls); hand-written or hand-called attention is run by no mode.
    """
    cause = _error_cause(error)
    if cause not in ("mechanism_refused", "masked_attention", "local_attention"):
        return [], None
    traits = [attention_traits(name, module) for name, module in modules.items()]
    modes = runnable_modes(traits, cp_size, batch["input_ids"].size(1)) if traits else []
    if cause == "local_attention":
        through_interface = bool(modules) and all(uses_attention_interface(m) for m in modules.values())
        bypassed = "without any attention call going through it" in error
        modes = [m for m in modes if m == "ulysses" and ran != "ulysses" and through_interface and bypassed]
        return modes, None if modes else _UNREACHABLE_ATTENTION
    if not modes:
        return [], "ring, Ulysses and every hybrid split were each checked against its attention modules and refuse it"
    return modes, None


def _doctor_worker(
    rank: int,
    world_size: int,
    model_factory: Callable[[], nn.Module],
    batch: dict[str, torch.Tensor],
    loss_fn: LossFn,
    load_balance: bool,
    shift_labels: bool,
    cp_mode: str = "auto",
    ulysses_size: int | None = None,
    mixer_mode: str = "auto",
) -> dict[str, Any]:
    from lightning_cp.session import ContextParallelSession

    global _cp_session
    torch.manual_seed(0)
    model = model_factory()
    reference = copy.deepcopy(model)
    reference_outputs = _record_module_outputs(reference)
    reference_loss = loss_fn(reference, _reference_batch(batch, shift_labels))
    reference_loss.backward()
    reference_grads = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}

    mesh, data_context_mesh = build_device_mesh(resolve_layout(world_size, world_size, 1, 1), torch.device("cpu"))
    session = ContextParallelSession(
        mesh,
        data_context_mesh,
        load_balance=load_balance,
        shift_labels=shift_labels,
        check_batch_every_n_steps=1,
        cp_mode=cp_mode,
        ulysses_size=ulysses_size,
        mixer_mode=mixer_mode,
    )
    modules = find_attention_modules(model)
    attention_modules = list(modules)

    captured: dict[str, torch.Tensor] = {}

    def capture_logits(module: nn.Module, args: Any, output: Any) -> None:
        logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            captured["logits"] = logits.detach()

    model.register_forward_hook(capture_logits)
    cp_outputs = _record_module_outputs(model)
    result: dict[str, Any] = {"reference_loss": float(reference_loss.detach()), "attention_modules": attention_modules}
    _cp_session = session
    with ledger.counting() as calls, mixer_switch.counting() as mixer_calls:  # counts up to a failure too
        try:
            session.prepare_model(model)
            result["mixers"] = list(find_sequence_mixers(model))
            result["mechanism"] = session.describe_attention()
            local = dict(batch)
            with session.step(local):
                loss = loss_fn(model, local)
                loss.backward()
                gathered = [(name, session.gather_outputs(output)) for name, output in cp_outputs]
            divergence = _first_divergence(reference_outputs, gathered)
            if divergence is not None:
                name, difference = divergence
                kind = type(model.get_submodule(name)).__name__
                result["first_divergence"] = f"`{name}` ({kind}): relative difference {difference:.1e}"
            average_replicated_gradients(model, data_context_mesh)
            result["loss"] = float(loss.detach())
            result["grad_differences"] = _relative_grad_differences(model, reference_grads)
            if "logits" in captured and isinstance(local.get("input_ids"), torch.Tensor):
                result["fingerprints"] = wrong_losses(captured["logits"], local["labels"], local["input_ids"])
        except ValueError as err:
            result["error"] = str(err)
            modes, reason = _modes_after_refusal(str(err), modules, world_size, batch, session.mechanism.name)
            result["runnable_modes"], result["no_mode_reason"] = modes, reason
        finally:
            _cp_session = None
    result["calls"] = calls
    result["mixer_calls"] = mixer_calls
    return result


def _record_module_outputs(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Keep, in execution order (inner modules first), every submodule's sequence output (batch first)."""
    outputs: list[tuple[str, torch.Tensor]] = []
    for name, module in model.named_modules():
        if not name:
            continue

        def keep(module: nn.Module, args: Any, output: Any, name: str = name) -> None:
            first = output[0] if isinstance(output, tuple) and output else output
            if isinstance(first, torch.Tensor) and first.ndim >= 3 and first.is_floating_point():
                outputs.append((name, first.detach()))

        module.register_forward_hook(keep)
    return outputs


def _first_divergence(
    reference: list[tuple[str, torch.Tensor]], cp: list[tuple[str, torch.Tensor]], rtol: float = 1e-4
) -> tuple[str, float] | None:
    """The first module (in execution order) whose gathered CP output differs from the plain run's, and by how much."""
    for (name, expected), (cp_name, got) in zip(reference, cp, strict=False):
        if name != cp_name:
            return None  # the runs took different paths: nothing to pair
        if expected.shape != got.shape:
            continue  # e.g. rotary tables for [1, S] positions without CP, [B, S] with

        difference = float((expected - got).abs().max() / expected.abs().max().clamp(min=1e-12))
        if difference > rtol:
            return name, difference
    return None


def check(
    model_factory: Callable[[], nn.Module],
    batch: dict[str, torch.Tensor] | None = None,
    cp_size: int = 2,
    *,
    seq_len: int = 256,
    vocab_size: int | None = None,
    loss_fn: LossFn = default_loss,
    labels: str = "hf",
    load_balance: bool = True,
    cp_mode: str = "auto",
    ulysses_size: int | None = None,
    mixer_mode: str = "auto",
    rtol_loss: float = 1e-5,
    rtol_grad: float = 1e-4,
    timeout: float = 900,
) -> DoctorReport:
    """Run ``model_factory()`` without CP and with CP on ``cp_size`` local gloo ranks; report the differences.

    Args:
        model_factory: builds the model (deterministically: it is seeded with 0 on every rank); it must be
            importable by the spawned processes (a module-level function, or a ``functools.partial`` of one).
        batch: ``input_ids`` and ``labels``; by default random tokens of ``seq_len`` with a third of the
            labels ignored.
        vocab_size: the random tokens are drawn below it (default: the model's ``config.vocab_size``).
        loss_fn: ``loss_fn(model, batch) -> loss``, as your training step computes it (default: the Hugging
            Face model's own ``.loss``). Both runs give it the batch as a CP training step sees it: labels
            aligned with positions (shifted already with ``labels="hf"``); under CP, this rank's shard. A
            loss of your own returns :func:`token_correct_loss` of the logits and ``batch["labels"]``.
        labels: ``"hf"`` when the model shifts labels itself, ``"aligned"`` when they are already shifted.
        load_balance: head/tail sharding of the sequence.
        cp_mode, ulysses_size, mixer_mode: the CP mechanisms, as the strategies take them (``"auto"``: the report
            says which mechanism it chose and why).

    With the default loss or batch, the factory also runs once in this process: to check that the model
    takes ``labels``, and to read ``config.vocab_size``.
    """
    if labels not in ("hf", "aligned"):
        raise ValueError(f"`labels` must be 'hf' or 'aligned', got {labels!r}.")
    validate_cp_mode(cp_mode, ulysses_size)
    validate_mixer_mode(mixer_mode)
    if batch is None or loss_fn is default_loss:
        torch.manual_seed(0)
        model = model_factory()
        if loss_fn is default_loss:
            _check_default_loss_applies(model)
        if batch is None:
            batch = synthetic_batch(vocab_size if vocab_size is not None else _vocab_size(model), seq_len)
        del model  # freed before the ranks build theirs
    seq_len = batch["input_ids"].shape[1]
    results = run_on_local_ranks(
        _doctor_worker,
        model_factory,
        batch,
        loss_fn,
        load_balance,
        labels == "hf",
        cp_mode,
        ulysses_size,
        mixer_mode,
        world_size=cp_size,
        timeout=timeout,
    )
    return _verdict(results, cp_size, seq_len, load_balance, rtol_loss, rtol_grad)


def _verdict(
    results: list[dict[str, Any]], cp_size: int, seq_len: int, load_balance: bool, rtol_loss: float, rtol_grad: float
) -> DoctorReport:
    first = results[0]
    calls = first["calls"]
    report = DoctorReport(
        exact=False,
        cp_size=cp_size,
        seq_len=seq_len,
        loss_reference=first["reference_loss"],
        loss_cp=first.get("loss"),
        grad_differences=first.get("grad_differences", {}),
        attention_modules=first["attention_modules"],
        attention_calls=calls["attention"],
        mechanism_calls=calls["through_cp"],
        mixers=first.get("mixers", []),
        mixer_calls=first["mixer_calls"]["mixers"],
        mixer_calls_through_cp=first["mixer_calls"]["through_cp"],
        first_divergence=first.get("first_divergence"),
        mechanism=first.get("mechanism", ""),
        runnable_modes=first.get("runnable_modes", []),
        no_mode_reason=first.get("no_mode_reason"),
        error=first.get("error"),
    )
    causes: list[str] = []
    if report.error is not None:
        cause = _error_cause(report.error)
        causes += [cause] if cause else []
    if (
        report.error is None
        and report.attention_modules
        and (calls["through_cp"] < calls["attention"] or calls["through_cp"] == 0)
    ):
        causes.append("local_attention")
    if report.loss_cp is not None:
        loss_ok = all(
            abs(result["loss"] - result["reference_loss"]) <= rtol_loss * abs(result["reference_loss"])
            for result in results
        )
        grads_ok = all(value <= rtol_grad for value in report.grad_differences.values())
        report.exact = loss_ok and grads_ok and not causes
        if not report.exact and not causes:
            for result in results:
                cause = _WRONG_LOSS_CAUSES.get(closest_loss(result["loss"], result.get("fingerprints", [])) or "")
                if cause is not None and cause not in causes:
                    causes.append(cause)
        if not report.exact and not causes and report.first_divergence is not None:
            causes.append("unhooked_mixing")
    if load_balance and seq_len % (2 * cp_size):
        causes.append("padded_sequence")
    report.causes = causes
    return report


def model_from_spec(spec: str) -> nn.Module:
    """A causal LM from a ``config.json``, a local model folder or a cached hub id, with random weights.

    Random weights are enough to check exactness and need no download; attention runs through SDPA.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(spec)
    if path.is_file():
        config_dict = json.loads(path.read_text())
        model_type = config_dict.pop("model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
    else:
        config = AutoConfig.from_pretrained(spec)
    config._attn_implementation = "sdpa"
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def factory_from_spec(spec: str) -> Callable[[], nn.Module]:
    """A picklable zero-argument factory for :func:`model_from_spec`."""
    return functools.partial(model_from_spec, spec)
