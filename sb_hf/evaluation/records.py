"""The comparison with exact attention: each sample's prediction and score, the per-task change and agreement
against exact (with paired standard errors), and the summary table."""

from __future__ import annotations

import math
import re
from typing import Any


EXACT = "exact"


def format_settings(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "-"


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
            f"| {r['method']} | {format_settings(r['settings'])} | {r['task']} | {metric} | {r['n']} | {_pct(r['accuracy'])}{se} "
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
