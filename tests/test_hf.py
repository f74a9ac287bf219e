"""The Transformers backend on tiny random Llama (GQA) and Mistral (sliding window) models."""

import copy
import inspect
import json

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import AutoModelForCausalLM
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, create_causal_mask

import sb_hf
from sb_hf.config import SupportBasisConfig
from sb_hf.integrations.hf import attention_stats
from sb_hf.integrations.plan import settings_for

KINDS = ["llama", "mistral"]
SPLIT = 1.0  # threshold that makes some rows large and some small in `tiny_model`


def padded_batch(seed=1, lengths=(23, 17, 20), total=23):
    """Left-padded batch of random sequences and their unpadded versions."""
    torch.manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total))
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
        ids[row, : total - n] = 0
    return ids, mask


def logits(model, ids, mask=None, implementation=None, **settings):
    if implementation == "sdpa":
        model.set_attn_implementation("sdpa")
    elif implementation is not None:
        sb_hf.apply_support_basis(model, method=implementation, **settings)
    # Positions count real tokens only, as `generate` does: support basis splits rows on post-RoPE
    # entries, which (unlike exact attention) depend on absolute positions.
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, position_ids=positions).logits


def generation_matching_full_recompute(model, ids, mask, new, tolerance=1e-4):
    """Greedy ``generate()`` of ``new`` tokens with the KV cache, asserting that every step's logits equal those of a
    full forward pass over the sequence so far (``mask`` None: no attention_mask); returns generate()'s output."""
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
    full_mask = None if mask is None else torch.cat([mask, torch.ones(ids.shape[0], new, dtype=mask.dtype)], dim=1)
    full = logits(model, generated.sequences, full_mask)
    assert len(generated.logits) == new
    for step, step_logits in enumerate(generated.logits):
        torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1 + step], rtol=tolerance, atol=tolerance)
    return generated


def split_share(model, ids, mask, **settings):
    sb_hf.apply_support_basis(model, **settings)
    with attention_stats() as stats, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    return (stats["exact_pairs"] / stats["pairs"]).item()


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_zero_equals_sdpa_with_left_padding(kind):
    model = tiny_model(kind)
    ids, mask = padded_batch()
    expected = logits(model, ids, mask, "sdpa")
    got = logits(model, ids, mask, "support_basis", threshold=0)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_threshold_zero_generate_is_token_identical(kind):
    model = tiny_model(kind)
    ids, mask = padded_batch(lengths=(12, 9), total=12)
    model.set_attn_implementation("sdpa")
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    sb_hf.apply_support_basis(model, threshold=0)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


def test_split_settings_are_a_real_split():
    """The settings used below must leave both an exact and a polynomial part, or the tests prove little."""
    ids, mask = padded_batch()
    for kind in KINDS:
        share = split_share(tiny_model(kind), ids, mask, threshold=SPLIT)
        assert 0.2 < share < 0.95, share


SETTINGS = [
    dict(implementation="support_basis", threshold=SPLIT, degree=2),
    dict(implementation="support_basis", threshold=SPLIT, degree=3, chunk_size=5, kernel="chebyshev"),
    dict(implementation="support_basis"),  # defaults
    dict(implementation="as23", degree=2),
    dict(implementation="support_basis", threshold=SPLIT, degree=2, sketch_dim=16, sketch_seed=3),
    dict(implementation="support_basis", threshold=SPLIT, degree=4, sketch_dim=8, kernel="squared"),
    dict(implementation="support_basis_multi", thresholds=[SPLIT, 0.7], degrees=[2, 4], kernel="taylor"),
    dict(implementation="support_basis_multi", thresholds=[SPLIT, 0.8, 0.6], degrees=[2, 3, 2], chunk_size=5,
         kernel="chebyshev"),
    dict(implementation="sink_window", sinks=2, local_window=5),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_causality_padding_invariance_and_finiteness(kind, settings):
    settings = dict(settings)
    implementation = settings.pop("implementation")
    model = tiny_model(kind)
    ids, mask = padded_batch()
    out = logits(model, ids, mask, implementation, **settings)
    assert torch.isfinite(out).all()

    # A padded row equals the same sequence run alone.
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = logits(model, ids[row, real][None])
        torch.testing.assert_close(out[row, real], alone[0], rtol=1e-4, atol=1e-4)

    # Changing later tokens leaves earlier logits unchanged.
    changed = ids.clone()
    changed[:, -3:] = (changed[:, -3:] + 5) % VOCAB
    out2 = logits(model, changed, mask)
    torch.testing.assert_close(out2[:, :-3], out[:, :-3], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out2[:, -3:], out[:, -3:])


@pytest.mark.parametrize("method,settings", [("support_basis", {}), ("support_basis", {"sketch_dim": 16}),
                                             ("support_basis_multi", {"thresholds": [SPLIT, 0.8, 0.6]}),
                                             ("support_basis", {"kernel": "squared"}),
                                             ("support_basis", {"kernel": "taylor"})],
                         ids=["exact-features", "sketched", "multi", "squared", "taylor"])
@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_matches_full_recompute(kind, method, settings):
    """Greedy decoding with the KV cache gives, step by step, the logits of a full forward pass."""
    model = tiny_model(kind)
    ids, mask = padded_batch(lengths=(14, 10), total=14)
    sb_hf.apply_support_basis(model, method=method, **{"threshold": SPLIT, "degree": 2, **settings})
    generation_matching_full_recompute(model, ids, mask, 10)


def test_training_gradients_match_sdpa_at_threshold_zero_and_are_finite_otherwise():
    ids, mask = padded_batch()
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for implementation, settings in [("sdpa", {}), ("support_basis", {"threshold": 0}), ("support_basis", {"threshold": SPLIT})]:
        model = tiny_model("llama").train()
        if implementation == "sdpa":
            model.set_attn_implementation("sdpa")
        else:
            sb_hf.apply_support_basis(model, **settings)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[(implementation, settings.get("threshold"))] = model.model.layers[0].self_attn.q_proj.weight.grad
        assert torch.isfinite(loss)
    torch.testing.assert_close(grads[("support_basis", 0)], grads[("sdpa", None)], rtol=1e-4, atol=1e-6)
    assert torch.isfinite(grads[("support_basis", SPLIT)]).all()
    assert grads[("support_basis", SPLIT)].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_run_and_stay_close(dtype):
    ids, mask = padded_batch()
    reference = logits(tiny_model("mistral"), ids, mask, "sdpa")
    model = tiny_model("mistral", dtype=dtype)
    out = logits(model, ids, mask, "support_basis", threshold=0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    real = mask.bool()
    torch.testing.assert_close(out[real].float(), reference[real], rtol=0.1, atol=0.1)
    assert torch.isfinite(logits(model, ids, mask, "support_basis", threshold=SPLIT)).all()


def test_mask_function_is_registered_and_keeps_padding():
    """Without the registered mask function transformers passes no mask and padding is silently lost."""
    for name in ("support_basis", "as23"):
        assert name in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model)
    ids, mask = padded_batch()
    embeds = model.model.embed_tokens(ids)
    # (the cache keyword under this release's name; the earliest releases we support also take cache_position)
    parameters = inspect.signature(create_causal_mask).parameters
    no_cache = {"cache" if "cache" in parameters else "past_key_values": None}
    if "cache_position" in parameters:
        no_cache["cache_position"] = torch.arange(ids.shape[1])
    built = create_causal_mask(model.config, embeds, mask, **no_cache)
    assert built is not None and built.shape == mask.shape and torch.equal(built, mask.bool())
    assert create_causal_mask(model.config, embeds, torch.ones_like(mask), **no_cache) is None


def test_packed_sequences_and_4d_masks_are_refused():
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, threshold=SPLIT)
    ids = torch.randint(1, VOCAB, (1, 12))
    packed_positions = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]])
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=ids, position_ids=packed_positions, use_cache=False)
    four_d = torch.ones(1, 1, 12, 12, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=four_d)


def test_dropout_is_refused_in_training():
    model = tiny_model("llama", attention_dropout=0.1).train()
    sb_hf.apply_support_basis(model)
    with pytest.raises(ValueError, match="attention_dropout"):
        model(input_ids=torch.randint(1, VOCAB, (1, 8)))


def test_apply_stores_settings_and_save_pretrained_round_trips(tmp_path):
    model = tiny_model("mistral")
    sb_hf.apply_support_basis(model, threshold=SPLIT, degree=3, kernel="chebyshev", layers={1: {"threshold": 0}})
    assert model.config._attn_implementation == "support_basis"
    stored = model.config.support_basis
    assert stored["threshold"] == SPLIT and stored["degree"] == 3 and stored["layers"] == {"1": {"threshold": 0}}
    json.dumps(stored)
    ids, mask = padded_batch()
    before = logits(model, ids, mask)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="support_basis").eval()
    assert loaded.config.support_basis == stored
    torch.testing.assert_close(logits(loaded, ids, mask), before)
    layer0, layer1 = (layer.self_attn for layer in loaded.model.layers)
    assert settings_for(layer0).threshold == SPLIT and settings_for(layer1).threshold == 0


def test_per_layer_override_changes_the_computation():
    ids, mask = padded_batch()
    model = tiny_model("llama")
    exact = logits(model, ids, mask, "support_basis", threshold=0)
    approx = logits(model, ids, mask, "support_basis", threshold=SPLIT, kernel="chebyshev")
    both_exact = logits(model, ids, mask, "support_basis", threshold=SPLIT, layers={0: {"threshold": 0}, 1: {"threshold": 0}})
    real = mask.bool()
    torch.testing.assert_close(both_exact[real], exact[real])
    assert not torch.allclose(approx[real], exact[real], atol=1e-3)


def test_from_pretrained_with_attn_implementation_uses_defaults(tmp_path):
    model = tiny_model("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="support_basis").eval()
    assert loaded.config._attn_implementation == "support_basis"
    assert settings_for(loaded.model.layers[0].self_attn) == sb_hf.SupportBasisConfig()
    ids, mask = padded_batch()
    assert torch.isfinite(logits(loaded, ids, mask)).all()


@pytest.mark.parametrize(
    "settings, field",
    [({"threshold": -1}, "threshold"), ({"degree": 99}, "degree"), ({"interval": "fixed"}, "radius"),
     ({"chunk_size": 0}, "chunk_size"), ({"layers": {0: {"bogus": 1}}}, "bogus"), ({"bogus": 1}, "bogus")],
)
def test_apply_rejects_invalid_settings(settings, field):
    with pytest.raises(ValueError, match=field):
        sb_hf.apply_support_basis(tiny_model("llama"), **settings)


def test_apply_rejects_unknown_method():
    with pytest.raises(ValueError, match="method"):
        sb_hf.apply_support_basis(tiny_model("llama"), method="bogus")


def test_support_basis_multi_model_matches_the_op_settings():
    """The registered `support_basis_multi` runs multi_threshold_attention with the config's buckets:
    one bucket equals `support_basis`, several differ; defaults split below `threshold` evenly."""
    model = tiny_model("llama")
    ids, mask = padded_batch()
    one = logits(model, ids, mask, "support_basis_multi", thresholds=[SPLIT], degrees=[3], kernel="chebyshev")
    single = logits(model, ids, mask, "support_basis", threshold=SPLIT, degree=3, kernel="chebyshev")
    torch.testing.assert_close(one, single, rtol=0, atol=0)
    several = logits(model, ids, mask, "support_basis_multi", thresholds=[SPLIT, 0.8, 0.6], degrees=[3, 2, 2],
                     kernel="chebyshev")
    assert torch.isfinite(several).all() and (several - single).abs().max() > 1e-5
    assert SupportBasisConfig(threshold=3.0).bucket_settings()["thresholds"] == [3.0, 2.0, 1.0]
    with pytest.raises(ValueError, match="strictly decreasing"):
        sb_hf.apply_support_basis(model, method="support_basis_multi", thresholds=[1.0, 2.0])
    with pytest.raises(ValueError, match="needs thresholds"):
        sb_hf.apply_support_basis(model, method="support_basis_multi", degrees=[2, 2])


def test_apply_takes_a_settings_file(tmp_path):
    """``config`` may be a JSON file: a settings dict (``sb-hf calibrate``'s support_basis.json) or a model's config.json."""
    model = tiny_model("llama")
    settings = sb_hf.SupportBasisConfig(threshold=SPLIT, kernel="taylor", degree=0, layers={1: {"threshold": 0}})
    path = tmp_path / "support_basis.json"
    path.write_text(json.dumps(settings.to_dict()))
    sb_hf.apply_support_basis(model, config=str(path))
    assert SupportBasisConfig.from_dict(model.config.support_basis) == settings
    model.save_pretrained(tmp_path / "model")
    other = tiny_model("llama")
    sb_hf.apply_support_basis(other, config=tmp_path / "model" / "config.json")
    assert SupportBasisConfig.from_dict(other.config.support_basis) == settings
    with pytest.raises(FileNotFoundError):
        sb_hf.apply_support_basis(other, config=str(tmp_path / "missing.json"))


def test_settings_edited_in_place_take_effect():
    """Each module caches its parsed settings; an edit of the stored dict, even in place, is seen on the next call."""
    ids, mask = padded_batch()
    real = mask.bool()
    model = tiny_model("llama")
    sb_hf.apply_support_basis(model, threshold=0.0, kernel="chebyshev")
    with torch.no_grad():
        exact = model(input_ids=ids, attention_mask=mask).logits
        model.config.support_basis["threshold"] = SPLIT  # in place: no apply_support_basis call
        approx = model(input_ids=ids, attention_mask=mask).logits
        model.config.support_basis["layers"]["0"] = {"threshold": 0.0}  # a nested in-place edit
        model.config.support_basis["layers"]["1"] = {"threshold": 0.0}
        again = model(input_ids=ids, attention_mask=mask).logits
        model.config.support_basis["layers"]["0"]["threshold"] = SPLIT  # in place inside a layer's overrides
        layer_edited = model(input_ids=ids, attention_mask=mask).logits
        fresh = tiny_model("llama")
        sb_hf.apply_support_basis(fresh, config=copy.deepcopy(model.config.support_basis))
        fresh_logits = fresh(input_ids=ids, attention_mask=mask).logits
        model.config.support_basis["layers"]["first"] = {}  # a bad key is caught on the next call
        with pytest.raises(ValueError, match="layers keys must be indices"):
            model(input_ids=ids, attention_mask=mask)
    assert not torch.allclose(approx[real], exact[real], atol=1e-3)
    torch.testing.assert_close(again[real], exact[real])
    assert (layer_edited[real] - exact[real]).abs().max() > 1e-5  # layer 0 is no longer exact
    torch.testing.assert_close(layer_edited[real], fresh_logits[real])


def test_a_transformers_release_before_the_supported_range_is_refused():
    """Releases before 5.4 call mask functions with another signature: registering says which release is needed."""
    import transformers

    from sb_hf.integrations.hf import check_transformers_version

    with pytest.raises(ImportError, match=r"transformers >= 5.4 .* found 5.3.0"):
        check_transformers_version("5.3.0")
    for supported in ("5.4.0", "5.24.0", "5.10.0.dev0", transformers.__version__):
        check_transformers_version(supported)


def test_mixed_dtypes_under_autocast_are_computed_as_sdpa_computes_them():
    """Under bf16 autocast transformers hands the attention fp32 queries and keys (its rotary embedding) with bf16
    values: the backend casts them as SDPA does (every input below fp64 to bf16) and returns bf16, at threshold 0
    SDPA's result; outside autocast mixed dtypes are refused, as SDPA refuses them."""
    from sb_hf.integrations.hf import autocast_inputs

    model = tiny_model("llama")
    ids, mask = padded_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = logits(model, ids, mask, "sdpa")
        got = logits(model, ids, mask, "support_basis", threshold=0.0)
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=2e-2)
    q, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [x.dtype for x in autocast_inputs(q, q, v)] == [torch.bfloat16] * 3
        assert [x.dtype for x in autocast_inputs(q.double(), q.double(), v.double())] == [torch.float64] * 3
        attention = sb_hf.integrations.hf._make_attention_forward("support_basis")
        out, _ = attention(model.model.layers[0].self_attn, q, q, v, None, scaling=8**-0.5)
        assert out.dtype == torch.bfloat16
    assert [x.dtype for x in autocast_inputs(q, q, v)] == [torch.float32, torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="must share a dtype.*autocast"):
        attention(model.model.layers[0].self_attn, q, q, v, None, scaling=8**-0.5)
