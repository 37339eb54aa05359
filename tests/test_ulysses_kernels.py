"""flex_attention and flash attention under Ulysses: each kernel on whole sequences, with the mask it takes.

On CPU, FlexAttention runs forward only (torch has no CPU backward for it), so the CPU cases compare every
logit of a forward pass with one plain process, on the unfused path; on a CUDA GPU, the compiled kernels'
loss and every gradient are compared, for flex_attention and (with the ``flash_attn`` package)
flash_attention_2, under Ulysses and under the ring (which runs them on SDPA's ring or the masked ring, never
the kernel itself: their CPU training cases are in tests/test_ulysses.py).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import pytest
import torch
from distributed_harness import averaged_gradients, new_process_groups_destroyed, run_on_ranks
from model_zoo import zoo_model
from models import lm_batch, uncompiled_flex
from test_packed_training import packed_batch
from test_ulysses import ZOO_OVERRIDES, _patched

from lightning_cp.attention import ulysses
from lightning_cp.mesh import ParallelLayout, build_device_mesh
from lightning_cp.session import ContextParallelSession

CUDA = torch.cuda.is_available()
try:
    import flash_attn  # noqa: F401

    FLASH_ATTN = True
except ImportError:
    FLASH_ATTN = False


@dataclass(frozen=True)
class Case:
    model: str
    packed: bool = False
    #: The block mask built without the layer's sliding window (``"window"``) or the documents (negative controls).
    bypass: str | None = None

    @property
    def id(self) -> str:
        parts = [self.model, *(["packed"] if self.packed else [])]
        return "-".join(parts + ([f"without-{self.bypass}"] if self.bypass else []))


def _bypassed(what: str | None) -> AbstractContextManager[None]:
    """The block mask built without the window or the documents while open (negative controls)."""
    if what is None:
        return nullcontext()
    original = ulysses._flex_block_mask
    if what == "window":

        def replacement(spans, batch, length, causal, window, device):
            return original(spans, batch, length, causal, None, device)

    else:  # "documents": packed rows masked as one sequence each

        def replacement(spans, *args):
            return original(None, *args)

    return _patched(ulysses, "_flex_block_mask", replacement)


def _forward_parity(rank: int, world_size: int, case: Case, attn: str) -> dict:
    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cpu"))
    model = zoo_model(case.model, attn_implementation=attn, **ZOO_OVERRIDES.get(case.model, {}))
    batch = packed_batch() if case.packed else lm_batch(seq_len=130)
    batch.pop("labels")
    # Packed rows: transformers' own document mask, built from the restarting position ids, in the reference.
    with torch.no_grad(), uncompiled_flex():
        reference = copy.deepcopy(model)(**batch, use_cache=False).logits
        session = ContextParallelSession(mesh, data_context)
        session.prepare_model(model)
        local = dict(batch)
        with _bypassed(case.bypass), session.step(local, require_labels=False):
            logits = session.gather_outputs(model(**local, use_cache=False))["logits"]
    return {"mechanism": session.mechanism.name, "logits": logits, "reference": reference}


def _forward_parities(rank: int, world_size: int, cases: list[Case], attn: str) -> dict[str, dict]:
    results = {}
    for case in cases:
        with new_process_groups_destroyed():
            results[case.id] = _forward_parity(rank, world_size, case, attn)
    return results


#: A window shorter than the sequence (Mistral: 16 < 130) on whole and packed rows, and negative controls.
#: (Softcapping and sinks are terms of transformers' flex function, which Ulysses runs unchanged: the CUDA cases.)
FLEX_CASES = [
    Case("mistral"),
    Case("mistral", packed=True),
    Case("mistral", bypass="window"),
    Case("mistral", packed=True, bypass="documents"),
]


@pytest.fixture(scope="module")
def flex_results() -> list[dict[str, dict]]:
    return run_on_ranks(_forward_parities, FLEX_CASES, "flex_attention", timeout=900)


@pytest.mark.parametrize("case", FLEX_CASES, ids=lambda case: case.id)
def test_flex_attention_under_ulysses_gives_every_logit_of_one_process(flex_results, case):
    for by_case in flex_results:
        result = by_case[case.id]
        assert result["mechanism"] == "ulysses"  # cp_mode="auto": the heads split
        if case.bypass is None:
            torch.testing.assert_close(result["logits"], result["reference"], rtol=1e-5, atol=1e-5)
        else:
            assert (result["logits"] - result["reference"]).abs().max() > 1e-2, f"exact without the {case.bypass}"


def _training_parity(rank: int, world_size: int, name: str, attn: str, packed: bool, cp_mode: str) -> dict:
    torch.cuda.set_device(0)  # two ranks share the one GPU (gloo moves CUDA tensors)
    mesh, data_context = build_device_mesh(ParallelLayout(1, world_size, 1), torch.device("cuda"))
    model = zoo_model(name, attn_implementation=attn, **ZOO_OVERRIDES.get(name, {})).cuda()
    batch = {key: value.cuda() for key, value in (packed_batch() if packed else lm_batch(seq_len=256)).items()}
    reference = copy.deepcopy(model)
    ref_loss = reference(**batch, use_cache=False).loss
    ref_loss.backward()
    session = ContextParallelSession(mesh, data_context, cp_mode=cp_mode)
    session.prepare_model(model)
    local = dict(batch)
    with session.step(local):
        loss = model(**local, use_cache=False).loss
        loss.backward()
    return {  # the ranks' results come back on the CPU
        "mechanism": session.mechanism.name,
        "loss": loss.detach(),
        "ref_loss": ref_loss.detach(),
        "grads": averaged_gradients(model, data_context.get_group()),
        "ref_grads": {parameter_name: p.grad for parameter_name, p in reference.named_parameters()},
    }


FAMILIES = (("llama", False), ("llama", True), ("mistral", False), ("gemma2", False))


def _gpu_case(name: str, attn: str, packed: bool = False, cp_mode: str = "ulysses"):
    flash = attn.startswith("flash")
    missing = not CUDA or (flash and not FLASH_ATTN)
    reason = "needs a CUDA GPU" + (" and the flash_attn package" if flash else "")
    return pytest.param(name, attn, packed, cp_mode, marks=pytest.mark.skipif(missing, reason=reason))


#: flex_attention with gradients (CUDA has its backward), sinks included (gpt-oss, from the kernel's LSE);
#: flash_attention_2 with its own window and softcap, one document per call on packed rows; and on the ring.
GPU_CASES = [
    *(_gpu_case(name, "flex_attention", packed) for name, packed in FAMILIES),
    _gpu_case("gpt_oss", "flex_attention"),
    *(_gpu_case(name, "flash_attention_2", packed) for name, packed in FAMILIES),
    *(_gpu_case(name, "flash_attention_2", packed, "ring") for name, packed in FAMILIES),
]

#: Tolerances on (loss, gradients): fp32 for flex_attention; flash attention computes in half precision
#: (transformers casts fp32 inputs for it), and on packed rows one varlen call becomes a call per document.
TOLERANCES = {"flex_attention": (1e-5, 1e-4), "flash_attention_2": (1e-3, 2e-2)}


@pytest.mark.parametrize("name,attn,packed,cp_mode", GPU_CASES)
def test_gpu_kernels_under_cp_train_like_one_process(name, attn, packed, cp_mode):
    loss_rtol, grad_rtol = TOLERANCES[attn]
    for result in run_on_ranks(_training_parity, name, attn, packed, cp_mode, timeout=900):
        assert result["mechanism"] == cp_mode
        torch.testing.assert_close(result["loss"], result["ref_loss"], rtol=loss_rtol, atol=0)
        for parameter_name, ref in result["ref_grads"].items():
            grad = result["grads"][parameter_name]
            torch.testing.assert_close(grad, ref, rtol=grad_rtol, atol=1e-6, msg=parameter_name)
