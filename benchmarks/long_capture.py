"""Capture one layer's q/k/v of the packaged SmolLM2-135M past its trained length, for op-level timings on
activations with a real model's structure (``benchmarks/op_scaling.py --capture``).

The model's rotary embedding is stretched by linear position interpolation (``--rope-factor``, default: the
smallest whole factor that brings ``--tokens`` within the trained 8192 positions), and only the layers up to the
captured one run. The text is the packaged news text's second half (about 37,900 tokens).

    python benchmarks/long_capture.py --tokens 32768 --layer 15 --output runs/cap32k_l15.safetensors
    python benchmarks/op_scaling.py --capture runs/cap32k_l15.safetensors --layer 15 --lengths 8192,16384,32768 \
        --methods sdpa,block_support --block '{"gamma": 0.95, "local_window": 128, "estimate": "sampled", "selection": "pooled"}'
"""

from __future__ import annotations

import argparse
import math

import torch

from sb_hf.analysis.capture import capture_text, save_capture
from sb_hf.assets import load_model, news_text_path


def stretched(model, factor: float):
    """``model`` with its rotary embedding rebuilt for linear position interpolation by ``factor``."""
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    config.rope_parameters = {"rope_type": "linear", "factor": float(factor), "rope_theta": theta}
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--rope-factor", type=float, default=None, help="linear RoPE interpolation factor")
    parser.add_argument("--output", default="runs/cap_long.safetensors")
    args = parser.parse_args(argv)
    model, tokenizer = load_model()
    trained = model.config.max_position_embeddings
    factor = args.rope_factor or max(1, math.ceil(args.tokens / trained))
    if factor != 1:
        stretched(model, factor)
    model.model.layers = model.model.layers[: args.layer + 1]  # only the layers up to the captured one run
    model.config.num_hidden_layers = args.layer + 1
    text = news_text_path().read_text(encoding="utf-8")
    capture = capture_text(model, tokenizer, text[len(text) // 2 :], tokens=args.tokens, layers=[args.layer],
                           dtype=torch.float16)
    capture.meta["rope_factor"] = f"{factor:g}"
    path = save_capture(capture, args.output)
    print(f"wrote {path}: layer {args.layer}, {args.tokens} tokens, linear RoPE factor {factor:g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
