"""Collects the benchmark and study numbers into one table: ``benchmarks/README.md``.

    python benchmarks/collect.py

Reads ``benchmarks/results/steering.json`` (bench_steering.py), ``benchmarks/results/batching.json``
(bench_batching.py), ``benchmarks/results/build-*.json`` (bench_build.py), ``benchmarks/results/learned-*.json`` (bench_learned.py), ``benchmarks/results/reuse-*.json`` (bench_reuse.py), the build reports ``results/*/vectors/*-report/report.json`` and the wall times that lm-eval
records in ``results/*/*.json``; missing inputs are
skipped with a note, so the table shows exactly what has been measured.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval_steer.core.atomic import write_text

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"


def steering_rows() -> list[str]:
    path = RESULTS / "steering.json"
    if not path.is_file():
        return ["| throughput | not measured (run `python benchmarks/bench_steering.py`) | | |"]
    data = json.loads(path.read_text())
    setting = f"batch {data['batch_size']}, {data['new_tokens']} new tokens, {data['rounds']} interleaved rounds"
    return [
        f"| throughput: {row['configuration']} | {setting} | {row['tokens_per_second']} tokens/s | {row['throughput_vs_unsteered']:.3f}× unsteered |"
        for row in data["rows"]
    ]


def batching_rows() -> list[str]:
    path = RESULTS / "batching.json"
    if not path.is_file():
        return ["| route groups batched together | not measured (run `python benchmarks/bench_batching.py`) | | |"]
    data = json.loads(path.read_text())
    setting = f"{data['subset']} no-instruction, {data['requests']} requests, batch {data['batch_size']}, {data['new_tokens']} new tokens, {data['rounds']} interleaved rounds"
    ways = [f"{name} {data['median_seconds'][way]:,.1f} s ({data['batches'][way]} batches)" for way, name in (("merged", "one pass"), ("per route", "pass per route"))]
    ratio = f"{data['per_route_vs_merged']:.2f}× faster than a pass per route ({data['per_route_vs_merged_cpu']:.2f}× in CPU time)"
    return [f"| route groups batched together | {setting} | {', '.join(ways)} | {ratio}; {data['identical_answers']}/{data['requests']} answers identical |"]


def _benchmark_files(pattern: str) -> list[dict]:
    """The JSON files under ``benchmarks/results/`` matching ``pattern``, in name order."""
    return [json.loads(path.read_text()) for path in sorted(RESULTS.glob(pattern))]


def build_rows() -> list[str]:
    rows = []
    for data in _benchmark_files("build-*.json"):
        cost = data["cost"]
        memory = " / ".join(f"{m['peak_rss_mib']:.0f}" for m in data["memory"])
        prompts = " / ".join(str(m["prompts"]) for m in data["memory"])
        rows.append(f"| build cost ({data['model']}) | batch {data['batch_size']}, {cost['pairs']} pairs | {cost['ms_per_pair']['build']:.1f} ms/pair | {cost['build_vs_plain_last']:.2f}× a plain forward of both prompts |")
        rows.append(f"| build peak memory ({data['model']}) | {prompts} prompts | {memory} MiB | flat = independent of prompt count |")
    return rows


def learned_rows() -> list[str]:
    rows = []
    for data in _benchmark_files("learned-*.json"):
        setting = f"{data['instruction']}, {data['n_train']} questions, layer {data['layer']}, {data['torch_threads']} thread(s)"
        measured = f"{data['total_seconds']:,.0f} s (targets {data['targets_seconds']:,.0f} s, {data['steps']} steps × {data['seconds_per_step']} s)"
        note = f"peak {data['peak_rss_mib']:,.0f} MiB; {data['parameters_with_grad_buffers']} model parameters with gradient buffers"
        rows.append(f"| learned vector ({data['model']}) | {setting} | {measured} | {note} |")
    return rows


def reuse_rows() -> list[str]:
    rows = []
    for data in _benchmark_files("reuse-*.json"):
        seconds, requests = data["seconds"], data["requests"]
        setting = (
            f"{data['tasks']}, {sum(requests['documents'].values())} documents ({sum(requests['reused'].values())} requests reused), "
            f"{data['threads_per_process']} thread per run, run side by side"
        )
        measured = f"full {seconds['full']:,.0f} s, reuse {seconds['reuse']:,.0f} s"
        ratio = f"{data['ratio']:.2f}× the full run; identical metrics and logged responses" if data["identical"] else "NOT identical: no ratio"
        rows.append(f"| answer reuse (`unsteered_from=`) | {setting} | {measured} | {ratio} |")
    return rows


def study_rows() -> list[str]:
    rows = []
    for path in sorted((REPO / "results").glob("*/*.json")):
        data = json.loads(path.read_text())
        seconds = data.get("total_evaluation_time_seconds")
        if seconds is None:
            continue
        documents = sum(count["effective"] for count in data.get("n-samples", {}).values())
        generation = data.get("config", {}).get("gen_kwargs") or {}
        # lm-eval records --device, and its default "cuda:0" even for a run on the CPU; every GPU run
        # here named --device cuda, so "cuda:0" means "not given".
        device = data.get("config", {}).get("device") or "cpu"
        device = "cpu" if device == "cuda:0" else device
        rows.append(f"| study wall time: {path.parent.name}/{path.stem} | {documents} documents, {generation}{_on(device)} | {float(seconds):,.0f} s | |")
    return rows


def _on(device: str) -> str:
    """Where a row was measured, when not on the CPU (reports from before devices were recorded ran there)."""
    return "" if device == "cpu" else f", on {device}"


def _learning(timing: dict) -> str:
    return f"learned vectors {timing['learning']:,.0f} s, " if timing.get("learning") else ""


#: Shorter than any real build: such a report timed only a resume from a complete checkpoint.
MIN_BUILD_SECONDS = 10


def vector_build_rows() -> list[str]:
    rows = []
    for path in sorted((REPO / "results").glob("*/vectors/*-report/report.json")):
        data = json.loads(path.read_text())
        settings, timing = data["settings"], data["timing_seconds"]
        search = settings.get("search", settings)  # builder version 2 records the search's settings as a part; version 1 flat
        setting = (
            f"{len(settings['instructions'])} instruction ids, {len(settings.get('keywords') or [])} keywords"
            f"{' (layer chosen on ' + str(search['keyword_sample']) + ' sampled)' if search.get('keyword_sample') else ''}, "
            f"{settings['n_train']} train / {settings['n_val']} val prompts, layers {search['layers']}{_on(data.get('device', 'cpu'))}"
        )
        # A report records the time of the build's last session only: one resumed from a complete
        # checkpoint took seconds, and its first sessions' time is not known.
        measured = (
            f"{timing['total']:,.0f} s (activations {timing['activations']:,.0f} s, {_learning(timing)}search {timing['search']:,.0f} s)"
            if timing["total"] >= MIN_BUILD_SECONDS
            else "not recorded (resumed from a checkpoint)"
        )
        rows.append(f"| study build wall time: {path.parent.name.removesuffix('-report')} | {setting} | {measured} | peak {data['peak_rss_mib']:,.0f} MiB |")
    return rows


def main() -> None:
    lines = [
        "# Benchmarks",
        "",
        "Regenerate with `python benchmarks/collect.py` (it reads the JSON files the benchmark scripts write).",
        "On the project's 2-core CPU machines unless a row names a GPU: compare ratios measured side by side, not absolute times.",
        "",
        "| what | setting | measured | ratio / note |",
        "|---|---|---|---|",
        *steering_rows(),
        *batching_rows(),
        *build_rows(),
        *learned_rows(),
        *vector_build_rows(),
        *reuse_rows(),
        *study_rows(),
        "",
    ]
    target = REPO / "benchmarks" / "README.md"
    write_text(target, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
