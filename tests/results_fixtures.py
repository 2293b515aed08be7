"""Synthetic lm-eval results files with the harness's real layout, for the compare/check tests.

``write_run`` writes what ``lm_eval --output_path OUT --log_samples`` writes (lm-eval 0.4.x):
``OUT/<model_name_sanitized>/results_<date>.json`` and ``samples_<task>_<date>.jsonl`` next to it.
The JSON keys follow ``lm_eval.evaluator`` / ``evaluator_utils`` / ``loggers.evaluation_tracker``:
``"metric,filter"`` values, ``"metric_stderr,filter"`` (``"N/A"`` when lm-eval has none, as for
IFEval's instruction-level accuracies), ``versions``, ``n-samples``, ``configs``, ``config`` and, for
``steered-hf`` runs, ``config["steering"]``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lm_eval_steer.runtime.harness import logged_doc_hash

DATE = "2025-01-01T12-00-00.000000"

# (value, stderr) per metric; stderr None is written as lm-eval's "N/A".
Scores = Mapping[str, tuple[float, float | None]]


def ifeval_scores(prompt_strict: float, inst_strict: float, prompt_loose: float, inst_loose: float, se: float | None = 0.05) -> dict[str, tuple[float, float | None]]:
    """IFEval's four metrics; prompt-level ones carry ``se``, instruction-level ones "N/A" as in lm-eval."""
    return {
        "prompt_level_strict_acc": (prompt_strict, se),
        "inst_level_strict_acc": (inst_strict, None),
        "prompt_level_loose_acc": (prompt_loose, se),
        "inst_level_loose_acc": (inst_loose, None),
    }


def steering_config(vector: str = "vectors/fmt.safetensors", layers: Sequence[int] = (12,), strength: float = 4.5, route: str = "auto") -> dict[str, Any]:
    """``config["steering"]`` as ``steered-hf`` records it."""
    return {
        "route": route,
        "overrides": {},
        "vector_files": [
            {
                "path": vector,
                "sha256": "0" * 64,
                "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                "entries": [
                    {
                        "name": f"entry{layer}",
                        "layer": layer,
                        "mode": "project",
                        "strength": strength,
                        "positions": "all",
                        "applies_to": [f"instruction:{layer}"],
                    }
                    for layer in layers
                ],
            }
        ],
    }


def task_results(task: str, scores: Scores, n: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"alias": task, "sample_len": n}
    for metric, (value, stderr) in scores.items():
        entry[f"{metric},none"] = value
        entry[f"{metric}_stderr,none"] = "N/A" if stderr is None else stderr
    return entry


def results_json(
    tasks: Mapping[str, Scores],
    *,
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct",
    model_type: str = "hf",
    limit: float | None = 20.0,
    versions: Mapping[str, Any] | None = None,
    gen_kwargs: Any = None,
    task_gen_kwargs: Mapping[str, Any] | None = None,
    steering: Mapping[str, Any] | None = None,
    n: int = 20,
    lower_is_better: Sequence[str] = (),
    model_args: Mapping[str, Any] | str | None = None,
) -> dict[str, Any]:
    """The dict lm-eval serialises into ``results_<date>.json`` (fields we do not read left out).
    ``model_args`` (default ``{"pretrained": model}``) is ``config.model_args``: where the tokenizer comes from."""
    versions = versions or {}
    task_gen_kwargs = task_gen_kwargs or {}
    config: dict[str, Any] = {
        "model": model_type,
        "model_args": {"pretrained": model} if model_args is None else model_args,
        "batch_size": 8,
        "device": "cpu",
        "limit": limit,
        "bootstrap_iters": 100000,
        "gen_kwargs": gen_kwargs,
        "random_seed": 0,
    }
    if steering is not None:
        config["steering"] = dict(steering)
    return {
        "results": {task: task_results(task, scores, n) for task, scores in tasks.items()},
        "group_subtasks": {task: [] for task in tasks},
        "configs": {
            task: {"task": task, "generation_kwargs": task_gen_kwargs.get(task, {"until": [], "do_sample": False, "max_gen_toks": 192})}
            for task in tasks
        },
        "versions": {task: versions.get(task, 4.0) for task in tasks},
        "n-shot": {task: 0 for task in tasks},
        "higher_is_better": {task: {metric: metric not in lower_is_better for metric in scores} for task, scores in tasks.items()},
        "n-samples": {task: {"original": 541, "effective": n} for task in tasks},
        "config": config,
        "model_name": model,
        "model_name_sanitized": model.replace("/", "__"),
        "chat_template_sha": None,
    }


def write_run(
    out: Path,
    tasks: Mapping[str, Scores],
    *,
    date: str = DATE,
    samples: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    **options: Any,
) -> Path:
    """Writes one run under ``out`` as lm-eval would; returns the results file."""
    data = results_json(tasks, **options)
    directory = out / data["model_name_sanitized"]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"results_{date}.json"
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    for task, lines in (samples or {}).items():
        sample_file = directory / f"samples_{task}_{date}.jsonl"
        sample_file.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def ifeval_sample(doc_id: int, followed: Mapping[str, bool], strict: Mapping[str, bool] | None = None, response: str | None = None) -> dict[str, Any]:
    """One ``samples_<task>_<date>.jsonl`` line of an IFEval task: per-instruction outcomes in order;
    with ``response``, also the request and the generated answer, as lm-eval logs them."""
    ids = list(followed)
    strict = strict if strict is not None else followed
    answer = {} if response is None else {"arguments": [[f"prompt {doc_id}", {"max_gen_toks": 192}]], "resps": [[response]], "filtered_resps": [response]}
    doc = {"key": 1000 + doc_id, "prompt": "...", "instruction_id_list": ids, "kwargs": [{} for _ in ids]}
    return {
        "doc_id": doc_id,
        "doc": doc,
        "doc_hash": logged_doc_hash(doc),
        "target": "0",
        "filter": "none",
        "metrics": ["prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc"],
        "prompt_level_strict_acc": all(strict[i] for i in ids),
        "inst_level_strict_acc": [strict[i] for i in ids],
        "prompt_level_loose_acc": all(followed.values()),
        "inst_level_loose_acc": [followed[i] for i in ids],
        **answer,
    }


#: An answer that loops (one sentence 20 times: far more than half of its token 4-grams repeat) and
#: answers that do not (a plain sentence; a repetition too short to judge, under 16 tokens).
LOOPING = "I like green apples. " * 20
FLUENT = "The quick brown fox jumps over the lazy dog while the farmer watches from his porch."
SHORT_REPEAT = "yes yes yes"


def answered_samples(outcomes: Sequence[tuple[bool, str]]) -> list[dict[str, Any]]:
    """IFEval samples lines, one per ``(prompt passes, answer)``, doc ids 0, 1, ..."""
    return [ifeval_sample(doc_id, {"keywords:existence": passed}, response=text) for doc_id, (passed, text) in enumerate(outcomes)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def gzip_samples(results: Path) -> list[Path]:
    """Replaces every samples file next to ``results`` with its gzip-compressed copy
    (``samples_<task>_<date>.jsonl.gz``, as baselines are committed); returns the new files."""
    compressed = []
    for path in sorted(results.parent.glob("samples_*.jsonl")):
        target = path.with_name(path.name + ".gz")
        target.write_bytes(gzip.compress(path.read_bytes()))
        path.unlink()
        compressed.append(target)
    return compressed
