"""``lm-eval-steer quality``: what steering costs in output quality, from logged samples.

    lm-eval-steer quality runs/baseline runs/steered --baseline runs/baseline \
        --model_args pretrained=DIR,gguf_file=F --device cpu --out runs/quality

For every run (``--log_samples`` required) and task, the **unsteered** scoring model reads each
logged response after its own prompt and gives its perplexity,
``PPL = exp(−Σ log p(response tokens | prompt) / Σ response tokens)`` over the documents (token
weighted), the measure the issue asks for: text the plain model finds unlikely is text steering bent
away from what the model would write. Also reported: mean response length in tokens and the share of
degenerate (repetitive) responses. Against ``--baseline``, the same numbers are given for the
documents whose response *changed* (unchanged documents only dilute a difference), so a
steered run is compared with the unsteered answers to exactly the same prompts.

Writes ``DIR/quality.md`` and ``DIR/quality.json`` (atomically).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.analysis.results import ResultsError, Run, load_runs, pick_baseline, read_samples
from lm_eval_steer.analysis.tables import markdown_table
from lm_eval_steer.core.atomic import write_json, write_text
from lm_eval_steer.core.console import fail
from lm_eval_steer.core.errors import brief

Scorer = Callable[[Sequence[tuple[str, str]]], list[tuple[float, int]]]
"""``scorer([(prompt, response), ...]) -> [(sum log p(response | prompt), response tokens), ...]``."""


def perplexity(logprob_sum: float, tokens: int) -> float | None:
    """``exp(−logprob_sum / tokens)``; None for zero tokens."""
    return math.exp(-logprob_sum / tokens) if tokens else None


@dataclass(frozen=True)
class Response:
    doc_id: int
    prompt: str
    text: str


@dataclass(frozen=True)
class Stats:
    """Quality of a set of responses under the scoring model."""

    docs: int
    perplexity: float | None
    mean_tokens: float | None
    degenerate: float | None  # share of responses

    @classmethod
    def of(cls, scored: Sequence[tuple[float, int]], degenerate: Sequence[bool]) -> Stats:
        if not scored:
            return cls(0, None, None, None)
        tokens = sum(count for _, count in scored)
        return cls(len(scored), perplexity(sum(lp for lp, _ in scored), tokens), tokens / len(scored), sum(degenerate) / len(degenerate))


@dataclass(frozen=True)
class TaskQuality:
    task: str
    run: str
    all: Stats
    changed: Stats | None = None  # documents whose response differs from the baseline's
    baseline_changed: Stats | None = None  # the baseline's responses to those same documents


def responses(sample_file: Path) -> dict[int, Response]:
    """doc id → (prompt, response) of a generation task's logged samples."""
    found = {}
    for row in read_samples(sample_file):
        try:
            prompt = row["arguments"][0][0] if isinstance(row["arguments"], list) else row["arguments"]["gen_args_0"]["arg_0"]
            text = row["filtered_resps"][0]
            doc_id = row["doc_id"]
            if not isinstance(doc_id, int) or isinstance(doc_id, bool):
                raise TypeError(f"doc_id {brief(doc_id)} is not an integer")
        except (KeyError, IndexError, TypeError) as error:
            raise ResultsError(f"{sample_file}: not a generation task's samples (no prompt/response: {brief(str(error), 120)})") from None
        found[doc_id] = Response(doc_id, str(prompt), str(text))
    return found


def task_quality(
    task: str,
    run: Run,
    baseline: Run | None,
    score: Scorer,
    tokenize: Callable[[str], list[int]],
    max_repetition: float = 0.5,
    read: Callable[[Path], dict[int, Response]] = responses,
) -> TaskQuality:
    """Perplexity, length and degeneracy of ``run``'s responses for ``task``; with ``baseline``, also
    on the documents whose response changed, for both runs. ``read`` gives a samples file's responses
    (:func:`responses`, or the ones already parsed)."""
    mine = read(run.sample_files[task])
    ids = sorted(mine)
    scored = dict(zip(ids, score([(mine[i].prompt, mine[i].text) for i in ids])))
    degenerate = {i: is_degenerate(tokenize(mine[i].text), max_repetition) for i in ids}
    overall = Stats.of([scored[i] for i in ids], [degenerate[i] for i in ids])
    if baseline is None or baseline is run or task not in baseline.sample_files:
        return TaskQuality(task, run.label, overall)
    theirs = read(baseline.sample_files[task])
    changed = [i for i in ids if i in theirs and theirs[i].text != mine[i].text]
    if any(theirs[i].prompt != mine[i].prompt for i in changed):
        raise ResultsError(f"{task}: {run.label} and {baseline.label} saw different prompts for the same documents")
    their_scores = score([(theirs[i].prompt, theirs[i].text) for i in changed])
    return TaskQuality(
        task,
        run.label,
        overall,
        Stats.of([scored[i] for i in changed], [degenerate[i] for i in changed]),
        Stats.of(their_scores, [is_degenerate(tokenize(theirs[i].text), max_repetition) for i in changed]),
    )


def tasks_to_score(run: Run, runs: Sequence[Run], baseline: Run) -> list[str]:
    """A run's logged tasks; for the baseline, only those another run also logged (a full unsteered
    run reused for one subset need not be scored on every other subset: scoring is the slow part)."""
    tasks = sorted(run.sample_files)
    others = {task for other in runs if other is not baseline for task in other.sample_files}
    return [task for task in tasks if task in others] if run is baseline and others else tasks


def harness_scorer(model_args: str, device: str | None, batch_size: int) -> tuple[Scorer, Callable[[str], list[int]]]:
    """The unsteered model through lm-eval's own ``hf`` model: its ``loglikelihood`` scores each
    response after its prompt, tokenised exactly as the harness does (``_encode_pair``)."""
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model

    extra: dict[str, Any] = {"batch_size": batch_size}
    if device:
        extra["device"] = device
    lm = get_model("hf").create_from_arg_string(model_args, extra)
    # A steered run shares every unsteered document's response with its baseline, and the baseline's
    # changed responses were already scored with the baseline: each (prompt, response) pair is scored
    # once, which spares the slow part for every response two runs share.
    known: dict[tuple[str, str], tuple[float, int]] = {}

    def score(pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        # an empty response has no tokens and contributes nothing (the harness refuses empty continuations)
        new = list(dict.fromkeys(pair for pair in pairs if pair[1] and pair not in known))
        requests = [Instance("loglikelihood", {}, pair, position) for position, pair in enumerate(new)]
        logprobs = lm.loglikelihood(requests) if requests else []
        for pair, (logprob, _) in zip(new, logprobs):
            known[pair] = (logprob, len(lm._encode_pair(*pair)[1]))
        return [known.get(pair, (0.0, 0)) for pair in pairs]

    return score, lambda text: lm.tok_encode(text)


def _cell(stats: Stats | None) -> list[str]:
    """``[PPL, mean tokens, degenerate share]`` as text; "—" where there is nothing to show."""
    if stats is None or not stats.docs:
        return ["—", "—", "—"]
    ppl = "—" if stats.perplexity is None else f"{stats.perplexity:.2f}"  # None: every response was empty
    return [ppl, f"{stats.mean_tokens:.0f}", f"{stats.degenerate:.1%}"]


def render_markdown(rows: Sequence[TaskQuality], baseline: str | None, scoring_model: str) -> str:
    headers = ["task", "run", "docs", "PPL", "tokens", "degenerate", "changed docs", "PPL (changed)", "baseline PPL (changed)", "tokens (changed)", "baseline tokens (changed)"]
    table = []
    for row in rows:
        ppl, tokens, degenerate = _cell(row.all)
        changed, base = _cell(row.changed), _cell(row.baseline_changed)
        count = "—" if row.changed is None else str(row.changed.docs)
        table.append([row.task, row.run, str(row.all.docs), ppl, tokens, degenerate, count, changed[0], base[0], changed[1], base[1]])
    lines = [
        "# Output quality",
        "",
        f"Perplexity of each run's responses under the unsteered scoring model ({scoring_model}), token weighted; "
        "tokens = mean response length; degenerate = share of responses with > 50% repeated 4-grams."
        + (f" *Changed* = documents whose response differs from **{baseline}**'s; its columns compare both runs on them." if baseline else ""),
        "",
        markdown_table(headers, table),
    ]
    return "\n".join(lines) + "\n"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="results files or --output_path directories of runs made with --log_samples")
    parser.add_argument("--baseline", default=None, help="the unsteered run to compare responses with (default: the first run)")
    parser.add_argument("--model_args", required=True, help="the unsteered scoring model, as for lm_eval --model hf")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--out", required=True, help="directory for quality.md and quality.json")


def run(args: argparse.Namespace) -> int:
    try:
        runs = load_runs(args.runs)
        baseline = pick_baseline(runs, args.baseline)
        missing = [run.label for run in runs if not run.sample_files]
        if missing:
            raise ResultsError(f"no logged samples for {', '.join(missing)}: rerun lm_eval with --log_samples")
        # Every input is parsed (so checked) once, before the scoring model loads; the baseline's
        # files then serve every run they are compared with.
        parsed = {sample_file: responses(sample_file) for run in runs for sample_file in run.sample_files.values()}
        score, tokenize = harness_scorer(args.model_args, args.device, args.batch_size)
        rows = [
            task_quality(task, run, baseline, score, tokenize, read=parsed.__getitem__) for run in runs for task in tasks_to_score(run, runs, baseline)
        ]
    except ResultsError as error:
        return fail("quality", error)
    out = Path(args.out)
    write_json(out / "quality.json", {"scoring_model": args.model_args, "baseline": baseline.label, "rows": [asdict(row) for row in rows]})
    markdown = render_markdown(rows, baseline.label, args.model_args)
    write_text(out / "quality.md", markdown)
    print(markdown)
    print(f"wrote {out / 'quality.md'} and {out / 'quality.json'}")
    return 0
