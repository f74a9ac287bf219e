"""Supervised fine-tuning with TRL's SFTTrainer on a plain text file, written as a user writes it: no sb-hf in it.

    python patches/sft_trl.py --model runs/smollm2 --max-steps 20                       # as written: SDPA
    sb-hf run -- patches/sft_trl.py --model runs/smollm2 --max-steps 20                 # support-basis attention
    sb-hf run --config runs/calibrate/support_basis.json -- patches/sft_trl.py --model runs/smollm2

SFTTrainer loads the model from its path (``AutoModelForCausalLM.from_pretrained`` inside TRL), which is where
``sb-hf run`` switches it. ``--model``: a plain model folder (``runs/smollm2``: the packaged SmolLM2-135M, saved by
the command in patches/README.md); ``--text``: a UTF-8 file cut into ``--block-size``-character examples (default: the
packaged news text). Prints ``RESULT {json}``: the attention implementation the model trained with, the first and
last training losses, the steps.
"""

import argparse
import json
import math

from datasets import Dataset
from trl import SFTConfig, SFTTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder (from_pretrained)")
    parser.add_argument("--text", default=None, help="UTF-8 text file (default: the packaged news text)")
    parser.add_argument("--block-size", type=int, default=512, help="characters per example (default 512)")
    parser.add_argument("--max-length", type=int, default=128, help="tokens per example after truncation")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--output", default="runs/sft_trl")
    args = parser.parse_args()
    if args.text is None:
        from sb_hf.assets import news_text_path  # (only locates the packaged file)

        args.text = str(news_text_path())
    text = open(args.text, encoding="utf-8").read()
    examples = [text[i : i + args.block_size] for i in range(0, len(text) - args.block_size + 1, args.block_size)]
    config = SFTConfig(output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                       max_length=args.max_length, learning_rate=5e-5, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=True, seed=0, packing=False, dataset_text_field="text")
    trainer = SFTTrainer(model=args.model, args=config, train_dataset=Dataset.from_dict({"text": examples}))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    result = {"attn_implementation": trainer.model.config._attn_implementation, "first_loss": losses[0],
              "last_loss": losses[-1], "steps": trainer.state.global_step, "finite": all(map(math.isfinite, losses))}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
