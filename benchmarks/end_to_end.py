"""End to end: a model's prefill time and per-token decoding time vs context length, SDPA against support
basis (the defaults, or a settings file such as ``sb-hf calibrate``'s ``support_basis.json``), or against another
implementation (``--method block_support``), or against no attention at all (``--method no_attention``: every
attention call returns zeros without reading a key, so the model's other work remains; SDPA's time over it bounds
what any attention implementation can save end to end).

    python benchmarks/end_to_end.py --settings runs/calibrate_q_8k/budget_0.05/support_basis.json \
        --lengths 2048,4096,8192 --output runs/end_to_end
    python benchmarks/end_to_end.py --method block_support --lengths 4096,8192 --output runs/end_to_end_block

Prefill: one forward pass over the first n tokens of the packaged news text (with the default model;
random token ids with --model, a local folder) that, as ``generate()``'s, computes the logits of the last
position only (--all-logits: every position's, as a scoring pass). Decoding: then --new-tokens greedy steps with the cache,
timed per step: the median of the steps after the first (support basis's first step also folds the
prompt's keys into its decoding state; its time is reported apart). "Steps from state" counts the steps support
basis computed from its decoding states, for the layer with the fewest: all of them when the fast path ran.
Each backend first runs once on a 512-token prefix (a warm-up: first calls pay one-time costs); then, per length, --repeats rounds of both
backends in turn (the load of a shared machine drifts within a run, and alike for both), each figure the
median over the rounds. --cpu-kernel adds support basis with its C++ decoding step (``sb_hf.ops.use_cpu_kernel``;
its prefill is the same computation) as a third backend. Prints the machine, a table, and writes JSON and a PNG
to --output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

METHODS = ("support_basis", "block_support", "no_attention")  # what --method takes (SDPA always runs)
NO_ATTENTION = "sb_hf_no_attention"  # the bound's attention function, as transformers' interfaces know it


WARMUP_TOKENS = 512


def token_ids(model_path: str | None, n: int):
    import torch

    from sb_hf.assets import load_model, news_text_path

    if model_path is None:
        model, tokenizer = load_model()
        ids = tokenizer(news_text_path().read_text(encoding="utf-8"), return_tensors="pt").input_ids[:, :n]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        ids = torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    if ids.shape[1] < n:
        raise SystemExit(f"the text has {ids.shape[1]} tokens, fewer than n = {n}")
    return model, ids


def register_no_attention() -> None:
    """Register :data:`NO_ATTENTION`: zeros of the attention output's shape, no key read (the KV cache still
    grows as with any implementation: the model's layers update it before calling the attention function)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from sb_hf.integrations.masks import support_basis_mask

    def no_attention(module, query, key, value, attention_mask, **kwargs):
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    AttentionInterface.register(NO_ATTENTION, no_attention)
    AttentionMaskInterface.register(NO_ATTENTION, support_basis_mask)  # (a 2-D mask: the cheapest to build)


def measure(model, ids, new_tokens: int, all_logits: bool = False) -> dict:
    """Prefill as ``generate()`` runs it: the logits of the last position only (``logits_to_keep=1``; with
    ``all_logits`` every position's, as a scoring pass needs: 8192 x 49152 more for SmolLM2), then greedy steps.
    ``state_steps``: the decoding steps the layers computed from their support-basis decoding states (0 for
    SDPA; a support-basis run that shows fewer than its steps ran the whole op per token)."""
    import torch

    from sb_hf.integrations.cache import cache_argument, layer_states, returned_cache

    keep = {} if all_logits else {"logits_to_keep": 1}
    name = cache_argument(model)
    with torch.no_grad():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, **keep)
        prefill = time.perf_counter() - start
        cache, token, steps = returned_cache(out), out.logits[:, -1:].argmax(-1), []
        for _ in range(new_tokens):
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{name: cache})
            steps.append(time.perf_counter() - start)
            cache, token = returned_cache(out), out.logits[:, -1:].argmax(-1)
    per_layer = [sum(state.served_steps for state in states.values()) for states in layer_states(cache)]
    steady = sorted(steps[1:] or steps)
    return {"prefill_seconds": prefill, "prefill_tokens_per_second": ids.shape[1] / prefill,
            "first_step_ms": 1000 * steps[0], "decode_ms_per_token": 1000 * steady[len(steady) // 2],
            "state_steps": min(per_layer, default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a local model folder (default: the packaged SmolLM2-135M)")
    parser.add_argument("--method", default="support_basis", choices=METHODS, help="the implementation against SDPA "
                        "(default support_basis)")
    parser.add_argument("--settings", default=None, help="settings file of the method (default: the defaults)")
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--new-tokens", type=int, default=8, help="decoding steps timed after the prefill (default 8)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of both backends per length (default 3)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-kernel", action="store_true",
                        help="also support basis with the C++ decoding step (sb_hf.ops.use_cpu_kernel; built on first use)")
    parser.add_argument("--all-logits", action="store_true",
                        help="prefill computes every position's logits (a scoring pass), not only the last (as generate())")
    parser.add_argument("--output", default="runs/end_to_end")
    args = parser.parse_args()
    if args.new_tokens < 1 or args.repeats < 1:
        parser.error("--new-tokens and --repeats must be >= 1")
    if args.cpu_kernel and args.method != "support_basis":
        parser.error("--cpu-kernel is support_basis's C++ decoding step; drop it with --method block_support")

    import torch

    import sb_hf

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    model, ids = token_ids(args.model, max(lengths))
    methods = ("sdpa", args.method) + (("support_basis_cpu_kernel",) if args.cpu_kernel else ())

    register_no_attention()

    def use(method):
        if method in ("sdpa", "no_attention"):
            sb_hf.revert_support_basis(model)
            if method == "no_attention":
                model.set_attn_implementation(NO_ATTENTION)
        else:
            sb_hf.apply_support_basis(model, config=args.settings, method=args.method)
        sb_hf.ops.use_cpu_kernel(method == "support_basis_cpu_kernel")

    for method in methods:  # warm up: the first call of each kernel pays one-time costs a running model has paid
        use(method)
        measure(model, ids[:, :WARMUP_TOKENS], 2)
    rows = []
    for n in lengths:
        rounds = {method: [] for method in methods}
        for _ in range(args.repeats):
            for method in methods:
                use(method)
                rounds[method].append(measure(model, ids[:, :n], args.new_tokens, args.all_logits))
        for method, runs in rounds.items():
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            rows.append({"method": method, "n": n, **median, "prefill_seconds_each": [run["prefill_seconds"] for run in runs]})
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads; model: "
          f"{args.model or 'SmolLM2-135M (packaged)'}; {args.method}: {args.settings or 'defaults'}; "
          f"{args.new_tokens} decoding steps; prefill logits: {'every position' if args.all_logits else 'the last (as generate())'}; "
          f"medians of {args.repeats} rounds")
    print(f"{'n':>6} {'method':>24} {'prefill s':>10} {'tokens/s':>9} {'vs sdpa':>8} {'first step ms':>14} "
          f"{'decode ms/token':>16} {'vs sdpa':>8} {'steps from state':>17}")
    sdpa = {r["n"]: r for r in rows if r["method"] == "sdpa"}
    for r in rows:
        base = sdpa[r["n"]]
        print(f"{r['n']:>6} {r['method']:>24} {r['prefill_seconds']:>10.2f} {r['prefill_tokens_per_second']:>9.0f} "
              f"{r['prefill_seconds'] / base['prefill_seconds']:>7.2f}x {r['first_step_ms']:>14.1f} {r['decode_ms_per_token']:>16.1f} "
              f"{r['decode_ms_per_token'] / base['decode_ms_per_token']:>7.2f}x {r['state_steps']:>8.0f} of {args.new_tokens:<5}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "end_to_end.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    from plotting import loglog_panels

    loglog_panels(rows, methods, [(lambda r: r["prefill_seconds"], "seconds", "prefill"),
                                  (lambda r: r["decode_ms_per_token"], "ms per token", "decoding")],
                  "context length", out / "end_to_end.png")


if __name__ == "__main__":
    main()
