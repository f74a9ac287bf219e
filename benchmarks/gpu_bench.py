"""The measurements of the CUDA check (``benchmarks/gpu_check.sh`` runs them in turn; issue 26). Each writes
``DIR/<part>.json``; without CUDA a measurement writes ``{"skipped": why}`` and exits 0, so the script runs anywhere.

    python benchmarks/gpu_bench.py versions --output DIR     # the GPU, torch, transformers, triton
    python benchmarks/gpu_bench.py op --lengths 8192,65536,131072 --output DIR
    python benchmarks/gpu_bench.py model --lengths 8192,32768 --output DIR
    python benchmarks/gpu_bench.py report --output DIR       # the tables (DIR/report.md) from the JSON files

``op``: one Llama-3-8B-shaped layer (32 query heads, 8 KV heads, head dim 128, bf16, batch 1), forward, causal:
SDPA with the flash backend, dense FlexAttention (compiled, causal BlockMask) and block support through FlexAttention
(the defaults, compiled; its time includes the selection), on *synthetic structured* activations
(:func:`structured_qkv`: RoPE'd queries and keys that share a per-head content vector, so attention is local, with a
sink and 16 keys per KV head that every query retrieves, plus noise); each figure the median of ``--repeats`` calls
after two warm-up calls (the first compiles), timed with CUDA events. ``model``: a random-weight SmolLM2-135M-shaped
and a random-weight Llama of about 1B parameters (bf16): prefill time at each length and the per-token decoding time
after it, SDPA against ``attn_implementation="block_support"`` with ``exact_below`` 0. Random weights attend diffusely,
so the block selection keeps more than on a trained model: these are the backend's overheads, not its best case.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path

LLAMA3_8B_LAYER = dict(q_heads=32, kv_heads=8, d=128)
MODELS = {  # LlamaConfig fields of the random-weight models
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "llama-1b-shape": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny-shape": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000, rope_theta=10000.0),  # (the dry run's: not by default)
}


def structured_qkv(n, q_heads=32, kv_heads=8, d=128, *, seed=0, device="cpu", dtype=None, theta=500000.0,
                   retrieved=16):
    """``(1, Hq, n, d)`` queries and ``(1, Hk, n, d)`` keys and values with a real model's kind of structure: per KV
    head a content vector its queries share (1.5x a standard normal) and one its keys share, each row plus noise
    (0.6x), rotated by RoPE (``theta``): scores fall with the distance (a local band). The first key and ``retrieved``
    random keys per KV head carry the queries' content (a sink, and columns every later query retrieves)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    groups = q_heads // kv_heads
    a, b = 1.5 * torch.randn(kv_heads, 1, d, generator=g), 1.5 * torch.randn(kv_heads, 1, d, generator=g)
    q = a.repeat_interleave(groups, 0) + 0.6 * torch.randn(q_heads, n, d, generator=g)
    k = b + 0.6 * torch.randn(kv_heads, n, d, generator=g)
    v = torch.randn(kv_heads, n, d, generator=g)
    columns = torch.randint(1, n, (kv_heads, retrieved), generator=g)
    k[torch.arange(kv_heads)[:, None], columns] += 2.0 * a
    k[:, 0] += 3.0 * a[:, 0]
    angle = torch.arange(n, dtype=torch.float32)[:, None] * theta ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)
    rope = lambda x: x * cos + torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1) * sin
    dtype = dtype or torch.bfloat16
    return tuple(x[None].to(device, dtype).contiguous() for x in (rope(q), rope(k), v))


def timed(fn, device: str) -> tuple[object, float]:
    """``fn()``'s result and its seconds: by CUDA events on CUDA, by the clock on a CPU (a dry run of the script)."""
    import time

    import torch

    if device == "cpu":
        start = time.perf_counter()
        result = fn()
        return result, time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    result = fn()
    end.record()
    torch.cuda.synchronize()
    return result, start.elapsed_time(end) / 1000


def cuda_time(fn, repeats: int, device: str = "cuda") -> float:
    """The median seconds of ``repeats`` calls of ``fn`` after two warm-up calls (:func:`timed`)."""
    for _ in range(2):
        fn()
    return statistics.median(timed(fn, device)[1] for _ in range(repeats))


def versions() -> dict:
    import torch
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
           "platform": platform.platform(), "cuda": torch.version.cuda, "gpu": None}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out |= {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count}
    return out


def op_level(lengths, repeats, save, device="cuda") -> list[dict]:
    """Each length's times (:func:`op_point`), ``save``d after each (an error kept in its row)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    dense_flex = torch.compile(flex_attention, dynamic=False)
    rows = []
    for n in lengths:
        try:
            rows.append(op_point(n, repeats, dense_flex, device))
        except Exception as error:  # (a first run on a new machine: keep the other points)
            rows.append({"n": n, "error": f"{type(error).__name__}: {error}"[:2000]})
        print(json.dumps(rows[-1]), flush=True)
        save(rows)
        torch.cuda.empty_cache()
    return rows


def op_point(n, repeats, dense_flex, device) -> dict:
    """One length of :func:`op_level`."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    from sb_hf.ops.block_support import block_support_flex

    q, k, v = structured_qkv(n, **LLAMA3_8B_LAYER, device=device)
    causal = create_block_mask(lambda b, h, i, j: i >= j, None, None, n, n, device=device)
    info = {}
    with torch.no_grad():
        block_support_flex(q, k, v, compiled=True, info=info)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            sdpa = cuda_time(lambda: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True), repeats, device)
        flex = cuda_time(lambda: dense_flex(q, k, v, block_mask=causal, enable_gqa=True), repeats, device)
        block = cuda_time(lambda: block_support_flex(q, k, v, compiled=True), repeats, device)
    row = {"n": n, "sdpa_flash_s": sdpa, "flex_dense_s": flex, "block_support_s": block,
           "block_vs_sdpa": block / sdpa, "block_vs_flex": block / flex,
           "listed_share": float(info["listed_blocks"] / info["causal_blocks"]),
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    return row


def end_to_end(lengths, new_tokens, repeats, save, device="cuda", models=tuple(MODELS)) -> list[dict]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import sb_hf  # noqa: F401  (registers the backends)

    rows = []
    for name in models:
        fields = MODELS[name]
        torch.manual_seed(0)
        config = LlamaConfig(**fields, max_position_embeddings=max(lengths) + new_tokens + 8)
        config.support_basis = {"block": {"exact_below": 0}}
        model = LlamaForCausalLM(config).to(device, torch.bfloat16).eval()
        for n in lengths:
            try:
                rows.append(model_point(model, name, fields, n, new_tokens, repeats, device))
            except Exception as error:
                rows.append({"model": name, "n": n, "error": f"{type(error).__name__}: {error}"[:2000]})
            print(json.dumps(rows[-1]), flush=True)
            save(rows)
        del model
        torch.cuda.empty_cache()
    return rows


def model_point(model, name, fields, n, new_tokens, repeats, device) -> dict:
    """One model and length of :func:`end_to_end`: the medians after a warm-up round."""
    import torch

    ids = torch.randint(1, fields["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n)).to(device)
    row = {"model": name, "n": n}
    for impl in ("sdpa", "block_support"):
        model.set_attn_implementation(impl)
        prefill, decode = [], []
        for _ in range(repeats + 1):  # (the first round warms up: it compiles)
            p, d = prefill_and_decode(model, ids, new_tokens, device)
            prefill.append(p), decode.append(d)
        row[f"{impl}_prefill_s"] = statistics.median(prefill[1:])
        row[f"{impl}_decode_ms"] = 1000 * statistics.median(decode[1:])
    row["prefill_vs_sdpa"] = row["block_support_prefill_s"] / row["sdpa_prefill_s"]
    row["decode_vs_sdpa"] = row["block_support_decode_ms"] / row["sdpa_decode_ms"]
    return row


def prefill_and_decode(model, ids, new_tokens, device) -> tuple[float, float]:
    """The prefill's seconds (the last position's logits, as ``generate()``) and the median seconds of a greedy
    decoding step after it."""
    import torch

    from sb_hf.integrations.cache import cache_argument, returned_cache

    name = cache_argument(model)  # ("cache" or "past_key_values": transformers renamed it)
    with torch.no_grad():
        out, prefill = timed(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), device)
        steps = []
        for _ in range(new_tokens):
            cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
            out, seconds = timed(lambda: model(input_ids=token, use_cache=True, **{name: cache}), device)
            steps.append(seconds)
    return prefill, statistics.median(steps)


def report(folder: Path) -> str:
    """The tables of the JSON files in ``folder`` as markdown."""
    read = lambda name: json.loads((folder / f"{name}.json").read_text()) if (folder / f"{name}.json").exists() else None
    lines = []
    info = read("versions") or {}
    lines.append(f"GPU: {info.get('gpu') or 'none'}; torch {info.get('torch')}, transformers {info.get('transformers')}, "
                 f"triton {info.get('triton')}, CUDA {info.get('cuda')}")
    op, model = read("op"), read("model")
    for title, part, columns in (
            ("Op level, one Llama-3-8B-shaped layer (bf16, forward)", op,
             ("n", "sdpa_flash_s", "flex_dense_s", "block_support_s", "block_vs_sdpa", "block_vs_flex", "listed_share")),
            ("End to end, random weights (bf16)", model,
             ("model", "n", "sdpa_prefill_s", "block_support_prefill_s", "prefill_vs_sdpa", "sdpa_decode_ms",
              "block_support_decode_ms", "decode_vs_sdpa"))):
        lines += ["", f"## {title}", ""]
        if part is None or "skipped" in part:
            lines.append(f"skipped: {(part or {}).get('skipped', 'not run')}")
            continue
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in part["rows"]:
            cell = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)
            lines.append("| " + " | ".join(cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("versions", "op", "model", "report"))
    parser.add_argument("--lengths", default=None, help="op: default 8192,65536,131072; model: 8192,32768")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a dry run of the script's code (times not comparable)")
    parser.add_argument("--models", default="smollm2-135m-shape,llama-1b-shape",
                        help=f"model: comma list of {tuple(MODELS)}")
    parser.add_argument("--output", default="runs/gpu_check")
    args = parser.parse_args()
    folder = Path(args.output)
    folder.mkdir(parents=True, exist_ok=True)
    if args.part == "report":
        text = report(folder)
        (folder / "report.md").write_text(text)
        print(text)
        return
    if args.part == "versions":
        result = versions()
    else:
        import torch

        default = "8192,65536,131072" if args.part == "op" else "8192,32768"
        lengths = [int(x) for x in (args.lengths or default).split(",")]
        if args.device == "cuda" and not torch.cuda.is_available():
            result = {"skipped": "no CUDA device"}
        else:
            save = lambda rows: (folder / f"{args.part}.json").write_text(json.dumps({"rows": rows}, indent=1))
            if args.part == "op":
                result = {"rows": op_level(lengths, args.repeats, save, args.device)}
            else:
                result = {"rows": end_to_end(lengths, args.new_tokens, max(1, math.ceil(args.repeats / 2)), save,
                                             args.device, args.models.split(","))}
    (folder / f"{args.part}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result if args.part == "versions" else {k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
