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


def _run(tmp_path, name, results, tokens=2048, exact_ppl=20.0):
    rows = [{"method": "exact", "settings": {}, "perplexity": exact_ppl, "kl_from_exact": 0.0, "top1_agreement": 1.0,
             "exact_pair_share": 1.0, "seconds": 1.0, "label": ""}]
    for method, label, share, ppl in results:
        rows.append({"method": method, "settings": {}, "perplexity": ppl, "kl_from_exact": 0.01, "top1_agreement": 0.9,
                     "exact_pair_share": share, "seconds": 1.0, "label": label})
    path = tmp_path / name
    path.write_text(json.dumps({"model": None, "text": "news.txt", "second_half": True, "tokens": tokens,
                                "sequences": 1, "results": rows}))
    return path


def test_frontier_groups_series_and_plots(tmp_path, capsys):
    from sb_hf.quality import frontier_series

    a = _run(tmp_path, "a.json", [("sink_window", "", 0.4, 21.0), ("sink_window", "", 0.2, 23.0),
                                  ("support_basis", "runs/cal/budget_0.1/support_basis.json", 0.3, 20.5)])
    b = _run(tmp_path, "b.json", [("support_basis", "runs/cal/budget_0.05/support_basis.json", 0.35, 20.2),
                                  ("support_basis", "other.json", 0.5, 20.1)])
    series = frontier_series([r for p in (a, b) for r in json.loads(p.read_text())["results"]])
    assert list(series) == ["sink_window", "support_basis runs/cal", "support_basis ."]
    assert [r["exact_pair_share"] for r in series["sink_window"]] == [0.2, 0.4]  # sorted by cost
    assert [r["exact_pair_share"] for r in series["support_basis runs/cal"]] == [0.3, 0.35]  # budgets of one folder
    out = tmp_path / "frontier.png"
    assert main(["frontier", str(a), str(b), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    other = _run(tmp_path, "c.json", [("sink_window", "", 0.4, 21.0)], tokens=8192, exact_ppl=19.0)
    assert main(["frontier", str(a), str(other), "--output", str(out)]) == 2
    assert "different tokens" in capsys.readouterr().err
    assert main(["frontier", str(a), "--goal", "loss=1", "--output", str(out)]) == 2
    assert "--goal keys" in capsys.readouterr().err


@pytest.mark.real_model
def test_cli_compare_block_support_points(tiny_with_tokenizer, tmp_path, capsys):
    """`sb-hf compare --methods block_support --gammas ...`: one point per gamma, the op at every length (exact_below
    0); gamma 1 keeps every candidate block exact (exact attention's logits), gamma 0 none."""
    code = main(["compare", "--model", str(tiny_with_tokenizer), "--tokens", "400", "--methods", "block_support,sink_window",
                 "--gammas", "0,1", "--windows", "64", "--output", str(tmp_path)])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    block = {r["settings"]["block"]["gamma"]: r for r in rows if r["method"] == "block_support"}
    assert [r["method"] for r in rows] == ["exact", "sink_window", "block_support", "block_support"]
    assert all(r["settings"]["block"]["exact_below"] == 0 for r in block.values())
    assert block[1]["exact_pair_share"] == pytest.approx(1.0) and block[1]["kl_from_exact"] < 1e-6
    assert block[0]["exact_pair_share"] < 0.9
    assert "selection" not in block[0]["settings"]["block"]  # (the op's default, pooled)


@pytest.mark.real_model
def test_cli_compare_block_support_strictly_causal(tiny_with_tokenizer, tmp_path):
    """`--selection prefix` scores block support with the strictly causal selection: the settings say so, and the
    scores differ from the default pooled selection's at the same gamma."""
    scores = {}
    for selection in ("pooled", "prefix"):
        out = tmp_path / selection
        assert main(["compare", "--model", str(tiny_with_tokenizer), "--tokens", "400", "--methods", "block_support",
                     "--gammas", "0.5", "--selection", selection, "--output", str(out)]) == 0
        (row,) = [r for r in json.loads((out / "results.json").read_text())["results"] if r["method"] == "block_support"]
        assert row["settings"]["block"]["selection"] == selection
        scores[selection] = row["kl_from_exact"]
    assert scores["pooled"] != scores["prefix"]
