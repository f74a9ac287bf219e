"""Entry statistics with known answers, tables, summary and the histogram figure."""

import csv
import json
import math

import pytest
import torch
from conftest import tiny_model

from sb_hf.analysis.capture import Capture, capture_activations
from sb_hf.analysis.distributions import (
    HEAVY_TAILED,
    SUB_GAUSSIAN,
    VERDICT_RULE,
    analyze_capture,
    entry_statistics,
    gaussian_tail,
    plot_grid,
    summarize,
    write_tables,
)


def samples(dist, rows=3125, d=64, seed=0):
    torch.manual_seed(seed)
    return dist.sample((rows, d)).double()  # 200k entries


def test_gaussian_entries_look_gaussian():
    stats = entry_statistics(samples(torch.distributions.Normal(0.0, 1.7)) + 0.3)
    assert stats["entries"] == 200_000 and stats["rows"] == 3125 and stats["head_dim"] == 64
    assert abs(stats["kurtosis"] - 3) < 0.1
    assert abs(stats["mean"] - 0.3) < 0.02 and abs(stats["std"] - 1.7) < 0.02
    assert 0.85 < stats["tail_ratio_3std"] < 1.15
    assert 0.3 < stats["tail_ratio_4std"] < 3
    assert stats["gauss_tail_4std"] == pytest.approx(6.334e-5, rel=1e-3)
    assert stats["gauss_tail_3std"] == pytest.approx(2.6998e-3, rel=1e-3)
    assert stats["verdict"] == SUB_GAUSSIAN
    # rows of 64 centred Gaussian entries: the share of rows with any |entry| > c std is 1 - (1 - tail)^64
    centred = entry_statistics(samples(torch.distributions.Normal(0.0, 1.7), seed=1))
    assert centred["large_rows_3std"] == pytest.approx(centred["gauss_large_rows_3std"], rel=0.1)
    assert centred["large_rows_4std"] == pytest.approx(centred["gauss_large_rows_4std"], rel=0.5)
    # the per-entry budget 1/d is met at about the 1 - 1/128 Gaussian quantile (2.42 std)
    assert stats["entry_tail_budget"] == 1 / 64
    assert stats["threshold_for_budget_std"] == pytest.approx(2.42, abs=0.1)


@pytest.mark.parametrize(
    "dist", [torch.distributions.StudentT(3.0), torch.distributions.Laplace(0.0, 1.0)], ids=["student-t3", "laplace"]
)
def test_heavy_tailed_entries_are_flagged(dist):
    stats = entry_statistics(samples(dist))
    assert stats["kurtosis"] > 4
    assert stats["tail_ratio_4std"] > 3
    assert stats["verdict"] == HEAVY_TAILED


def test_large_row_fraction_is_a_direct_count():
    x = torch.tensor(
        [
            [0.1, -3.0, 0.2],
            [1.0, 1.0, 1.0],
            [0.0, 0.0, 9.0],
            [-2.6, 0.0, 0.0],
            [0.0, 4.0, 0.0],  # exactly 4: not above T = 4
        ]
    )
    stats = entry_statistics(x, thresholds=(2.5, 4.0, 8.0, 10.0))
    assert stats["large_rows_T2.5"] == 4 / 5
    assert stats["large_rows_T4"] == 1 / 5
    assert stats["large_rows_T8"] == 1 / 5
    assert stats["large_rows_T10"] == 0.0
    std = x.double().std(unbiased=False).item()
    for c in (3, 4, 5):
        direct = sum(bool((row.abs() > c * std).any()) for row in x.double()) / 5
        assert stats[f"large_rows_{c}std"] == direct
    assert stats["max_abs"] == 9.0
    # n defaults to the number of rows (sequence length)
    assert stats["n"] == 5 and stats["sqrt_log_n"] == pytest.approx(math.sqrt(math.log(5)))
    direct = sum(bool((row.abs() > math.sqrt(math.log(5))).any()) for row in x) / 5
    assert stats["large_rows_sqrt_log_n"] == direct


def test_sqrt_log_n_and_budget_threshold():
    x = torch.randn(2, 100, 8)  # batch-flattened rows; n is the sequence length
    stats = entry_statistics(x)
    assert stats["n"] == 100 and stats["rows"] == 200
    assert stats["sqrt_log_n"] == pytest.approx(math.sqrt(math.log(100)))
    assert entry_statistics(x, n=2048)["sqrt_log_n"] == pytest.approx(2.7612, abs=1e-4)
    t = stats["threshold_for_budget"]
    assert (x.abs() > t).double().mean() <= 1 / 8
    assert (x.abs() >= t).double().mean() > 1 / 8 - 1e-12  # the smallest such threshold among the entries
    assert gaussian_tail(0.0) == 1.0


def test_degenerate_and_bad_inputs():
    assert entry_statistics(torch.zeros(10, 4))["verdict"] == "degenerate"
    with pytest.raises(ValueError):
        entry_statistics(torch.zeros(10))
    with pytest.raises(ValueError):
        entry_statistics(torch.tensor([[float("nan"), 1.0], [0.0, 1.0]]))


def synthetic_capture(layers=2, heads=(0, 1, 2, 3), groups=2, seq=64, d=8, seed=0):
    torch.manual_seed(seed)
    out = {}
    for i in range(layers):
        q = torch.randn(1, len(heads), seq, d)
        kv = [h // groups for h in heads]  # GQA expanded, as a capture stores them
        k = torch.distributions.Laplace(0.0, 1.0).sample((1, max(kv) + 1, seq, d))[:, kv]
        out[i] = {"q": q, "k": k, "v": torch.randn_like(q)}
    meta = {"heads": ",".join(map(str, heads)), "num_key_value_groups": str(groups), "tokens": str(seq), "model": "synthetic"}
    return Capture(layers=out, meta=meta)


def test_analyze_capture_rows_and_padding():
    model = tiny_model("llama")
    torch.manual_seed(0)
    ids = torch.randint(1, 97, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    capture = capture_activations(model, ids, attention_mask=mask, heads=[1, 2], pre_rope=True)
    rows = analyze_capture(capture, thresholds=(1.0, 2.5))
    assert len(rows) == 2 * 2 * 2
    assert {(r["layer"], r["head"], r["tensor"]) for r in rows} == {
        (layer, head, t) for layer in (0, 1) for head in (1, 2) for t in ("q", "k")
    }
    row = next(r for r in rows if (r["layer"], r["head"], r["tensor"]) == (1, 2, "k"))
    assert row["kv_head"] == 1 and row["rows"] == 50 and row["n"] == 30 and row["head_dim"] == 8
    expected = entry_statistics(capture.layers[1]["k"][:, 1][mask.bool()], n=30, thresholds=(1.0, 2.5))
    assert {k: v for k, v in row.items() if k in expected} == expected
    assert "large_rows_T1" in row and "large_rows_T2.5" in row
    pre = analyze_capture(capture, tensors=("q_pre_rope",))
    assert len(pre) == 4 and all(r["tensor"] == "q_pre_rope" for r in pre)
    with pytest.raises(KeyError):
        analyze_capture(capture_activations(model, ids, layers=0), tensors=("q_pre_rope",))


def test_tables_summary_and_figure(tmp_path):
    capture = synthetic_capture(layers=3)
    rows = analyze_capture(capture)
    json_path, csv_path = write_tables(rows, tmp_path / "out", meta={"model": "synthetic"})
    assert json_path.name == "distributions.json" and csv_path.name == "distributions.csv"
    payload = json.loads(json_path.read_text())
    assert payload["meta"] == {"model": "synthetic"} and payload["verdict_rule"] == VERDICT_RULE
    assert len(payload["rows"]) == len(rows) == 3 * 4 * 2
    with csv_path.open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows)
    for column in ("layer", "head", "kv_head", "tensor", "mean", "std", "kurtosis", "max_abs", "tail_4std",
                   "gauss_tail_4std", "tail_ratio_4std", "sqrt_log_n", "large_rows_T2.5", "large_rows_T8",
                   "large_rows_3std", "entry_tail_budget", "verdict"):
        assert column in table[0]
    assert float(table[0]["kurtosis"]) == pytest.approx(rows[0]["kurtosis"])

    summary = summarize(rows)
    lines = summary.splitlines()
    assert lines[0].startswith("| layer | kurtosis") and "large rows T=2.5" in lines[0] and "T=8" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:6]] == ["0", "1", "2", "all"]
    assert "sqrt(log n) = 2.04 (n=64)" in summary

    png = plot_grid(capture, rows, tmp_path / "fig" / "grid.png")
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_figure_for_one_layer_and_thirty_layers(tmp_path):
    for layers in (1, 30):
        capture = synthetic_capture(layers=layers, heads=(0, 1), groups=1, seq=32)
        png = plot_grid(capture, analyze_capture(capture), tmp_path / f"grid{layers}.png")
        assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5_000
