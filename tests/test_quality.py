"""End-to-end quality metrics and the CLI commands on tiny models."""

import json
import math

import pytest
import torch
from conftest import VOCAB, tiny_model

from sb_hf.analysis.capture import capture_activations, save_capture
from sb_hf.cli import main
from sb_hf.quality import compare_methods, next_token_metrics


def test_next_token_metrics_match_direct_computations():
    torch.manual_seed(0)
    ids = torch.randint(0, 11, (2, 9))
    logits = torch.randn(2, 9, 11)
    other = logits + 0.3 * torch.randn(2, 9, 11)
    m = next_token_metrics(other, logits, ids)
    nll = torch.nn.functional.cross_entropy(other[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="sum")
    assert m["count"] == 16 and m["nll"] == pytest.approx(float(nll), rel=1e-6)
    p = torch.softmax(logits[:, :-1].double(), -1)
    kl = (p * (p.log() - torch.log_softmax(other[:, :-1].double(), -1))).sum()
    assert m["kl"] == pytest.approx(float(kl), rel=1e-9)
    agree = (other[:, :-1].argmax(-1) == logits[:, :-1].argmax(-1)).sum()
    assert m["agree"] == int(agree)
    same = next_token_metrics(logits, logits, ids)
    assert same["kl"] == pytest.approx(0.0, abs=1e-12) and same["agree"] == 16


def test_compare_methods_exact_settings_agree_with_exact():
    model = tiny_model("mistral")
    torch.manual_seed(3)
    blocks = [torch.randint(1, VOCAB, (1, 24)) for _ in range(2)]
    methods = [("support_basis", {"threshold": 0.0}), ("sink_window", {"sinks": 0, "local_window": 64}),
               ("support_basis", {"threshold": 1.0, "degree": 2})]
    results = compare_methods(model, blocks, methods, progress=False)
    exact = results[0]
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        nll = sum(float(torch.nn.functional.cross_entropy(model(input_ids=b).logits[0, :-1], b[0, 1:], reduction="sum"))
                  for b in blocks)
    assert exact.perplexity == pytest.approx(math.exp(nll / 46), rel=1e-5)
    for r in results[1:3]:
        assert r.kl_from_exact == pytest.approx(0.0, abs=1e-7) and r.top1_agreement == 1.0
        assert r.perplexity == pytest.approx(exact.perplexity, rel=1e-5) and r.exact_pair_share == 1.0
    assert results[3].kl_from_exact > 1e-10 and results[3].exact_pair_share < 1.0
    assert model.config._attn_implementation == "sdpa"


@pytest.fixture
def capture_file(tmp_path):
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 40))
    path = tmp_path / "capture.safetensors"
    save_capture(capture_activations(model, ids), path)
    return path


def test_cli_sweep_and_inspect_on_a_capture(capture_file, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--capture", str(capture_file), "--methods", "support_basis,as23,sink_window",
                 "--thresholds", "0,1.0", "--degrees", "2", "--windows", "8", "--matrix-rows", "4", "--output", str(out)])
    assert code == 0
    results = json.loads((out / "sweep.json").read_text())["results"]
    assert [r["method"] for r in results] == ["support_basis", "support_basis", "as23", "sink_window"]
    assert results[0]["output_error"] < 1e-5 and results[0]["exact_pair_share"] == 1.0
    assert "| as23 |" in capsys.readouterr().out

    out = tmp_path / "inspect"
    assert main(["inspect", "--capture", str(capture_file), "--output", str(out)]) == 0
    for name in ("distributions.png", "distributions.json", "distributions.csv", "summary.md"):
        assert (out / name).stat().st_size > 0


def test_cli_reports_bad_input(capture_file, tmp_path, capsys):
    code = main(["sweep", "--capture", str(capture_file), "--methods", "bogus", "--output", str(tmp_path)])
    assert code == 2 and "unknown method" in capsys.readouterr().err
    code = main(["inspect", "--capture", str(tmp_path / "missing.safetensors"), "--output", str(tmp_path)])
    assert code == 2
