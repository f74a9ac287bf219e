"""The script-patching layer: `sb_hf.apply_support_basis()` without a model, `revert_support_basis`,
and `sb-hf run` on an unmodified training script. Every test checks which attention actually ran
(pair counts of `attention_stats`, which only the sb-hf ops fill) and undoes the patch."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

import sb_hf
from sb_hf import cli
from sb_hf.integrations.hf import attention_stats
from sb_hf.patches import is_patched
from sb_hf.patches.run import split_argv

SCRIPT = Path(__file__).parent / "fixtures" / "train_tiny.py"


@pytest.fixture(autouse=True)
def no_patch_left_behind():
    sb_hf.revert_support_basis()
    yield
    sb_hf.revert_support_basis()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Llama and Mistral folders saved with the default (sdpa) attention."""
    out = {}
    for kind in ("llama", "mistral"):
        folder = tmp_path_factory.mktemp(kind)
        tiny_model(kind).save_pretrained(folder)
        out[kind] = folder
    return out


def _ran_sb(fn) -> tuple[object, int]:
    """Result of ``fn()`` and the number of (query, key) pairs the sb-hf ops computed during it."""
    with attention_stats() as stats:
        result = fn()
    return result, int(stats["pairs"]) if "pairs" in stats else 0


def _logits(model, seed=1):
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_one_line_patch_switches_models_loaded_afterwards(saved, kind):
    plain = AutoModelForCausalLM.from_pretrained(saved[kind], dtype=torch.float32).eval()
    assert plain.config._attn_implementation == "sdpa"
    sb_hf.apply_support_basis(threshold=1.0, degree=3, kernel="chebyshev")
    assert is_patched()
    model = AutoModelForCausalLM.from_pretrained(saved[kind], dtype=torch.float32).eval()
    assert model.config._attn_implementation == "support_basis"
    assert model.config.support_basis["threshold"] == 1.0 and model.config.support_basis["degree"] == 3
    patched_logits, pairs = _ran_sb(lambda: _logits(model))
    assert pairs > 0
    # the same as switching the loaded model by hand with the same settings
    expected = _logits(sb_hf.apply_support_basis(plain, threshold=1.0, degree=3, kernel="chebyshev"))
    torch.testing.assert_close(patched_logits, expected, rtol=0, atol=0)
    assert sb_hf.revert_support_basis() is True
    again = AutoModelForCausalLM.from_pretrained(saved[kind], dtype=torch.float32)
    assert again.config._attn_implementation == "sdpa" and not hasattr(again.config, "support_basis")
    assert _ran_sb(lambda: _logits(again))[1] == 0


def test_explicit_attn_implementation_wins_unless_forced(saved):
    sb_hf.apply_support_basis()
    kept = AutoModelForCausalLM.from_pretrained(saved["llama"], attn_implementation="eager")
    assert kept.config._attn_implementation == "eager"
    assert _ran_sb(lambda: _logits(kept))[1] == 0
    sb_hf.apply_support_basis(method="as23", force=True)  # replaces the patch, never wraps twice
    forced = AutoModelForCausalLM.from_pretrained(saved["llama"], attn_implementation="eager")
    assert forced.config._attn_implementation == "as23"
    assert _ran_sb(lambda: _logits(forced))[1] > 0
    sb_hf.revert_support_basis()
    from transformers import PreTrainedModel

    assert PreTrainedModel.from_pretrained.__func__.__name__ == "from_pretrained"
    assert not hasattr(PreTrainedModel.from_pretrained.__func__, "__wrapped__")


def test_patch_covers_from_config_and_leaves_unsupported_models(saved):
    sb_hf.apply_support_basis(threshold=2.0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved["mistral"]))
    assert model.config._attn_implementation == "support_basis"
    assert _ran_sb(lambda: _logits(model))[1] > 0
    kept = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(saved["mistral"]), attn_implementation="eager")
    assert kept.config._attn_implementation == "eager"
    other = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0))
    assert other.config._attn_implementation != "support_basis" and not hasattr(other.config, "support_basis")


def test_patch_without_settings_keeps_saved_settings(saved, tmp_path):
    model = sb_hf.apply_support_basis(AutoModelForCausalLM.from_pretrained(saved["llama"]), threshold=1.7)
    model.save_pretrained(tmp_path)
    sb_hf.apply_support_basis()
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.support_basis["threshold"] == 1.7
    sb_hf.apply_support_basis(threshold=0.5)  # settings given: they win
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.support_basis["threshold"] == 0.5


def test_revert_a_model(saved):
    model = AutoModelForCausalLM.from_pretrained(saved["llama"], attn_implementation="eager").eval()
    before = _logits(model)
    sb_hf.apply_support_basis(model, threshold=1.0)
    assert model.config._attn_implementation == "support_basis"
    assert not torch.allclose(_logits(model), before)
    assert sb_hf.revert_support_basis(model) is model
    assert model.config._attn_implementation == "eager" and not hasattr(model.config, "support_basis")
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    # loaded with an sb-hf implementation: revert goes to sdpa
    direct = AutoModelForCausalLM.from_pretrained(saved["llama"], attn_implementation="support_basis")
    assert sb_hf.revert_support_basis(direct).config._attn_implementation == "sdpa"


def test_apply_support_basis_bad_input(saved):
    with pytest.raises(ValueError, match="method must be one of"):
        sb_hf.apply_support_basis(method="flash")
    with pytest.raises(ValueError, match="threshold must be"):
        sb_hf.apply_support_basis(threshold=-1)
    with pytest.raises(ValueError, match="not a transformers PreTrainedModel"):
        sb_hf.apply_support_basis(torch.nn.Linear(2, 2))
    assert not is_patched()


# ----------------------------------------------------------------------------- sb-hf run


def _run_cli(argv, capsys):
    code, pairs = _ran_sb(lambda: cli.main(argv))
    out = capsys.readouterr()
    results = [json.loads(line[len("RESULT "):]) for line in out.out.splitlines() if line.startswith("RESULT ")]
    return code, pairs, results, out.err


def test_sb_hf_run_trains_an_unmodified_script(saved, capsys):
    code, pairs, (result,), _ = _run_cli(
        ["run", "--threshold", "1.0", "--", str(SCRIPT), str(saved["llama"]), "--steps", "4"], capsys)
    assert code == 0 and pairs > 0
    assert result["attn_implementation"] == "support_basis" and result["support_basis"]["threshold"] == 1.0
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert not is_patched()  # undone when the script ends


def test_sb_hf_run_module_form_and_force(saved, capsys, tmp_path, monkeypatch):
    shutil.copy(SCRIPT, tmp_path / "tiny_trainer_module.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, pairs, (result,), _ = _run_cli(
        ["run", "--method", "sink_window", "--local-window", "5", "-m", "tiny_trainer_module", str(saved["mistral"]),
         "--steps", "1", "--attn", "eager"], capsys)
    assert code == 0 and pairs == 0 and result["attn_implementation"] == "eager"  # the script's choice kept
    code, pairs, (result,), _ = _run_cli(
        ["run", "--force", "--method", "sink_window", "--local-window", "5", "-m", "tiny_trainer_module",
         str(saved["mistral"]), "--steps", "1", "--attn", "eager"], capsys)
    assert code == 0 and pairs > 0 and result["attn_implementation"] == "sink_window"
    assert result["support_basis"]["local_window"] == 5


def test_sb_hf_run_bad_input(capsys, tmp_path):
    assert cli.main(["run"]) == 2
    assert "give a script" in capsys.readouterr().err
    assert cli.main(["run", "--", str(tmp_path / "missing.py")]) == 2
    assert "no such script" in capsys.readouterr().err
    assert cli.main(["run", "--threshold", "-2", "--", str(SCRIPT)]) == 2
    assert "threshold must be" in capsys.readouterr().err
    assert not is_patched()
    failing = tmp_path / "fails.py"
    failing.write_text("import sys\nsys.exit(3)\n")
    assert cli.main(["run", str(failing)]) == 3
    raising = tmp_path / "raises.py"
    raising.write_text("raise KeyError('from the script')\n")
    with pytest.raises(KeyError, match="from the script"):  # the script's own error, with its traceback
        cli.main(["run", str(raising)])
    assert not is_patched()


@pytest.mark.parametrize("switch", [None, "1"], ids=["hub-on", "user-offline"])
def test_sb_hf_run_leaves_the_scripts_hub_settings_alone(switch, tmp_path):
    """`sb-hf run -- script.py` sets no HF_*_OFFLINE switch: a script that loads a model from the Hub keeps its
    Hub; a user's own switch reaches it unchanged (subprocesses: huggingface_hub reads the switch once, on import)."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nimport huggingface_hub.constants as c\n"
                     "print('SWITCHES', os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_DATASETS_OFFLINE'), c.HF_HUB_OFFLINE)\n")
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    if switch is not None:
        env["HF_HUB_OFFLINE"] = switch
    proc = subprocess.run([sys.executable, "-m", "sb_hf", "run", "--", str(probe)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"SWITCHES {switch} None {switch == '1'}" in proc.stdout


def test_split_argv_keeps_the_targets_options():
    parser = cli.build_parser()._subparsers._group_actions[0].choices["run"]
    assert split_argv(parser, ["--threshold", "3", "train.py", "--threshold", "9"]) == (
        ["--threshold", "3"], ["train.py", "--threshold", "9"])
    assert split_argv(parser, ["--force", "--", "--weird.py", "-m"]) == (["--force"], ["--weird.py", "-m"])
    assert split_argv(parser, ["--degree=3", "-m", "pkg.train", "--lr", "1"]) == (["--degree=3", "-m", "pkg.train"], ["--lr", "1"])
