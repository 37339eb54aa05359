"""What a CP training process does around each micro-batch; shared by the Trainer and Fabric strategies.

Per micro-batch: check (now and then) that the CP group holds one batch, shift labels while the
sequence is still whole, shard the batch, count the valid labels over the data × context ranks, and
keep ring attention switched on across forward and backward. Hugging Face models' losses are made
token-correct here, so a ``training_step`` that returns ``model(**batch).loss`` needs no change; the
first training step's loss is compared with losses that are wrong under CP (``loss_check``).
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from lightning_cp.attention.switch import ring_attention, ulysses_attention
from lightning_cp.attention.transformer_engine import (
    set_te_context_parallel_group,
    te_context_parallel_modules,
    uses_transformer_engine_attention,
)
from lightning_cp.attention.ulysses import UlyssesExchange
from lightning_cp.chunked_loss import HiddenStatesForLoss
from lightning_cp.consistency import check_same_batch
from lightning_cp.cp_mode import Mechanism, attention_traits, choose_mechanism, validate_cp_mode
from lightning_cp.hooks import attach_context_parallel_hooks, attach_cp_sdpa_hooks, find_attention_modules
from lightning_cp.loss import count_label_tokens, token_loss_sum
from lightning_cp.loss_check import LossWatch
from lightning_cp.memory import offload_activations as offloading_saved_tensors
from lightning_cp.mesh import (
    CONTEXT_PARALLEL,
    DATA_PARALLEL,
    TENSOR_PARALLEL,
    ContextParallelGroups,
    split_context_parallel,
)
from lightning_cp.mixers.detect import mixer_traits
from lightning_cp.mixers.exchange import MixerExchange, batch_exchange
from lightning_cp.mixers.heads import route_loaded_mixer_functions
from lightning_cp.mixers.hooks import apply_mixer_plan, attach_mixer_hooks, refuse_mixers_with_transformer_engine
from lightning_cp.mixers.mode import MixerPlan, choose_mixer_mechanisms, validate_mixer_mode
from lightning_cp.mixers.switch import mixers_on
from lightning_cp.rank_errors import lost_a_peer
from lightning_cp.sharding.batch import IGNORE_INDEX, next_token_labels, primary_input_key, shard_cp_batch
from lightning_cp.sharding.packing import PackedLayout, gather_packed, is_packed, plan_packed_batch, shard_packed_batch
from lightning_cp.sharding.sequence import gather_sequence
from lightning_cp.sharding.te_batch import make_cp_batch_for_te, one_document_per_row, padded_packed_batch
from lightning_cp.sharding.ulysses import (
    document_spans,
    gathered_order,
    held_packed_positions,
    held_positions,
    padding_spans,
    ring_layout,
)
from lightning_cp.validation import check_tensor_parallel_heads
from lightning_cp.watchdog import TerminatedBySignal


@dataclass
class ShardedStep:
    """What is known about the micro-batch being processed under CP."""

    seq_len: int
    padded_len: int
    batch_size: int
    #: Valid (non-ignored) labels of this micro-batch over all data × context ranks, or ``None``.
    label_count: torch.Tensor | None
    #: The documents of a packed micro-batch (attention is then masked per document).
    layout: PackedLayout | None = None
    #: Whether the micro-batch went to Transformer Engine in THD format (TE runs its own ring).
    thd: bool = False


class ContextParallelSession:
    """Shards batches, runs ring attention and makes losses token-correct for one process.

    Args:
        device_mesh: the mesh with a ``"context_parallel"`` dimension.
        data_context_mesh: the flattened data × context mesh: losses and gradients are combined over it.
        load_balance: head/tail sharding, which evens out causal-attention work across CP ranks.
        rotate_method: how key/value shards travel round the ring, ``"allgather"`` or ``"alltoall"``.
        shift_labels: ``True`` when batches carry Hugging Face style labels (the model shifts them);
            they are shifted before sharding. ``False`` when labels are already aligned with positions.
        padding_token_id: id padded into ``input_ids`` to reach a multiple of ``2 * cp``.
        check_batch_every_n_steps: compare the CP group's batches on every n-th micro-batch (default:
            every one; it costs one all-gather of six numbers); 0 turns the check off.
        transformer_engine: the model's attention is Transformer Engine's: it gets the CP group at setup
            and every batch in THD format (packed or not; a plain row is one document), and torch's SDPA
            ring stays off; ``None`` decides per model (TE attention modules present or not).
        offload_activations: on CUDA, keep tensors saved for backward in pinned host memory while the
            context is open (see :mod:`lightning_cp.memory`).
        cp_mode: the CP mechanism, ``"auto"``, ``"ring"``, ``"ulysses"`` or ``"hybrid"``
            (see :mod:`lightning_cp.cp_mode`); ``"auto"`` decides per model in :meth:`prepare_model`.
        ulysses_size: the Ulysses group size of ``cp_mode="hybrid"``.
        mixer_mode: the mechanism of sequence mixers that are not attention, ``"auto"``, ``"all_to_all"``,
            ``"gather"`` or ``"state_passing"`` (see :mod:`lightning_cp.mixers.mode`); ``"auto"`` decides per layer.
    """

    def __init__(
        self,
        device_mesh: DeviceMesh,
        data_context_mesh: DeviceMesh,
        *,
        load_balance: bool = True,
        rotate_method: str = "allgather",
        shift_labels: bool = True,
        padding_token_id: int = 0,
        check_batch_every_n_steps: int = 1,
        transformer_engine: bool | None = None,
        offload_activations: bool = False,
        cp_mode: str = "auto",
        ulysses_size: int | None = None,
        mixer_mode: str = "auto",
    ) -> None:
        validate_cp_mode(cp_mode, ulysses_size)
        validate_mixer_mode(mixer_mode)
        self.device_mesh = device_mesh
        self.cp_mesh = device_mesh[CONTEXT_PARALLEL]
        self.data_context_mesh = data_context_mesh
        self.load_balance = load_balance
        self.rotate_method = rotate_method
        self.shift_labels = shift_labels
        self.padding_token_id = padding_token_id
        self.check_batch_every_n_steps = check_batch_every_n_steps
        self.transformer_engine = transformer_engine
        self.offload_activations = offload_activations
        self.cp_mode = cp_mode
        self.ulysses_size = ulysses_size
        self.mixer_mode = mixer_mode
        self._attention_hooked = True
        #: The mechanism of every sequence mixer, chosen by :meth:`prepare_model` (none until then).
        self.mixer_plan = MixerPlan({}, {}, {})
        #: The last error :meth:`report_failure` wrote a line about (so that it is not reported twice).
        self.reported: BaseException | None = None
        #: The first SIGINT / SIGTERM this rank heard (set by the strategy to its watchdog's; none by default).
        self.received_signal: Callable[[], int | None] = lambda: None
        #: The mechanism chosen by :meth:`prepare_model` (the ring until a model is prepared).
        self.mechanism = Mechanism("ring", 1, "no model prepared")
        self._groups: ContextParallelGroups | None = None
        self.current: ShardedStep | None = None
        self._prepared: set[int] = set()
        self._context: ExitStack | None = None
        self._batches_seen = 0
        self._loss_watch: LossWatch | None = None
        self._loss_checked = False

    # ----------------------------------------------------------------------------------- model
    def prepare_model(self, module: nn.Module) -> list[str]:
        """Make ``module``'s attention run under CP and wrap Hugging Face losses (once per module).

        Transformer Engine attention (detected first, unless ``transformer_engine`` was given) gets the
        CP group and runs its own ring; any other attention is hooked to run through the SDPA ring.
        Returns the names of the modules prepared.
        """
        if self.transformer_engine is None:
            self.transformer_engine = uses_transformer_engine_attention(module)
        check_tensor_parallel_heads(module, self.device_mesh[TENSOR_PARALLEL].size())
        if self.transformer_engine:
            refuse_mixers_with_transformer_engine(module)
            if self.cp_mode not in ("auto", "ring"):
                raise ValueError(
                    f"cp_mode={self.cp_mode!r} with Transformer Engine attention: TE runs its own ring under CP."
                    " Use cp_mode='auto' or 'ring'."
                )
            return self._prepare_te_model(module)
        names = attach_context_parallel_hooks(module)
        mixers = attach_mixer_hooks(module)
        if not names and not mixers:
            raise ValueError(
                f"Found no self-attention modules or sequence mixers in `{type(module).__name__}` (modules named"
                " `self_attn`, `*Attention` classes with an `is_causal` attribute, Transformer Engine attention,"
                " gated delta nets, Mamba layers, causal convolutions). Context parallelism needs attention that"
                " runs through `F.scaled_dot_product_attention`; build Hugging Face models with"
                " `attn_implementation='sdpa'`."
            )
        if id(module) not in self._prepared:
            self._attention_hooked = bool(names)
            self._choose_mechanism(module)
            self._choose_mixer_mechanisms(mixers)
            # Both model fixes at setup: masks dropped under CP, and SDPA kept out of compiled graphs.
            attach_cp_sdpa_hooks(module, self.cp_mesh)
            self._wrap_hf_losses(module)
        return names + list(mixers)

    def _choose_mixer_mechanisms(self, mixers: dict[str, nn.Module]) -> None:
        """Pick each sequence mixer's mechanism (:func:`~lightning_cp.mixers.mode.choose_mixer_mechanisms`)."""
        traits = [mixer_traits(name, mixer) for name, mixer in mixers.items()]
        self.mixer_plan = choose_mixer_mechanisms(traits, self.cp_mesh.size(), self.mixer_mode)
        apply_mixer_plan(mixers, self.mixer_plan)

    def _choose_mechanism(self, module: nn.Module) -> None:
        """Pick the mechanism for ``module`` (:func:`~lightning_cp.cp_mode.choose_mechanism`) and make its groups.

        Every rank decides from the same model, so all agree; the hybrid's process groups are created here,
        by every rank of the CP group together.
        """
        tensor_parallel = self.device_mesh[TENSOR_PARALLEL].size()
        traits = [attention_traits(name, m, tensor_parallel) for name, m in find_attention_modules(module).items()]
        self.mechanism = choose_mechanism(traits, self.cp_mesh.size(), self.cp_mode, self.ulysses_size)
        if self.mechanism.name != "ring":
            self._groups = split_context_parallel(self.cp_mesh, self.mechanism.ulysses_size)

    def describe_attention(self) -> str:
        """One line for the logs: which mechanism runs attention and why (ring rotation included), and the mixers'."""
        if self.transformer_engine:
            return "attention by Transformer Engine's own ring (TE attention modules)"
        if not self._attention_hooked:
            line = "no attention modules"
        else:
            line = self.mechanism.describe(self.cp_mesh.size())
            line = line if self.mechanism.name == "ulysses" else f"{line}; ring rotation {self.rotate_method}"
        mixers = self.mixer_plan.describe(self.cp_mesh.size())
        return f"{line}; {mixers}" if mixers else line

    def _prepare_te_model(self, module: nn.Module) -> list[str]:
        """Give every Transformer Engine attention module the CP group (TE runs the ring) and wrap HF losses, once."""
        if id(module) not in self._prepared:
            set_te_context_parallel_group(module, self.cp_mesh.get_group())
            self._wrap_hf_losses(module)
        return list(te_context_parallel_modules(module))

    def _wrap_hf_losses(self, module: nn.Module) -> None:
        """Make the loss of every Hugging Face model inside ``module`` token-correct under CP."""
        for submodule in module.modules():
            if _is_hf_model(submodule):
                submodule.loss_function = self._token_correct_hf_loss(_hf_loss_function(submodule))
        self._prepared.add(id(module))

    def _token_correct_hf_loss(self, loss_function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def context_parallel_loss(
            logits: torch.Tensor,
            labels: torch.Tensor,
            vocab_size: int,
            num_items_in_batch: torch.Tensor | None = None,
            ignore_index: int = IGNORE_INDEX,
            shift_labels: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> torch.Tensor:
            step = self.current
            if step is None or step.label_count is None:
                return loss_function(
                    logits=logits,
                    labels=labels,
                    vocab_size=vocab_size,
                    num_items_in_batch=num_items_in_batch,
                    ignore_index=ignore_index,
                    shift_labels=shift_labels,
                    **kwargs,
                )
            # Under CP the labels are aligned with positions already: the model must not shift them again.
            share = loss_function(
                logits=logits,
                labels=labels,
                vocab_size=vocab_size,
                num_items_in_batch=step.label_count,
                ignore_index=ignore_index,
                shift_labels=labels if shift_labels is None else shift_labels,
                **kwargs,
            )
            return self.globalize_loss(share)

        return context_parallel_loss

    def globalize_loss(self, share: torch.Tensor) -> torch.Tensor:
        """Turn this rank's loss share (local sum / global count) into the loss trainers expect.

        The value is the loss of the whole global batch (the same on every rank, so logging it is
        right); the gradient is the share's, scaled by the number of data × context ranks because
        gradient reduction averages over them.
        """
        total = share.detach().clone()
        dist.all_reduce(total, group=self.data_context_mesh.get_group())
        if self._loss_watch is not None:
            self._loss_watch.record_token_correct(total)
        ranks = self.data_context_mesh.size()
        return total + ranks * (share - share.detach())

    def token_correct_loss(self, logits: torch.Tensor | HiddenStatesForLoss, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of position-aligned ``labels`` under CP, as :meth:`globalize_loss` describes."""
        count = self.current.label_count if self.current is not None else None
        if count is None:
            count = count_label_tokens(labels, self.data_context_mesh)
        return self.globalize_loss(token_loss_sum(logits, labels) / count.clamp(min=1))

    def watch_loss(self, modules: Iterable[nn.Module], batch: Mapping[str, Any]) -> None:
        """Until :meth:`check_loss` or :meth:`finish`, keep what the first training step needs to judge its loss.

        Call it after sharding ``batch``; it does nothing once a loss was checked, or without labels.
        Hooks on ``modules`` and the Hugging Face models inside them keep the logits.
        """
        labels = batch.get("labels")
        if self._loss_checked or self.current is None or not isinstance(labels, torch.Tensor):
            return
        watched = [sub for module in modules for sub in module.modules() if sub is module or _is_hf_model(sub)]
        input_ids = batch.get("input_ids")
        self._loss_watch = LossWatch(
            watched,
            labels,
            input_ids if isinstance(input_ids, torch.Tensor) else None,
            self.current.label_count,
            self.data_context_mesh.size(),
        )

    def check_loss(self, loss: torch.Tensor | None, *, model_loss: str, helper: str) -> str | None:
        """Judge the watched step's loss (see :class:`~lightning_cp.loss_check.LossWatch`) once; stop watching.

        Returns the warning to show (what is wrong and what to call instead), or ``None`` when the loss
        is right, when no step was watched, or when there is no loss to judge. No collectives.
        """
        watch, self._loss_watch = self._loss_watch, None
        if watch is None:
            return None
        watch.close()
        self._loss_checked = True
        return None if loss is None else watch.check(loss, model_loss=model_loss, helper=helper)

    # ----------------------------------------------------------------------------------- batches
    def shard(self, batch: MutableMapping[str, Any], *, require_labels: bool) -> ShardedStep:
        """Replace the contents of ``batch`` with this rank's shard, in place; return what was done."""
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                "Context parallelism needs each batch to be a dict (e.g. with `input_ids` and `labels`), got"
                f" {type(batch).__name__}. Return dicts from the dataset or collate function."
            )
        if self.check_batch_every_n_steps and self._batches_seen % self.check_batch_every_n_steps == 0:
            check_same_batch(batch, self.cp_mesh, self._batches_seen)
        self._batches_seen += 1
        source = dict(batch)
        if self.transformer_engine and not is_packed(source):
            source = one_document_per_row(source)  # TE attention runs only on THD batches under CP
        if is_packed(source):
            local, layout = self._shard_packed(source, require_labels)
            padded_len = layout.padded_len
        else:
            layout = None
            if self.shift_labels and isinstance(source.get("labels"), torch.Tensor) and "shift_labels" not in source:
                source["labels"] = next_token_labels(source["labels"])
            local, padded_len = shard_cp_batch(
                source,
                self.cp_mesh.size(),
                self.cp_mesh.get_local_rank(),
                load_balance=self.load_balance,
                padding_token_id=self.padding_token_id,
                require_labels=require_labels,
            )
        thd = layout is not None and bool(self.transformer_engine)
        label_key = "shift_labels" if isinstance(local.get("shift_labels"), torch.Tensor) else "labels"
        label_count = None
        if isinstance(local.get(label_key), torch.Tensor):
            # No `shift_labels` key is added: models without **kwargs would refuse it, and the wrapped
            # Hugging Face loss already treats `labels` as aligned (see `_token_correct_hf_loss`).
            label_count = count_label_tokens(local[label_key], self.data_context_mesh)
        primary = source[primary_input_key(source)]
        batch.clear()
        batch.update(local)
        self.current = ShardedStep(primary.size(1), padded_len, primary.size(0), label_count, layout, thd)
        return self.current

    def _shard_packed(self, source: dict[str, Any], require_labels: bool) -> tuple[dict[str, Any], PackedLayout]:
        """Shard a packed batch: per document for the masked ring, or into TE's THD format."""
        te = bool(self.transformer_engine)  # TE's THD partitioning is always load balanced
        source, layout = plan_packed_batch(
            source,
            self.cp_mesh.size(),
            te or self.load_balance,
            require_labels=require_labels,
            shift_labels=self.shift_labels,
            whole_documents=not te,
        )
        if te:
            padded = padded_packed_batch(source, layout, self.padding_token_id)
            thd = make_cp_batch_for_te(self.cp_mesh, padded, padding_token_id=self.padding_token_id)
            thd["max_seqlen"] = int(thd["max_seqlen"])  # TE's `max_seqlen_q` / `max_seqlen_kv` are ints
            return thd, layout
        return shard_packed_batch(
            source, layout, self.cp_mesh.get_local_rank(), padding_token_id=self.padding_token_id
        ), layout

    def open(self) -> None:
        """Switch ring attention on (restricted to the SDPA kernels the ring supports) until :meth:`close`."""
        self.close()
        assert self.current is not None, "shard a batch before opening the CP context"
        route_loaded_mixer_functions()  # mixers of a model not prepared here stop instead of mixing one shard
        stack = ExitStack()
        if not self.current.thd:  # Transformer Engine's attention runs its own ring
            stack.enter_context(self._attention_context(self.current))
        if self.mixer_plan.mechanisms:
            stack.enter_context(mixers_on(self._mixer_exchange(self.current)))
        if self.offload_activations:
            stack.enter_context(offloading_saved_tensors(torch.device(self.cp_mesh.device_type)))
        self._context = stack

    def _attention_context(self, step: ShardedStep) -> AbstractContextManager[None]:
        """The context that runs this micro-batch's attention by the chosen mechanism."""
        span = step.padded_len if step.layout is None else step.layout.longest_document
        return attention_context(
            self.mechanism.name,
            self.cp_mesh,
            self._groups,
            seq_len=step.seq_len,
            padded_len=step.padded_len,
            layout=step.layout,
            load_balance=self.load_balance,
            rotate_method=self.rotate_method,
            global_seq_len=span,
        )

    def _mixer_exchange(self, step: ShardedStep) -> MixerExchange:
        """How this micro-batch's shards make up the original rows (Note [mixer sequence order])."""
        return batch_exchange(
            self.cp_mesh.get_group(),
            self.cp_mesh.size(),
            self.cp_mesh.get_local_rank(),
            seq_len=step.seq_len,
            padded_len=step.padded_len,
            load_balance=self.load_balance,
            layout=step.layout,
        )

    def close(self) -> None:
        """Switch ring attention off and forget the current micro-batch; safe to call twice."""
        if self._context is not None:
            context, self._context = self._context, None
            context.close()

    def finish(self) -> ShardedStep | None:
        """Close the context and return the finished micro-batch's record."""
        self.close()
        if self._loss_watch is not None:
            self._loss_watch.close()
            self._loss_watch = None
        step, self.current = self.current, None
        return step

    @contextmanager
    def step(
        self, batch: MutableMapping[str, Any], *, require_labels: bool = True
    ) -> Iterator[MutableMapping[str, Any]]:
        """Shard ``batch`` (in place) and keep ring attention on for the body: forward *and* backward.

        An exception in the body switches ring attention off and is reported with this rank's place
        in the mesh (:meth:`report_failure`) before it propagates.
        """
        try:
            self.shard(batch, require_labels=require_labels)
            self.open()
            yield batch
        except BaseException as error:
            self.report_failure(error)
            raise
        finally:
            self.finish()

    def report_failure(self, error: BaseException, what: str | None = None) -> None:
        """Write to stderr which rank failed and how, so a multi-process log says where a job died.

        A rank that only lost a peer in a collective says so instead of claiming the failure; Ctrl-C
        (``KeyboardInterrupt``) is reported as the interruption it is. ``what`` replaces the description.
        A rank blocked in a collective when SIGINT / SIGTERM came (:attr:`received_signal`) loses the peers
        that stopped at it, and says it was the signal.
        """
        mesh = self.device_mesh
        place = (
            f"rank {dist.get_rank()} (data-parallel rank {mesh.get_local_rank(DATA_PARALLEL)},"
            f" context-parallel rank {self.cp_mesh.get_local_rank()})"
        )
        message = str(error)
        self.reported = error
        signum: int | None = None  # the signal that ended this rank, however it reached it
        if isinstance(error, KeyboardInterrupt):
            signum = signal.SIGINT
        elif isinstance(error, TerminatedBySignal):
            signum = error.signum
        elif lost_a_peer(error) and self.received_signal() is not None:
            # Blocked in a collective when the signal came, this rank lost the peers that stopped at it.
            signum = self.received_signal()
        if what is not None:
            pass
        elif signum == signal.SIGINT:
            what = f"was interrupted (Ctrl-C, SIGINT): the job ends with exit code {128 + signal.SIGINT} (128 + SIGINT)"
        elif signum is not None:
            name, code = signal.Signals(signum).name, 128 + signum
            what = f"received {name}: training stops, and the job ends with exit code {code} (128 + {name})"
        elif lost_a_peer(error):
            what = (
                "lost a peer in a collective: another rank failed or died (its error, if it wrote one, is in the log)"
            )
        else:
            what = f"failed: {type(error).__name__}" + (f": {message}" if message else "")
        print(f"lightning_cp: {place} {what}", file=sys.stderr, flush=True)

    def gather_outputs(self, output: Any) -> Any:
        """Gather sequence-sharded outputs (a tensor, or ``logits`` of a dict/model output) to full length."""
        step = self.current
        if step is None:
            return output
        if isinstance(output, torch.Tensor):
            return self._gather(output, step)
        if isinstance(output, MutableMapping) and isinstance(output.get("logits"), torch.Tensor):
            output["logits"] = self._gather(output["logits"], step)
        return output

    def _gather(self, tensor: torch.Tensor, step: ShardedStep) -> torch.Tensor:
        if step.thd or tensor.ndim < 2 or tensor.size(1) * self.cp_mesh.size() != step.padded_len:
            return tensor
        if step.layout is not None:
            return gather_packed(tensor, step.layout, self.cp_mesh, seq_dim=1)
        full = gather_sequence(tensor, self.cp_mesh, 1, self.load_balance)
        return full.narrow(1, 0, step.seq_len)


def attention_context(
    mechanism: str,
    cp_mesh: DeviceMesh,
    groups: ContextParallelGroups | None,
    *,
    seq_len: int,
    padded_len: int,
    layout: PackedLayout | None,
    load_balance: bool,
    rotate_method: str,
    global_seq_len: int | None,
) -> AbstractContextManager[None]:
    """The context that runs one micro-batch's attention by ``mechanism`` over ``cp_mesh``.

    The batch was sharded for the whole CP group (head/tail or contiguous, packed or not); Ulysses and
    the hybrid learn from the layout in which order their group's shards come (:mod:`lightning_cp.sharding.ulysses`).
    ``groups`` comes from :func:`~lightning_cp.mesh.split_context_parallel` (not needed for the ring).
    """
    padding = padded_len - seq_len if layout is None else 0
    if mechanism == "ring":
        return ring_attention(
            cp_mesh,
            load_balance=load_balance,
            rotate_method=rotate_method,
            global_seq_len=global_seq_len,
            documents=layout,
            padding=padding,
        )
    assert groups is not None
    if layout is None:
        held = held_positions(padded_len, cp_mesh.size(), load_balance, groups.ulysses_cp_ranks)
    else:
        held = held_packed_positions(layout, groups.ulysses_cp_ranks)
    if mechanism == "ulysses":
        spans = document_spans(layout) if layout is not None else padding_spans(seq_len, padded_len)
        exchange = UlyssesExchange(groups.ulysses, gathered_order(held), spans)
        return ulysses_attention(exchange, global_seq_len=global_seq_len, documents=layout)
    assert groups.ring_mesh is not None
    return ring_attention(
        groups.ring_mesh,
        load_balance=load_balance,
        rotate_method=rotate_method,
        global_seq_len=global_seq_len,
        documents=None if layout is None else ring_layout(layout, groups.ulysses.size),
        ulysses=UlyssesExchange(groups.ulysses, gathered_order(held)),
        padding=padding,
    )


def _is_hf_model(module: nn.Module) -> bool:
    from transformers import PreTrainedModel

    return isinstance(module, PreTrainedModel)


def _hf_loss_function(model: nn.Module) -> Callable[..., torch.Tensor]:
    """The function ``model.loss_function`` stands for, found as Hugging Face finds it, without its warning.

    Reading HF's ``loss_function`` property on a model without a known ``loss_type`` warns once per
    process (``loss_type=None ... unrecognized``): every base model is such a model (the ``LlamaModel``
    inside ``LlamaForCausalLM``), and runs without CP never read the property there, as base models
    compute no loss. HF falls back to the causal-LM loss, and so does this.
    """
    from transformers.loss.loss_utils import LOSS_MAPPING

    assigned = vars(model).get("_loss_function")  # set through the property's setter
    if assigned is not None:
        return assigned
    return LOSS_MAPPING.get(getattr(model, "loss_type", None), LOSS_MAPPING["ForCausalLM"])
