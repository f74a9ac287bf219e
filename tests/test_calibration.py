"""Per-layer calibration on a tiny random Llama with a planted outlier channel: every calibrated layer
meets its budget on the calibration data (checked with the naive twins), the settings round-trip
through save_pretrained/from_pretrained, and the command line writes usable settings."""

import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import AutoModelForCausalLM

import sb_hf
from sb_hf.analysis.capture import capture_activations, save_capture
from sb_hf.calibration import EXACT, calibrate, default_candidates
from sb_hf.cli import main
from sb_hf.config import SupportBasisConfig, load_settings
from sb_hf.integrations.hf import attention_stats
from sb_hf.ops import reference

TOKENS = 512  # long enough for the polynomial part to cost less than exact attention at head_dim 8
CANDIDATES = [dict(c, chunk_size=8) for c in default_candidates((6.0, 3.0, 2.0, 1.5, 1.0))]


@pytest.fixture(scope="module")
def model_and_capture():
    model = tiny_model("llama", num_hidden_layers=3, max_position_embeddings=1024)
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[3].mul_(8.0)  # a planted outlier channel in layer 1
    ids = torch.randint(1, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    return model, ids, capture_activations(model, ids)


def _layer_error(capture, layer, settings):
    """Relative output error of ``settings`` on one captured layer, from the dense naive twins."""
    q, k, v = (capture.layers[layer][name].double() for name in ("q", "k", "v"))
    scale = float(capture.meta["scale"])
    kw = {key: value for key, value in settings.items() if key != "chunk_size"}
    approx = reference.support_basis_attention(q, k, v, scale=scale, **kw)
    exact = reference.exact_attention(q, k, v, scale=scale)
    return float((approx - exact).norm() / exact.norm())


def test_calibrated_layers_meet_the_budget_at_a_saving(model_and_capture):
    _, _, capture = model_and_capture
    calibration = calibrate(capture, budget=0.1, candidates=CANDIDATES)
    chosen = [c.settings for c in calibration.layers]
    assert all(s != EXACT for s in chosen), chosen  # each layer found a cheaper setting
    assert len({s["threshold"] for s in chosen}) > 1  # and not the same one: the choice is per layer
    for c in calibration.layers:
        assert c.flops_ratio <= 0.95
        error = _layer_error(capture, c.layer, c.settings)
        assert error <= 0.1 + 1e-4, (c.layer, c.settings, error)
        assert error == pytest.approx(c.output_error, rel=1e-3, abs=1e-4)
        # the cheapest within budget: every cheaper candidate misses it
        for m in c.candidates:
            if m["flops_ratio"] < c.flops_ratio - 1e-9:
                assert m["output_error"] > 0.1
    assert calibration.flops_ratio() < 0.8


def test_a_budget_nothing_meets_keeps_exact_attention(model_and_capture):
    model, ids, capture = model_and_capture
    calibration = calibrate(capture, budget=0.0, candidates=CANDIDATES)
    assert [c.settings for c in calibration.layers] == [EXACT] * 3
    config = calibration.config()
    assert all(config.for_layer(i).threshold == 0.0 for i in range(3))
    sb_hf.apply_support_basis(model, config=config)
    with torch.no_grad():
        calibrated = model(input_ids=ids).logits
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        exact = model(input_ids=ids).logits
    torch.testing.assert_close(calibrated, exact, rtol=1e-4, atol=1e-4)


def test_uncaptured_layers_stay_exact(model_and_capture):
    model, ids, _ = model_and_capture
    capture = capture_activations(model, ids, layers=[2])
    config = calibrate(capture, budget=0.1, candidates=CANDIDATES).config()
    assert config.for_layer(0).threshold == 0.0 and config.for_layer(1).threshold == 0.0
    assert config.for_layer(2).threshold > 0.0 and config.for_layer(2).kernel == "taylor"


def test_saved_model_loads_calibrated(model_and_capture, tmp_path):
    model, ids, capture = model_and_capture
    config = calibrate(capture, budget=0.1, candidates=CANDIDATES).config()
    sb_hf.apply_support_basis(model, config=config)
    with torch.no_grad(), attention_stats() as stats:
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="support_basis").eval()
    assert SupportBasisConfig.from_dict(loaded.config.support_basis) == config
    with torch.no_grad(), attention_stats() as loaded_stats:
        got = loaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    share = float(loaded_stats["exact_pairs"] / loaded_stats["pairs"])
    assert share == pytest.approx(float(stats["exact_pairs"] / stats["pairs"])) and share < 0.9


def test_cli_writes_the_report_and_usable_settings(model_and_capture, tmp_path, capsys):
    _, _, capture = model_and_capture
    path = save_capture(capture, tmp_path / "capture.safetensors")
    out = tmp_path / "calibration"
    code = main(["calibrate", "--capture", str(path), "--budget", "0.1", "--thresholds", "6,2,1", "--output", str(out)])
    assert code == 0
    report = json.loads((out / "calibration.json").read_text())
    assert report["budget"] == 0.1 and [c["layer"] for c in report["layers"]] == [0, 1, 2]
    assert all(len(c["candidates"]) == 3 for c in report["layers"])
    settings = load_settings(out / "support_basis.json")
    config = SupportBasisConfig.from_dict(settings)
    for c in report["layers"]:
        assert config.for_layer(c["layer"]).threshold == c["settings"]["threshold"]
    assert "| layer | settings |" in capsys.readouterr().out


def test_bad_input(model_and_capture):
    _, _, capture = model_and_capture
    with pytest.raises(ValueError, match="budget must be"):
        calibrate(capture, budget=-0.1)
    with pytest.raises(ValueError, match="min_saving must be"):
        calibrate(capture, budget=0.1, min_saving=1.0)
    with pytest.raises(ValueError, match="even degrees"):
        calibrate(capture, budget=0.1, candidates=[{"threshold": 2.0, "degree": 3, "kernel": "squared"}])
    with pytest.raises(ValueError, match="at least one candidate"):
        calibrate(capture, budget=0.1, candidates=[])
    assert main(["calibrate", "--capture", "nope.safetensors", "--budget", "0.1"]) == 2


# ----------------------------------------------------------------------------- the run-time guard


def test_radius_limit_makes_wide_rows_exact():
    """Rows whose interval exceeds ``radius_limit`` are exact attention, in both evaluation forms, fast == twin."""
    from test_ops import make_qkv

    from sb_hf.ops import support_basis_attention

    q, k, v = make_qkv(batch=2, q_heads=4, kv_heads=2, q_len=41, seed=3)
    scale = 8**-0.5
    radius = scale * q.norm(dim=-1) * k.repeat_interleave(2, dim=1).norm(dim=-1).cummax(dim=-1).values  # threshold inf
    limit = float(radius.median())
    wide = radius > limit
    exact = reference.exact_attention(q, k, v)
    for evaluation in ("features", "scores"):
        stats = {}
        kw = dict(threshold=float("inf"), degree=2, kernel="taylor", radius_limit=limit)
        out = support_basis_attention(q, k, v, chunk_size=8, evaluation=evaluation, stats=stats, **kw)
        torch.testing.assert_close(out, reference.support_basis_attention(q, k, v, **kw), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[wide], exact[wide], rtol=1e-10, atol=1e-10)
        assert int(stats["exact_rows"]) == int(wide.sum()) > 0
        assert not torch.allclose(out[~wide], exact[~wide])  # the other rows are approximations
    with pytest.raises(ValueError, match="radius_limit must be"):
        support_basis_attention(q, k, v, threshold=2.0, degree=2, radius_limit=151.0)
    with pytest.raises(ValueError, match="radius_limit must be"):
        SupportBasisConfig(radius_limit=0)


def test_calibrated_guard_catches_inputs_outside_the_calibrated_range(model_and_capture):
    _, _, capture = model_and_capture
    calibration = calibrate(capture, budget=0.1, candidates=CANDIDATES)
    scale = float(capture.meta["scale"])
    for c in calibration.layers:
        q, k, v = (capture.layers[c.layer][name].double() for name in ("q", "k", "v"))
        settings = {key: value for key, value in c.settings.items() if key != "chunk_size"}
        widest = scale * q.norm(dim=-1) * torch.where(k.abs().amax(-1) > settings["threshold"], 0.0, k.norm(dim=-1)).cummax(-1).values
        widest = widest[q.abs().amax(-1) <= settings["threshold"]].max()
        assert widest <= settings["radius_limit"] <= 1.25 * widest + 1e-3
        # the same layer fed queries twice as large: rows beyond the calibrated range become exact
        stats, unguarded = {}, {}
        out = reference.support_basis_attention(2 * q, k, v, scale=scale, stats=stats, **settings)
        reference.support_basis_attention(2 * q, k, v, scale=scale, stats=unguarded, **{**settings, "radius_limit": 150.0})
        assert int(stats["exact_rows"]) > int(unguarded["exact_rows"])
        exact = reference.exact_attention(2 * q, k, v, scale=scale)
        guarded = (out - exact).abs().amax(-1) < 1e-9
        assert int(guarded.sum()) >= int(stats["exact_rows"]) - int(unguarded["exact_rows"])


# ----------------------------------------------------------------------------- structure and key columns


def test_column_settings_are_the_mean_query_and_a_score_quantile(model_and_capture):
    _, _, capture = model_and_capture
    from sb_hf.calibration import column_settings

    q, k = capture.layers[1]["q"].float(), capture.layers[1]["k"].float()
    scale = float(capture.meta["scale"])
    columns = column_settings(q, k, scale, 0.1)
    mean = torch.stack([q[0, h].double().mean(dim=0) for h in range(q.shape[1])])  # per head, over positions
    torch.testing.assert_close(columns["column_queries"].double(), mean, rtol=1e-5, atol=1e-6)
    for h in range(q.shape[1]):
        scores = scale * k[0, h].double() @ mean[h]
        above = float((scores > columns["column_threshold"][h].double()).double().mean())
        assert abs(above - 0.1) <= 2 / k.shape[2], (h, above)
    with pytest.raises(ValueError, match="column_share"):
        column_settings(q, k, scale, 1.5)


def test_structured_candidates_meet_the_budget_and_load_calibrated(model_and_capture, tmp_path):
    """Candidates with sinks, a local window and key columns: the chosen per-layer settings (mean queries
    stored as lists) meet the budget by the naive twin, and a saved model runs them."""
    model, ids, capture = model_and_capture
    candidates = [dict(c, chunk_size=8) for c in default_candidates(
        (float("inf"), 3.0), 0, sinks=2, local_windows=(16, 64), column_shares=(0.05,))]
    assert len(candidates) == 4 and all(c["column_share"] == 0.05 for c in candidates)
    calibration = calibrate(capture, budget=0.3, candidates=candidates, min_saving=0.0)
    config = calibration.config()
    assert all("column_queries" in c.settings for c in calibration.layers), [c.settings for c in calibration.layers]
    for c in calibration.layers:
        settings = dict(c.settings)
        assert "column_share" not in settings and settings["local_window"] in (16, 64) and settings["sinks"] == 2
        if "column_queries" in settings:
            assert torch.tensor(settings["column_queries"]).shape == (4, 8)  # (q_heads, head_dim) of the tiny model
            settings["column_queries"] = torch.tensor(settings["column_queries"], dtype=torch.float64)
            settings["column_threshold"] = torch.tensor(settings["column_threshold"], dtype=torch.float64)
        error = _layer_error(capture, c.layer, settings)
        assert error <= 0.3 + 1e-4 and error == pytest.approx(c.output_error, rel=1e-3, abs=1e-4), (c.layer, error)
    assert_calibrated_model_saves_and_reloads(model, config, ids, tmp_path)


def assert_calibrated_model_saves_and_reloads(model, config, ids, tmp_path):
    """``model`` with a calibrated ``config`` saves a fraction of the pairs, and the saved model loads with the
    same logits through ``attn_implementation="support_basis"``; ``model`` is reverted afterwards."""
    sb_hf.apply_support_basis(model, config=config)
    with torch.no_grad(), attention_stats() as stats:
        expected = model(input_ids=ids).logits
    assert float(stats["exact_pairs"] / stats["pairs"]) < 0.9
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="support_basis").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected)
    sb_hf.revert_support_basis(model)


def test_cli_structure_flags_and_partial_heads(model_and_capture, tmp_path):
    model, ids, capture = model_and_capture
    path = save_capture(capture, tmp_path / "capture.safetensors")
    out = tmp_path / "calibration"
    code = main(["calibrate", "--capture", str(path), "--budget", "10", "--thresholds", "inf", "--degrees", "0",
                 "--sinks", "2", "--local-windows", "16", "--column-shares", "0.05", "--output", str(out)])
    assert code == 0
    config = SupportBasisConfig.from_dict(load_settings(out / "support_basis.json"))
    for i in range(3):  # budget 10: every layer takes the one (cheap) candidate
        layer = config.for_layer(i)
        assert (layer.sinks, layer.local_window, layer.degree) == (2, 16, 0)
        assert len(layer.column_queries) == 4 and len(layer.column_queries[0]) == 8 and len(layer.column_threshold) == 4
    partial = capture_activations(model, ids, heads=[0, 1])
    with pytest.raises(ValueError, match="every head"):
        calibrate(partial, budget=0.1, candidates=[{"threshold": 2.0, "degree": 0, "kernel": "taylor", "column_share": 0.1}])


def test_several_budgets_from_one_measurement(model_and_capture, tmp_path):
    """A list of budgets gives the same choices as one calibration per budget, and the CLI writes one folder each."""
    _, _, capture = model_and_capture
    from sb_hf.calibration import calibrate_budgets

    candidates = CANDIDATES[:3]
    together = calibrate_budgets(capture, budgets=[0.02, 0.2], candidates=candidates)
    for calibration in together:
        alone = calibrate(capture, budget=calibration.budget, candidates=candidates)
        assert [c.settings for c in calibration.layers] == [c.settings for c in alone.layers]
    assert together[0].flops_ratio() >= together[1].flops_ratio()
    path = save_capture(capture, tmp_path / "capture.safetensors")
    out = tmp_path / "calibration"
    assert main(["calibrate", "--capture", str(path), "--budgets", "0.02,0.2", "--thresholds", "6,2", "--output", str(out)]) == 0
    assert (out / "budget_0.02" / "support_basis.json").is_file() and (out / "budget_0.2" / "calibration.json").is_file()
    assert main(["calibrate", "--capture", str(path), "--budgets", "0.02,0.2", "--save-model", str(tmp_path / "m")]) == 2
