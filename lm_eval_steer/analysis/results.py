"""Reading lm-eval results files into typed records, shared by ``compare`` and ``check``.

lm-eval's ``--output_path DIR`` writes ``DIR/<model_name_sanitized>/results_<date>.json`` and, with
``--log_samples``, ``samples_<task>_<date>.jsonl`` next to it (same ``<date>``). ``--output_path
x.json`` writes ``x_<date>.json`` instead. A results JSON holds, among others::

    results[task]["prompt_level_loose_acc,none"]          value   (metric,filter)
    results[task]["prompt_level_loose_acc_stderr,none"]   its standard error (or "N/A")
    versions[task], n-samples[task]["effective"], higher_is_better[task][metric]
    configs[task]["generation_kwargs"], config["limit"], config["gen_kwargs"], config["steering"]

This module knows that layout for analysis (locating and reading the files is
:mod:`lm_eval_steer.core.outputs`, shared with the runtime's reuse of a baseline's answers). It also decides what one leaderboard row is: a run's label, and split runs merged into one.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lm_eval_steer.core.digest import file_sha256
from lm_eval_steer.core.errors import brief

# Where lm-eval puts a run's files and how they are read is shared with the runtime (reuse of a
# baseline's answers); ResultsError is that module's error, under the name analysis code uses.
from lm_eval_steer.core.outputs import OutputError as ResultsError
from lm_eval_steer.core.outputs import date_id, find_results_files, find_sample_files, read_results_json, read_samples  # noqa: F401 (re-exported)

#: IFEval's four metrics in the order tables show them; the default selection when present.
IFEVAL_METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)

#: lm-eval's default filter name: metrics under it are shown without the ",none" suffix.
DEFAULT_FILTER = "none"

@dataclass(frozen=True)
class MetricValue:
    """One aggregated metric of one task: the value and its standard error (None when unknown)."""

    value: float
    stderr: float | None
    higher_is_better: bool = True


@dataclass
class Run:
    """One run (one results file, or several split runs merged), reduced to what comparing and checking need."""

    paths: tuple[Path, ...]  # its results file(s)
    label: str
    model: str
    steering: dict[str, Any] | None
    metrics: dict[str, dict[str, MetricValue]]  # task -> metric id -> value
    versions: dict[str, Any]
    n_samples: dict[str, int | None]  # task -> effective number of documents
    limit: Any
    gen_kwargs: dict[str, Any] | None
    task_gen_kwargs: dict[str, Any]  # task -> effective generation_kwargs from the task config
    chat_template_sha: str | None
    sample_files: dict[str, Path] = field(default_factory=dict)  # task -> samples_*.jsonl
    unreadable: dict[str, list[str]] = field(default_factory=dict)  # task -> metric ids whose value is not a finite number
    # config.steering.unsteered_from of each results file that reused a baseline's unsteered answers
    reused_from: tuple[dict[str, Any], ...] = ()
    # config.steering.steered_from of each results file that reused an earlier steered run's answers
    steered_from: tuple[dict[str, Any], ...] = ()
    # config.model_args: where the run's model (and so its tokenizer) came from
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """Its (first) results file."""
        return self.paths[0]

    @property
    def tasks(self) -> list[str]:
        return list(self.metrics)


# --------------------------------------------------------------------------- parsing


def metric_id(metric: str, filter_name: str) -> str:
    """``metric`` under the default filter, ``metric,filter`` otherwise (as lm-eval keys it)."""
    return metric if filter_name == DEFAULT_FILTER else f"{metric},{filter_name}"


def _as_float(value: Any) -> float | None:
    """A finite float, or None for lm-eval's "N/A" placeholders, nulls and non-numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        return None
    return number if math.isfinite(number) else None


def unreadable_metrics(task_results: Mapping[str, Any]) -> list[str]:
    """Metric ids whose value is not a finite number (a string, NaN, a list ...); stderrs not included."""
    return [
        metric_id(name, filter_name)
        for key, raw in task_results.items()
        for name, comma, filter_name in [key.partition(",")]
        if comma and not name.endswith("_stderr") and _as_float(raw) is None
    ]


def parse_task_metrics(task_results: Mapping[str, Any], higher: Mapping[str, Any]) -> dict[str, MetricValue]:
    """``{"m,filter": v, "m_stderr,filter": se, "alias": ...}`` -> ``{metric id: MetricValue}``
    (metrics whose value is not a finite number are left out: :func:`unreadable_metrics`)."""
    metrics: dict[str, MetricValue] = {}
    for key, raw in task_results.items():
        name, comma, filter_name = key.partition(",")
        if not comma or name.endswith("_stderr"):
            continue  # "alias", "sample_len" and stderr entries (read with their metric below)
        value = _as_float(raw)
        if value is None:
            continue
        stderr = _as_float(task_results.get(f"{name}_stderr,{filter_name}"))
        metrics[metric_id(name, filter_name)] = MetricValue(value, stderr, bool(higher.get(name, True)))
    return metrics


def parse_gen_kwargs(raw: Any) -> dict[str, Any] | None:
    """``--gen_kwargs`` as recorded: a dict, None, or the CLI string ``"k=v,k2=v2"``."""
    if raw is None or raw == "":
        return None
    if isinstance(raw, Mapping):
        return dict(raw)
    if isinstance(raw, str):
        pairs = (item.partition("=") for item in raw.split(",") if item.strip())
        return {key.strip(): value.strip() for key, _, value in pairs}
    return {"value": raw}


def parse_model_args(raw: Any) -> dict[str, Any]:
    """``config.model_args`` as recorded: a dict, or the CLI string ``"k=v,k2=v2"``; ``{}`` for anything else."""
    model_args = parse_gen_kwargs(raw) if isinstance(raw, str) else raw  # same "k=v,k2=v2" syntax
    return dict(model_args) if isinstance(model_args, Mapping) else {}


def model_name(data: Mapping[str, Any]) -> str:
    """A short model name: the GGUF file's stem, else the last part of the model path."""
    config = data.get("config") or {}
    model_args = parse_model_args(config.get("model_args"))
    gguf = model_args.get("gguf_file")
    if gguf:
        return Path(str(gguf)).name.removesuffix(".gguf")
    name = data.get("model_name") or model_args.get("pretrained") or config.get("model") or "unknown-model"
    return Path(str(name).rstrip("/")).name or str(name)


def _number_range(values: Sequence[Any], prefix: str) -> str:
    """``L12`` for one value, ``L10,12`` for a few, ``L10..22`` for many."""
    unique = sorted(set(values), key=lambda v: (isinstance(v, str), v))
    if not unique:
        return ""
    if len(unique) <= 3:
        return prefix + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in unique)
    return f"{prefix}{unique[0]:g}..{unique[-1]:g}"


def _override_parts(overrides: Mapping[str, Any]) -> list[str]:
    """``L9``, ``x1.5``, ``mode=add``, ``positions=generated`` for the overrides a run set."""
    parts = [f"L{overrides['layer']}"] if "layer" in overrides else []
    parts += [f"x{overrides['scale']}"] if "scale" in overrides else []
    return parts + [f"{key}={overrides[key]}" for key in ("mode", "positions") if key in overrides]


def steering_label(steering: Mapping[str, Any] | None) -> str:
    """The steering part of a run's default label: vector file stems, overrides, route.

    ``""`` for runs without steering (plain ``hf``); ``"route=none"`` for a ``steered-hf`` baseline.
    Layers and strengths live in the vector files; :func:`steering_description` spells them out.
    """
    if steering is None:
        return ""
    route = steering.get("route", "auto")
    if route == "none":
        return "route=none"
    files = steering.get("vector_files") or []
    stems = "+".join(Path(str(file.get("path", "?"))).stem for file in files) or "no-vectors"
    return " ".join([stems, *_override_parts(steering.get("overrides") or {}), f"route={route}"])


def steering_description(steering: Mapping[str, Any] | None) -> str:
    """Every detail of a run's steering for the leaderboard's Runs table: vector files, the layers and
    strengths of their entries (or the overrides), route; ``""`` for runs without steering."""
    if steering is None or steering.get("route") == "none":
        return steering_label(steering)
    overrides = steering.get("overrides") or {}
    files = steering.get("vector_files") or []
    entries = [entry for file in files for entry in (file.get("entries") or [])]
    parts = ["+".join(Path(str(file.get("path", "?"))).name for file in files) or "no-vectors"]
    if "layer" not in overrides:
        parts.append(_number_range([e["layer"] for e in entries if "layer" in e], "L"))
    if "scale" not in overrides:
        parts.append(_number_range([e["strength"] for e in entries if "strength" in e], "c="))
    parts += [*_override_parts(overrides), f"route={steering.get('route', 'auto')}"]
    return " ".join(part for part in parts if part)


def reuse_description(records: Sequence[Mapping[str, Any]], steered: Sequence[Mapping[str, Any]] = ()) -> str:
    """``reused 662 unsteered answers from results_x.json`` for the runs table (and, for ``steered_from=``
    records, ``; 417 answers of unchanged steering from results_y.json``); ``""`` without reuse."""

    def described(group: Sequence[Mapping[str, Any]], what: str) -> str:
        reused = sum(sum((record.get("reused_requests") or {}).values()) for record in group)
        files = ", ".join(dict.fromkeys(Path(str(record.get("results_file", "?"))).name for record in group))
        return f"{reused} {what} from {files}"

    parts = ([described(records, "unsteered answers")] if records else []) + ([described(steered, "answers of unchanged steering")] if steered else [])
    return f"reused {'; '.join(parts)}" if parts else ""


def reuse_mismatches(run: Run, baseline: Run) -> list[str]:
    """The baselines ``run`` reused unsteered answers from that are not ``baseline``'s results file(s):
    its unsteered documents then come from another run than the one it is compared with. Those are its
    ``unsteered_from=`` baselines and, through each ``steered_from=`` run, that run's own (recorded in
    its record): the unsteered answers served from an earlier steered run may have come from there."""
    records = [*run.reused_from, *(nested for record in run.steered_from if (nested := record.get("unsteered_from")))]
    if run is baseline or not records:
        return []
    hashes = {file_sha256(path) for path in baseline.paths if path.is_file()}
    return [
        f"reused unsteered answers from {record.get('results_file')} (sha256 {str(record.get('sha256'))[:12]}), not from the baseline it is compared with"
        for record in records
        if record.get("sha256") not in hashes
    ]


def run_label(model: str, steering: Mapping[str, Any] | None) -> str:
    """``model`` for a plain run, ``model [steering]`` for a ``steered-hf`` run."""
    detail = steering_label(steering)
    return f"{model} [{detail}]" if detail else model


#: The parts of a results file that must be JSON objects when present, and what each task maps to.
_OBJECTS = ("config", "higher_is_better", "n-samples", "configs", "versions")
_PER_TASK_OBJECTS = ("results", "higher_is_better", "configs")


def _shape_problem(data: Mapping[str, Any]) -> str | None:
    """What is structurally wrong with a parsed results file (None when it can be read)."""
    if not isinstance(data.get("results"), dict):
        return "not an lm-eval results file (no 'results' object)"
    if not data["results"]:
        return "'results' is empty: the run scored no task"
    for key in _OBJECTS:
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"'{key}' is a {type(data[key]).__name__}, not an object"
    for key in _PER_TASK_OBJECTS:
        for task, value in (data.get(key) or {}).items():
            if not isinstance(value, dict):
                return f"'{key}' of task {brief(task)} is a {type(value).__name__}, not an object"
    if not _steering_readable((data.get("config") or {}).get("steering")):
        return "'config.steering' is not what steered-hf records (route, overrides, vector_files with their entries)"
    return None


def _steering_readable(steering: Any) -> bool:
    """``config.steering`` absent, or laid out as :meth:`SteeredHFLM.steering_config` writes it."""
    if steering is None:
        return True
    if not isinstance(steering, dict) or not isinstance(steering.get("overrides") or {}, dict):
        return False
    files = steering.get("vector_files") or []
    entries = [entry for file in files if isinstance(file, dict) for entry in (file.get("entries") or [])] if isinstance(files, list) else None
    return (
        entries is not None
        and all(isinstance(file, dict) and isinstance(file.get("entries") or [], list) for file in files)
        and all(isinstance(entry, dict) and all(_as_float(entry.get(key, 0)) is not None for key in ("layer", "strength")) for entry in entries)
    )


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, checked to have the layout this module reads, or a ResultsError
    naming the file and the reason."""
    data = read_results_json(path)
    problem = _shape_problem(data)
    if problem is not None:
        raise ResultsError(f"{path}: {problem}")
    return data


def load_run(path: Path) -> Run:
    """Parses one results JSON file."""
    data = read_json(path)
    config = data.get("config") or {}
    higher = data.get("higher_is_better") or {}
    metrics = {task: parse_task_metrics(values, higher.get(task) or {}) for task, values in data["results"].items()}
    n_samples = {
        task: (counts.get("effective") if isinstance(counts, Mapping) else None)
        for task, counts in (data.get("n-samples") or {}).items()
    }
    task_configs = data.get("configs") or {}
    steering = config.get("steering")
    model = model_name(data)
    return Run(
        paths=(path,),
        label=run_label(model, steering),
        model=model,
        steering=steering,
        metrics=metrics,
        versions=dict(data.get("versions") or {}),
        n_samples=n_samples,
        limit=config.get("limit"),
        gen_kwargs=parse_gen_kwargs(config.get("gen_kwargs")),
        task_gen_kwargs={
            task: cfg.get("generation_kwargs") for task, cfg in task_configs.items() if isinstance(cfg, Mapping)
        },
        chat_template_sha=data.get("chat_template_sha"),
        sample_files=find_sample_files(path, metrics),
        unreadable={task: bad for task, values in data["results"].items() if (bad := unreadable_metrics(values))},
        reused_from=tuple(record for record in [(steering or {}).get("unsteered_from")] if record),
        steered_from=tuple(record for record in [(steering or {}).get("steered_from")] if record),
        model_args=parse_model_args(config.get("model_args")),
    )


def load_runs(paths: Sequence[str | os.PathLike[str]], labels: Sequence[str] | None = None) -> list[Run]:
    """Every run the given files/directories stand for (each file once), split runs merged
    (:func:`merge_split_runs`), labels made unique. ``labels`` (``--label``): one per path, in order;
    every results file a path stands for takes its label."""
    if labels and len(labels) != len(paths):
        raise ResultsError(f"--label given {len(labels)} times for {len(paths)} runs: give one per RUN, in order")
    runs: dict[Path, Run] = {}
    for index, path in enumerate(paths):
        for file in find_results_files(Path(path)):
            if file.resolve() in runs:
                continue
            run = load_run(file)
            if labels:
                run.label = labels[index]
            runs[file.resolve()] = run
    merged = merge_split_runs(list(runs.values()))
    make_labels_unique(merged)
    return merged


def load_single_run(path: str | os.PathLike[str]) -> Run:
    """The one run ``path`` stands for; an error if a directory holds results of several models."""
    files = find_results_files(Path(path))
    if len(files) > 1:
        listing = ", ".join(str(file) for file in files)
        raise ResultsError(f"{path}: holds results of {len(files)} models ({listing}); name one file")
    return load_run(files[0])


def _suffix_duplicates(runs: Sequence[Run], suffix: Any) -> None:
    """Appends ``suffix(run, n)`` (n = 1, 2, ... within a label) to labels shared by several runs."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.label] = counts.get(run.label, 0) + 1
    seen: dict[str, int] = {}
    for run in runs:
        if counts[run.label] > 1:
            seen[run.label] = seen.get(run.label, 0) + 1
            run.label = f"{run.label} {suffix(run, seen[run.label])}"


def make_labels_unique(runs: Sequence[Run]) -> None:
    """Tells apart runs with the same label by their date, then (same date) by a counter."""
    _suffix_duplicates(runs, lambda run, _: f"@ {date_id(run.path) or run.path.stem}")
    _suffix_duplicates(runs, lambda _, n: f"#{n}")


def _configuration(run: Run) -> str:
    """What must agree for two runs to be one configuration: label, model, steering (vector files by
    content, not path), generation settings, ``--limit`` and chat template."""
    steering = None
    if run.steering is not None:
        files = [{k: v for k, v in file.items() if k != "path"} for file in run.steering.get("vector_files") or []]
        # how many answers a part reused is not configuration: parts reuse different documents
        steering = {key: value for key, value in run.steering.items() if key not in ("unsteered_from", "steered_from")} | {"vector_files": files}
    setup = [run.label, run.model, steering, run.gen_kwargs, run.limit, run.chat_template_sha]
    return json.dumps(setup, sort_keys=True, default=str)


def _merge(first: Run, second: Run) -> Run:
    return replace(
        first,
        paths=first.paths + second.paths,
        metrics={**first.metrics, **second.metrics},
        versions={**first.versions, **second.versions},
        n_samples={**first.n_samples, **second.n_samples},
        task_gen_kwargs={**first.task_gen_kwargs, **second.task_gen_kwargs},
        sample_files={**first.sample_files, **second.sample_files},
        unreadable={**first.unreadable, **second.unreadable},
        reused_from=first.reused_from + second.reused_from,
        steered_from=first.steered_from + second.steered_from,
    )


def merge_split_runs(runs: Sequence[Run]) -> list[Run]:
    """Runs of one configuration (:func:`_configuration`) over different tasks, e.g. one evaluation
    split into several ``--samples`` runs, become one run, so a leaderboard shows them as one row.
    Runs that share a task stay apart: they are repeats, not parts."""
    merged: list[Run] = []
    for run in runs:
        key = _configuration(run)
        for index, kept in enumerate(merged):
            if _configuration(kept) == key and not set(kept.metrics) & set(run.metrics):
                merged[index] = _merge(kept, run)
                break
        else:
            merged.append(run)
    return merged


def pick_baseline(runs: list[Run], spec: str | None) -> Run:
    """The run named by ``--baseline`` (a label, a results file, or an input path); else the first.

    A results file that is not among the inputs is loaded and put first, so that it is both
    compared and shown.
    """
    if spec is None:
        return runs[0]
    for run in runs:
        if spec == run.label:
            return run
    if not Path(spec).exists():
        raise ResultsError(f"--baseline {spec}: neither a run label nor an existing path")
    files = {file.resolve(): file for file in find_results_files(Path(spec))}
    if len(files) != 1:
        raise ResultsError(f"--baseline {spec}: stands for {len(files)} runs; name one results file")
    for run in runs:
        if any(path.resolve() in files for path in run.paths):
            return run
    baseline = load_run(next(iter(files.values())))
    runs.insert(0, baseline)
    make_labels_unique(runs)
    return baseline


# --------------------------------------------------------------------------- selecting metrics


def available_metrics(runs: Iterable[Run]) -> list[str]:
    """Every metric id any run reports, IFEval's four first in their usual order."""
    names: dict[str, None] = {}
    for run in runs:
        for task_metrics in run.metrics.values():
            names.update(dict.fromkeys(task_metrics))
    return sorted(names, key=lambda name: (IFEVAL_METRICS.index(name) if name in IFEVAL_METRICS else 99, name))


def select_metrics(runs: Sequence[Run], requested: Sequence[str] | None) -> list[str]:
    """``requested`` (checked to exist), else IFEval's four when present, else every metric."""
    available = available_metrics(runs)
    if requested:
        unknown = [name for name in requested if name not in available]
        if unknown:
            raise ResultsError(f"metric(s) {', '.join(unknown)} not in any input; available: {', '.join(available)}")
        return list(dict.fromkeys(requested))
    ifeval = [name for name in available if name in IFEVAL_METRICS]
    return ifeval or available


# --------------------------------------------------------------------------- compatibility


def _task_difference(reference: Mapping[str, Any], other: Mapping[str, Any], tasks: Iterable[str]) -> list[str]:
    """Tasks (among ``tasks``) whose value differs between two per-task mappings."""
    return [task for task in tasks if task in reference and task in other and reference[task] != other[task]]


def incompatibilities(reference: Run, other: Run) -> list[str]:
    """Why ``other`` cannot be compared number for number with ``reference`` (empty when it can).

    Checked: task versions, ``--limit`` and the number of documents actually scored, generation
    settings, and the chat template. Each difference would move the scores by itself, so a delta
    between such runs measures the setup, not the steering.
    """
    shared = [task for task in reference.tasks if task in other.metrics]
    problems = []
    for task in _task_difference(reference.versions, other.versions, shared):
        problems.append(f"task {task}: version {other.versions[task]} vs {reference.versions[task]}")
    if reference.limit != other.limit:
        problems.append(f"--limit {other.limit} vs {reference.limit}")
    else:  # the same --limit on different data still scores different documents
        for task in _task_difference(reference.n_samples, other.n_samples, shared):
            problems.append(f"task {task}: {other.n_samples[task]} documents vs {reference.n_samples[task]}")
    if reference.gen_kwargs != other.gen_kwargs:
        problems.append(f"--gen_kwargs {other.gen_kwargs} vs {reference.gen_kwargs}")
    else:  # same CLI override, but the task YAMLs themselves may generate differently
        for task in _task_difference(reference.task_gen_kwargs, other.task_gen_kwargs, shared):
            problems.append(f"task {task}: generation_kwargs {other.task_gen_kwargs[task]} vs {reference.task_gen_kwargs[task]}")
    if reference.chat_template_sha != other.chat_template_sha:
        problems.append("chat template differs (applied in one run only, or a different template)")
    return problems
