"""Block support through FlexAttention (the CUDA path) against its dense twin, on every available device: shapes
that are not multiples of the block, padding, GQA, sliding windows, decoding-sized calls, dtypes; the BlockMask lists
every block the element rule needs (a compiled kernel reads nothing else: the compiled check fails if a block is
missing); no host synchronisation; the backend's engine choice (a test that fails if CUDA skips FlexAttention); bad
settings. Gradients run where FlexAttention has a backward (CUDA; PyTorch refuses it on a CPU)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch.nn.attention.flex_attention import create_mask

from conftest import DEVICES
from sb_hf.ops import reference
from sb_hf.ops.block_support import backend, block_support_flex, engine_for, flex
from sb_hf.ops.block_support.chunk import block_inputs
from sb_hf.ops.block_support.settings import BlockSettings

F64 = torch.float64
SETTINGS = dict(gamma=0.7, block_size=7, sinks=3, local_window=10)

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


def qkv(batch=2, q_heads=4, kv_heads=2, q_len=37, kv_len=90, d=8, seed=1, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    make = lambda heads, length, s: (s * torch.randn(batch, heads, length, d, generator=g, dtype=F64)).to(device, dtype)
    return make(q_heads, q_len, 2), make(kv_heads, kv_len, 2), make(kv_heads, kv_len, 1)


def left_padded(batch, kv_len, pad=23, device="cpu"):
    mask = torch.ones(batch, kv_len, dtype=torch.bool, device=device)
    mask[-1, :pad] = False
    return mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("selection", flex.SHARED_SELECTIONS)
@pytest.mark.parametrize("far", ["centroid", "none"])
@pytest.mark.parametrize("sliding_window,padded", [(None, False), (None, True), (40, True), (100, False)],
                         ids=["plain", "padded", "window", "wide-window"])
@pytest.mark.parametrize("q_len,chunk_blocks", [(37, None), (90, 3), (1, None)])
def test_flex_equals_the_twin(device, selection, far, sliding_window, padded, q_len, chunk_blocks):
    """37, 90 or 1 queries (the last positions) over 90 keys, GQA 4/2, blocks of 7, 3 sinks, a band of 10 keys,
    eager FlexAttention (it evaluates the element rule on every pair); fp64 (fp32 on CUDA)."""
    dtype = F64 if device == "cpu" else torch.float32
    q, k, v = qkv(q_len=q_len, dtype=dtype, device=device)
    kw = dict(SETTINGS, selection=selection, far=far, sliding_window=sliding_window,
              key_padding_mask=left_padded(2, 90, device=device) if padded else None)
    fast = block_support_flex(q, k, v, chunk_blocks=chunk_blocks, compiled=False, **kw)
    twin = reference.block_support_attention(q, k, v, **kw)
    tol = 1e-10 if dtype == F64 else 2e-5
    torch.testing.assert_close(fast, twin, rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sliding_window,padded,q_len", [(None, False, 200), (None, True, 150), (90, True, 200)])
def test_compiled_flex_reads_only_the_listed_blocks_and_equals_the_twin(device, sliding_window, padded, q_len):
    """torch.compile'd FlexAttention (inference) reads the BlockMask's blocks and nothing else: blocks of 16 (CUDA's
    tiles), 200 keys, fp32. A block missing from the listing changes the output."""
    q, k, v = qkv(q_len=q_len, kv_len=200, d=16, dtype=torch.float32, device=device)
    kw = dict(SETTINGS, block_size=16, local_window=16, sliding_window=sliding_window,
              key_padding_mask=left_padded(2, 200, device=device) if padded else None)
    with torch.no_grad():
        fast = block_support_flex(q, k, v, compiled=True, **kw)
    torch.testing.assert_close(fast, reference.block_support_attention(q, k, v, **kw), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("sliding_window,padded", [(None, False), (None, True), (40, False), (40, True)])
@pytest.mark.parametrize("q_len,gamma", [(37, 0.7), (90, 0.7), (1, 0.7), (90, 1.0), (90, 0.0)])
def test_the_listing_covers_the_element_rule(sliding_window, padded, q_len, gamma):
    """Every (query block, key block) pair the element rule needs is listed; without a window, nothing more (with
    one, a query block's rows before the call may add a block)."""
    q, k, v = qkv(q_len=q_len)
    settings = BlockSettings(**dict(SETTINGS, gamma=gamma))
    blocked = block_inputs(q, k, v, settings, left_padded(2, 90) if padded else None, None)
    nb, size, offset = blocked.kp.shape[2], settings.block_size, 90 - q_len
    selected = flex.selections(blocked, settings, 8**-0.5, sliding_window, offset, 90, 3)
    tables = flex.rule_tables(blocked, selected, settings, sliding_window, offset, 90)
    mask_mod, _ = flex.element_rule(tables, blocked.first_block * size, nb * size, size, sliding_window)
    listed = flex.listed_blocks(tables, blocked.first_block, size, sliding_window)
    dense = create_mask(mask_mod, 2, 4, blocked.nqb * size, listed.shape[-1] * size, device="cpu")
    needed = dense.view(2, 4, blocked.nqb, size, -1, size).any(dim=3).any(dim=-1)
    assert needed.any() and not (needed & ~listed).any()
    if sliding_window is None:
        assert torch.equal(listed, needed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 4e-3)])
def test_dtypes(device, dtype, tol):
    """The kernel takes bf16/fp16 as they are; the output in the input's dtype, within its rounding of the twin's."""
    q, k, v = qkv(dtype=dtype, device=device)
    out = block_support_flex(q, k, v, compiled=False, **SETTINGS)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference.block_support_attention(q, k, v, **SETTINGS).double(),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_equal_the_twins(device):
    if device == "cpu":
        pytest.skip("PyTorch's FlexAttention has no backward on a CPU (the chunked op trains there)")
    q, k, v = qkv(d=16, dtype=torch.float32, device=device)
    grads = []
    settings = dict(SETTINGS, block_size=16, local_window=16)
    for op in (lambda *x: block_support_flex(*x, **settings, compiled=True),
               lambda *x: reference.block_support_attention(*x, **settings)):
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = op(*x)
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        grads.append([t.grad for t in x])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_no_host_synchronisation(monkeypatch):
    """Nothing of sb-hf in a call reads a tensor's value on the host (``.item()``, ``.tolist()``, ``bool()``,
    ``int()``, ``float()``, ``nonzero``): each raises here when sb-hf's code calls it, and the call runs with padding
    and a window. (PyTorch's own wrapper may read a CPU scalar it made of a float argument: not a device sync.)"""
    import sys

    q, k, v = qkv(dtype=torch.float32)
    mask = left_padded(2, 90)
    package = str(Path(flex.__file__).parents[2])

    def trap(name):
        real = getattr(torch.Tensor, name)

        def host_read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(package):
                raise AssertionError(f"a host synchronisation in the hot path: Tensor.{name}")
            return real(self, *args, **kwargs)

        return host_read

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    with pytest.raises(AssertionError, match="host synchronisation"):
        flex.shape_class(torch.tensor(5))  # (the trap is set: sb-hf code reading a tensor's value raises)
    out = block_support_flex(q, k, v, compiled=False, key_padding_mask=mask, sliding_window=40, **SETTINGS)
    monkeypatch.undo()
    torch.testing.assert_close(out, reference.block_support_attention(q, k, v, key_padding_mask=mask, sliding_window=40,
                                                                      **SETTINGS), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_no_device_synchronisation_on_cuda(device):
    """On CUDA, a compiled call after the first of its shape class runs under ``torch.cuda.set_sync_debug_mode
    ("error")``: nothing in it waits for the GPU."""
    if device == "cpu":
        pytest.skip("CUDA's sync debug mode (the CPU has test_no_host_synchronisation)")
    q, k, v = qkv(d=16, dtype=torch.bfloat16, device=device)
    kw = dict(SETTINGS, block_size=16, local_window=16, key_padding_mask=left_padded(2, 90, device=device))
    with torch.no_grad():
        block_support_flex(q, k, v, **kw)  # (compiles)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = block_support_flex(q, k, v, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.shape == q.shape


def test_compiled_once_per_shape_class():
    """A second call of another length of the same class (blocks rounded up to a power of two), other values,
    compiles nothing (the tables are the kernel's inputs, not constants of a graph); a longer class compiles."""
    from torch._dynamo.utils import counters

    kw = dict(SETTINGS, block_size=16, local_window=16)
    graphs = lambda: counters["stats"].get("unique_graphs", 0)
    with torch.no_grad():
        block_support_flex(*qkv(q_len=120, kv_len=120, d=16, dtype=torch.float32), compiled=True, **kw)  # 8 blocks
        before = graphs()
        q, k, v = qkv(q_len=100, kv_len=100, d=16, dtype=torch.float32, seed=2)  # 7 blocks: the class of 8
        out = block_support_flex(q, k, v, compiled=True, **kw)
        assert graphs() == before
        block_support_flex(*qkv(q_len=600, kv_len=600, d=16, dtype=torch.float32), compiled=True, **kw)  # 38: of 64
        assert graphs() == before + 1
    torch.testing.assert_close(out, reference.block_support_attention(q, k, v, **kw), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("engine,device_type,selection,counting,chosen", [
    ("auto", "cuda", "pooled", False, "flex"), ("auto", "cuda", "union", False, "flex"),
    ("auto", "cuda", "row", False, "chunk"), ("auto", "cuda", "pooled", True, "chunk"),
    ("auto", "cpu", "pooled", False, "chunk"), ("flex", "cpu", "pooled", False, "flex"),
    ("chunk", "cuda", "pooled", False, "chunk")])
def test_the_engine_choice(engine, device_type, selection, counting, chosen):
    """FlexAttention on CUDA by default: a test that fails if the CUDA path is skipped."""
    assert engine_for(engine, device_type, selection, counting) == chosen


@pytest.mark.parametrize("device", DEVICES)
def test_the_backend_runs_the_chosen_engine(device, monkeypatch):
    """The backend calls FlexAttention where :func:`engine_for` says so (on CUDA by default), the chunked op
    elsewhere; both give the twin's output."""
    calls = []
    for name in ("block_support_flex", "block_support_attention"):
        real = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    q, k, v = qkv(q_len=90, d=16, dtype=torch.float32, device=device)
    settings = dict(SETTINGS, block_size=16, local_window=16)  # (CUDA's compiled kernel: blocks of 16 and more)
    twin = reference.block_support_attention(q, k, v, **settings)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for engine in ("auto", "flex", "chunk"):
            out = backend.block_support_or_exact(q, k, v, exact_below=0, engine=engine, **settings, stats=None)
            torch.testing.assert_close(out, twin, rtol=2e-5, atol=2e-5)
    auto = "block_support_flex" if device == "cuda" else "block_support_attention"
    assert calls == [auto, "block_support_flex", "block_support_attention"]


def test_bad_settings_say_what_to_change():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="selection shared by a query block's rows"):
        block_support_flex(q, k, v, selection="row")
    with pytest.raises(ValueError, match="engine must be one of"):
        engine_for("triton", "cuda", "pooled", False)
    with pytest.raises(ValueError, match="gives no pair counts"):
        backend.block_support_or_exact(q, k, v, exact_below=0, engine="flex", **SETTINGS, stats={})
    from sb_hf.config import SupportBasisConfig

    with pytest.raises(ValueError, match="block.engine must be one of"):
        SupportBasisConfig.from_dict({"block": {"engine": "triton"}})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,overrides", [("llama", {}), ("mistral", {"sliding_window": 30})])
def test_the_model_on_each_device_runs_its_engine_and_equals_the_twin(device, kind, overrides, monkeypatch):
    """A tiny Llama (GQA) or Mistral (sliding window) with ``attn_implementation="block_support"``, 45 tokens with
    left padding: FlexAttention runs on CUDA and the chunked op on a CPU (the engine counted), and the logits of the
    real tokens are those of the dense twin in the engine's place."""
    from conftest import VOCAB, tiny_model

    calls = []
    for name in ("block_support_flex", "block_support_attention"):
        real = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *a, _real=real, _name=name, **kw: calls.append(_name) or _real(*a, **kw))
    model = tiny_model(kind, head_dim=16, **overrides).to(device)  # (head dim 16: the smallest of CUDA's tiles)
    model.config.support_basis = {"block": {"exact_below": 0, "block_size": 16, "gamma": 0.6}, "sinks": 2,
                                  "local_window": 16}
    model.set_attn_implementation("block_support")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, 45), generator=g).to(device)
    mask = torch.ones(2, 45, dtype=torch.long, device=device)
    mask[-1, :9] = 0
    real_tokens = mask.bool()
    with torch.no_grad():
        fast = model(input_ids=ids, attention_mask=mask).logits[real_tokens]
        engine = "block_support_flex" if device == "cuda" else "block_support_attention"
        assert calls == [engine] * 2  # one call per layer
        monkeypatch.setattr(backend, engine, lambda q, k, v, compiled=None, chunk_blocks=None, **kw:
                            reference.block_support_attention(q, k, v, **kw))
        twin = model(input_ids=ids, attention_mask=mask).logits[real_tokens]
    torch.testing.assert_close(fast, twin, rtol=1e-4, atol=1e-4)
