"""The examples run as the README says, and CI runs the README's test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout + result.stderr


@pytest.mark.parametrize("example", ["trainer_llama_cp.py", "fabric_llama_cp.py", "packed_sequences_cp.py"])
@pytest.mark.slow  # a fresh launch of an example
def test_lightning_examples_train_and_print_losses(example):
    log = _run(f"examples/{example}", "--steps", "3", "--seq-len", "256")
    losses = [float(v) for v in re.findall(r"step \d+: loss ([0-9.]+)", log)]
    assert len(losses) == 3
    assert "LeafSpec" not in log, "Lightning's pytree deprecation is silenced on every rank (issue 26)"


@pytest.mark.slow  # a fresh launch of an example
def test_functional_example_matches_cp1():
    log = _run("examples/functional_llama_cp.py", "--steps", "2", "--seq-len", "128")
    difference = float(re.search(r"largest weight difference after 2 SGD steps: (\S+)", log).group(1))
    assert difference < 1e-5


#: Runs an example's ``--help`` as ``python examples/X.py --help`` would, then names the heavy modules it imported.
_HELP_AND_HEAVY_IMPORTS = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
sys.path.insert(0, sys.argv[0].rpartition("/")[0])
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit:
    pass
print("heavy modules imported:", sorted({"torch", "lightning", "transformers"} & set(sys.modules)))
"""


@pytest.mark.parametrize(
    "example", ["trainer_llama_cp.py", "fabric_llama_cp.py", "functional_llama_cp.py", "packed_sequences_cp.py"]
)
def test_examples_explain_themselves_without_importing_torch(example):
    log = _run("-c", _HELP_AND_HEAVY_IMPORTS, f"examples/{example}")
    assert "usage:" in log
    assert "heavy modules imported: []" in log, log
    # cp_mode='auto' runs the examples' Llama by Ulysses: no help text may say the ring runs it (issue 26)
    assert "as a ring" not in log and "in the ring," not in log and "keeps ring attention" not in log


def test_ci_runs_the_readme_test_command():
    ci_command = (ROOT / ".ci/run").read_text().strip().splitlines()[-1]
    assert ci_command in (ROOT / "README.md").read_text()
