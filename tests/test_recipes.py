"""The recipes of patches/: TRL's SFTTrainer script (patches/sft_trl.py) trains as written, with SDPA, and with
support-basis attention under `sb-hf run`, unmodified."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import script_results

RECIPE = Path(__file__).resolve().parents[1] / "patches" / "sft_trl.py"


def _args(model, output):
    return [str(RECIPE), "--model", str(model), "--max-steps", "2", "--batch-size", "2", "--max-length", "32",
            "--block-size", "200", "--output", str(output)]


@pytest.mark.real_model
def test_sft_trl_recipe_under_sb_hf_run(tiny_with_tokenizer, tmp_path, capsys):
    from sb_hf import cli
    from sb_hf.integrations.hf import attention_stats

    with attention_stats() as stats:
        code = cli.main(["run", "--threshold", "1.0", "--", *_args(tiny_with_tokenizer, tmp_path)])
    (result,) = script_results(capsys.readouterr().out)
    assert code == 0 and int(stats["pairs"]) > 0  # the training steps ran through the backend
    assert result["attn_implementation"] == "support_basis" and result["steps"] == 2 and result["finite"]


@pytest.mark.real_model
def test_sft_trl_recipe_as_written_is_untouched(tiny_with_tokenizer, tmp_path):
    done = subprocess.run([sys.executable, *_args(tiny_with_tokenizer, tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (result,) = script_results(done.stdout)
    assert result["attn_implementation"] == "sdpa" and result["steps"] == 2 and result["finite"]
