"""The core install pulls only what the backend needs: matplotlib is the ``plot`` extra's, and without it the
backend runs while a figure says what to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)

ROOT = Path(__file__).resolve().parents[1]


def test_matplotlib_is_an_extra_not_a_core_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = lambda requirements: {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requirements}
    assert "matplotlib" not in named(project["dependencies"])
    assert "matplotlib" in named(project["optional-dependencies"]["plot"])


WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None  # as if it were not installed: importing it raises ImportError
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import sb_hf
from sb_hf.figures import pyplot
config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, attn_implementation="support_basis")
logits = LlamaForCausalLM(config).eval()(input_ids=torch.randint(0, 64, (1, 9))).logits
assert torch.isfinite(logits).all()
try:
    pyplot()
except ImportError as error:
    print("IMPORT ERROR:", error)
"""


def test_the_backend_runs_without_matplotlib_and_a_figure_says_what_to_install():
    done = subprocess.run([sys.executable, "-c", WITHOUT_MATPLOTLIB], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert 'IMPORT ERROR: sb-hf draws its figures with matplotlib, which is not installed: pip install "sb-hf[plot]"' in done.stdout
