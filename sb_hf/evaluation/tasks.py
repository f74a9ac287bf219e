"""lm-eval glue: the bundled task folder (``eval/tasks``), lm-eval's task manager, which samples run, and quieter logs."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path


TASK_ALIASES = {"gsm8k": "sb_gsm8k_cot", "mmlu": "sb_mmlu"}
TASKS_DIR_ENV = "SB_HF_TASKS_DIR"


def tasks_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder of the packaged task YAMLs: ``path``, ``$SB_HF_TASKS_DIR`` or ``eval/tasks`` of the checkout."""
    candidate = Path(path or os.environ.get(TASKS_DIR_ENV) or Path(__file__).resolve().parents[2] / "eval" / "tasks")
    if not (candidate / "sb_gsm8k_cot.yaml").is_file():
        raise FileNotFoundError(
            f"no sb-hf task definitions in {candidate} (sb_gsm8k_cot.yaml missing); they live in eval/tasks of the "
            f"sb-hf source tree: install it editable (pip install -e .) or pass --include-path / set ${TASKS_DIR_ENV}"
        )
    return candidate


def require_lm_eval():
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
