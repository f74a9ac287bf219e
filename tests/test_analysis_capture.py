"""Capturing post-RoPE q/k/v from tiny random Llama (GQA) and Mistral (sliding window) models."""

import json
import struct

import pytest
import torch
from conftest import VOCAB, tiny_model
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import sb_hf
from sb_hf.analysis.capture import (
    CAPTURE_IMPLEMENTATION,
    Capture,
    capture_activations,
    capture_text,
    capturing,
    load_capture,
    save_capture,
)

KINDS = ["llama", "mistral"]
GROUPS = 2  # tiny_model: 4 query heads, 2 KV heads


def ids_and_mask(batch=2, seq=19, pad=5, seed=3):
    torch.manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    ids[0, :pad] = 0
    return ids, mask


def assert_unregistered():
    assert CAPTURE_IMPLEMENTATION not in AttentionInterface._global_mapping
    assert CAPTURE_IMPLEMENTATION not in AttentionMaskInterface._global_mapping


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "left-padded"])
def test_capture_does_not_change_logits(kind, padded):
    model = tiny_model(kind)
    model.set_attn_implementation("sdpa")
    ids, mask = ids_and_mask(seq=23 if kind == "mistral" else 19)  # longer than the sliding window 7
    mask = mask if padded else None
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with capturing(model, pre_rope=True) as capture:
            got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(got, expected)
    assert sorted(capture.layers) == [0, 1]
    assert model.config._attn_implementation == "sdpa"
    assert_unregistered()


@pytest.mark.parametrize("previous", ["sdpa", "eager", "support_basis"])
def test_previous_implementation_is_restored(previous):
    model = tiny_model("llama")
    if previous == "support_basis":
        sb_hf.apply_support_basis(model, threshold=1.0)
    else:
        model.set_attn_implementation(previous)
    ids, _ = ids_and_mask()
    capture_activations(model, ids)
    assert model.config._attn_implementation == previous
    assert all(layer.self_attn.config._attn_implementation == previous for layer in model.model.layers)
    assert_unregistered()


def test_implementation_is_restored_when_the_forward_raises():
    model = tiny_model("mistral")
    model.set_attn_implementation("eager")
    bad = torch.full((1, 6), VOCAB + 10)  # out of the embedding's range
    with pytest.raises(IndexError):
        capture_activations(model, bad)
    assert model.config._attn_implementation == "eager"
    assert_unregistered()
    with pytest.raises(RuntimeError, match="boom"):
        with capturing(model, pre_rope=True):
            assert model.config._attn_implementation == CAPTURE_IMPLEMENTATION
            raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert_unregistered()
    # no hook left behind: a plain forward still works and a new capture starts empty
    ids, _ = ids_and_mask()
    assert len(capture_activations(model, ids, layers=0).layers) == 1


def test_a_second_forward_inside_one_capture_is_refused():
    model = tiny_model("llama")
    ids, _ = ids_and_mask()
    with pytest.raises(RuntimeError, match="ran twice"):
        with capturing(model), torch.no_grad():
            model(input_ids=ids, use_cache=False)
            model(input_ids=ids, use_cache=False)
    assert_unregistered()


@pytest.mark.parametrize("kind", KINDS)
def test_captured_qk_equal_an_independent_recomputation(kind):
    model = tiny_model(kind)
    ids, _ = ids_and_mask(batch=1, seq=17)
    layer = 1
    attn = model.model.layers[layer].self_attn
    seen = {}
    hook = model.model.layers[layer].input_layernorm.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    try:
        capture = capture_activations(model, ids, pre_rope=True)
    finally:
        hook.remove()
    hidden = seen["h"]  # the attention's input (captured during the same pass)
    with torch.no_grad():
        shape = (*hidden.shape[:-1], -1, attn.head_dim)
        q_pre = attn.q_proj(hidden).view(shape).transpose(1, 2)
        k_pre = attn.k_proj(hidden).view(shape).transpose(1, 2)
        positions = torch.arange(ids.shape[1])[None]
        cos, sin = model.model.rotary_emb(hidden, positions)
        q, k = apply_rotary_pos_emb(q_pre, k_pre, cos, sin)
    kv = [h // GROUPS for h in range(4)]
    got = capture.layers[layer]
    torch.testing.assert_close(got["q"], q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["k"], k[:, kv], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["q_pre_rope"], q_pre, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["k_pre_rope"], k_pre[:, kv], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got["q"], got["q_pre_rope"])  # RoPE was applied
    v = attn.v_proj(hidden).view(shape).transpose(1, 2)
    torch.testing.assert_close(got["v"], v[:, kv].detach(), rtol=1e-6, atol=1e-6)


def test_gqa_expansion_and_selection():
    model = tiny_model("llama")
    ids, _ = ids_and_mask()
    full = capture_activations(model, ids)
    assert full.meta["num_key_value_groups"] == str(GROUPS) and full.kv_heads == [0, 0, 1, 1]
    for layer in (0, 1):
        k, v = full.layers[layer]["k"], full.layers[layer]["v"]
        assert k.shape == v.shape == full.layers[layer]["q"].shape == (2, 4, 19, 8)
        assert torch.equal(k[:, 0], k[:, 1]) and torch.equal(k[:, 2], k[:, 3])
        assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 2], v[:, 3])
        assert not torch.allclose(k[:, 1], k[:, 2])

    part = capture_activations(model, ids, layers=[1], heads=[3, 0])
    assert sorted(part.layers) == [1]
    assert part.meta["layers"] == "1" and part.meta["heads"] == "0,3" and part.heads == [0, 3]
    assert part.kv_heads == [0, 1]
    for name in ("q", "k", "v"):
        assert torch.equal(part.layers[1][name], full.layers[1][name][:, [0, 3]])

    for bad in (dict(layers=[2]), dict(heads=[4]), dict(heads=[1, 1]), dict(layers=[])):
        with pytest.raises(ValueError):
            capture_activations(model, ids, **bad)
    assert_unregistered()


def test_metadata_values():
    model = tiny_model("mistral")
    ids, mask = ids_and_mask()
    capture = capture_activations(model, ids, attention_mask=mask, heads=[1], text="hello")
    meta = capture.meta
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["tokens"] == "19" and meta["batch"] == "2" and meta["layers"] == "0,1" and meta["heads"] == "1"
    assert meta["sliding_window"] == "7" and meta["num_key_value_groups"] == "2" and meta["pre_rope"] == "0"
    assert float(meta["scale"]) == model.model.layers[0].self_attn.scaling == 8**-0.5
    assert meta["text"] == "hello" and meta["model"]
    assert torch.equal(capture.attention_mask, mask.bool())
    assert capture_activations(tiny_model("llama"), ids).meta["sliding_window"] == "none"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_load_round_trip_is_exact(tmp_path, dtype):
    model = tiny_model("mistral")
    ids, mask = ids_and_mask()
    capture = capture_activations(model, ids, attention_mask=mask, heads=[0, 3], pre_rope=True, dtype=dtype, text="t")
    path = save_capture(capture, tmp_path / "sub" / "capture.safetensors")
    loaded = load_capture(path)
    assert loaded.meta == capture.meta
    assert torch.equal(loaded.attention_mask, capture.attention_mask)
    assert sorted(loaded.layers) == sorted(capture.layers)
    for layer, named in capture.layers.items():
        assert sorted(loaded.layers[layer]) == sorted(named) == ["k", "k_pre_rope", "q", "q_pre_rope", "v"]
        for name, tensor in named.items():
            assert tensor.dtype == dtype
            assert loaded.layers[layer][name].dtype == dtype and torch.equal(loaded.layers[layer][name], tensor)

    # A safetensors file: 8-byte little-endian header length, then a JSON header; no pickle/zip.
    raw = path.read_bytes()
    assert not raw.startswith(b"PK") and not raw.startswith(b"\x80")
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    assert header["__metadata__"] == capture.meta
    assert "layers.0.q" in header and header["layers.0.q"]["shape"] == [2, 2, 19, 8]


def test_capture_memory_follows_dtype_and_selection():
    model = tiny_model("llama")
    ids, _ = ids_and_mask()
    small = capture_activations(model, ids, layers=1, heads=[2], dtype=torch.float16)
    assert list(small.layers) == [1] and sorted(small.layers[1]) == ["k", "q", "v"]
    assert all(t.dtype == torch.float16 and t.shape == (2, 1, 19, 8) for t in small.layers[1].values())
    with pytest.raises(ValueError, match="dtype"):
        capture_activations(model, ids, dtype=torch.int32)


class CharTokenizer:
    """One token per character; enough to test `capture_text`."""

    class _Out:
        def __init__(self, ids):
            self.input_ids = ids

    def __call__(self, text, return_tensors=None):
        return self._Out(torch.tensor([[1 + ord(c) % (VOCAB - 1) for c in text]]))

    def decode(self, ids):
        return "".join(chr(int(i)) for i in ids)


def test_capture_text_takes_the_first_tokens_and_refuses_short_text():
    model = tiny_model("llama")
    tokenizer = CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog"
    capture = capture_text(model, tokenizer, text, tokens=12, heads=[0])
    assert capture.meta["tokens"] == "12" and capture.meta["batch"] == "1" and len(capture.meta["text"]) == 12
    direct = capture_activations(model, tokenizer(text).input_ids[:, :12], heads=[0])
    assert torch.equal(capture.layers[1]["q"], direct.layers[1]["q"])
    with pytest.raises(ValueError, match="fewer than tokens"):
        capture_text(model, tokenizer, "short", tokens=12)
    with pytest.raises(ValueError):
        capture_text(model, tokenizer, text, tokens=0)


def test_capture_dataclass_defaults():
    capture = Capture()
    assert capture.layers == {} and capture.meta == {} and capture.attention_mask is None and capture.heads == []
