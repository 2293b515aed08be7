"""What an accuracy costs: the degenerate share and the fluent pass rate of a run's logged answers.

Shared by ``lm-eval-steer compare`` (shown beside every accuracy) and ``lm-eval-steer check``
(``--max-degenerate-increase``). Both read the per-document lines lm-eval writes with
``--log_samples`` and, for one task and run (``n`` = logged documents of the pass metric's filter)::

    degenerate share  = |{answers that loop}| / n
    fluent pass rate  = |{documents that pass and whose answer does not loop}| / n
    its stderr        = sqrt(p (1 − p) / (n − 1))    (lm-eval's stderr of a mean of 0/1 outcomes)

An answer *loops* by :func:`~lm_eval_steer.core.degeneracy.is_degenerate` on its token ids (at
least 16 tokens, more than half of the token 4-grams repeated): the measure of the builder's guard
and of ``quality``. Token ids come from the run's own tokenizer, loaded alone (no weights) from its
``config.model_args`` (``pretrained``, ``gguf_file``, ``tokenizer``, ``revision``, as lm-eval's
``hf`` model loads it) or from ``--tokenizer_args``. A document *passes* when its logged pass metric
(:func:`pass_metric`: ``prompt_level_loose_acc`` for IFEval) is true.

Whatever cannot be measured raises :class:`NotMeasured` with the reason, never a guessed number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.analysis.results import DEFAULT_FILTER, MetricValue, ResultsError, Run, parse_model_args, read_samples
from lm_eval_steer.core.errors import one_line

#: The pass metric of the fluent pass rate when a task reports it: IFEval's prompt-level loose accuracy.
PASS_METRIC = "prompt_level_loose_acc"

#: The ``config.model_args`` / ``--tokenizer_args`` keys that decide which tokenizer lm-eval's ``hf`` loads.
TOKENIZER_KEYS = ("pretrained", "gguf_file", "tokenizer", "revision")

Tokenize = Callable[[str], list[int]]

#: Reads the lines of one samples file: :func:`read_samples`, or a cache of it that lets several
#: readers of the same file (``compare``'s sections) share one parse.
ReadSamples = Callable[[Path], list[dict[str, Any]]]


class NotMeasured(Exception):
    """Why a degenerate share or fluent pass rate was not computed (shown as "—" with this reason)."""


# --------------------------------------------------------------------------- pure computations


@dataclass(frozen=True)
class Fluency:
    """One run's logged answers to one task: how many, how many loop, how many pass fluently."""

    docs: int
    degenerate: int
    fluent: int | None  # None: the samples hold no per-document pass outcome

    @property
    def degenerate_share(self) -> float:
        """``degenerate / docs``."""
        return self.degenerate / self.docs

    @property
    def fluent_rate(self) -> MetricValue | None:
        """``fluent / docs`` with the stderr of a mean of 0/1 outcomes, ``sqrt(p (1 − p) / (n − 1))``."""
        if self.fluent is None:
            return None
        rate = self.fluent / self.docs
        stderr = math.sqrt(rate * (1 - rate) / (self.docs - 1)) if self.docs > 1 else None
        return MetricValue(rate, stderr)


def count_fluency(degenerate: Sequence[bool], passed: Sequence[bool | None]) -> Fluency:
    """Counts per-document flags (aligned lists, one entry per document); ``fluent`` = passed and not
    degenerate, None when any document lacks its pass outcome."""
    if not degenerate:
        raise NotMeasured("no logged documents")
    fluent = None if any(p is None for p in passed) else sum(bool(p) and not d for p, d in zip(passed, degenerate))
    return Fluency(len(degenerate), sum(degenerate), fluent)


def degenerate_rise(current: Fluency, baseline: Fluency) -> float:
    """How much the degenerate share rose, in percentage points: ``100 × (share − share_baseline)``."""
    return 100 * (current.degenerate_share - baseline.degenerate_share)


def pass_metric(reported: Iterable[str], shown: Sequence[str]) -> str | None:
    """The metric that decides whether a document passes: :data:`PASS_METRIC` when the task reports it,
    else the first ``shown`` metric it reports (None when it reports none of them)."""
    reported = set(reported)
    return next((metric for metric in (PASS_METRIC, *shown) if metric in reported), None)


def task_pass_metric(runs: Sequence[Run], task: str, shown: Sequence[str]) -> str | None:
    """:func:`pass_metric` over the metrics any of ``runs`` reports for ``task``."""
    return pass_metric((metric for run in runs for metric in run.metrics.get(task, {})), shown)


# --------------------------------------------------------------------------- reading logged answers


@dataclass(frozen=True)
class Answer:
    """One logged document: the generated text and whether it passed (None: not logged as true/false)."""

    text: str
    passed: bool | None


def _response(row: Mapping[str, Any]) -> str | None:
    """The generated text of one samples line (``filtered_resps[0]``); None when it holds no text
    (a log-likelihood task logs ``[log p, is_greedy]`` pairs instead)."""
    responses = row.get("filtered_resps")
    if isinstance(responses, list) and responses and isinstance(responses[0], str):
        return responses[0]
    return None


def _outcome(value: Any) -> bool | None:
    """A per-document pass outcome: a boolean, or a number 0 or 1; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    return None


def logged_answers(sample_file: Path, metric: str | None, read: ReadSamples) -> list[Answer]:
    """The answers of one samples file (its lines from ``read``), one per line of ``metric``'s filter
    (lm-eval logs every document once per filter), with ``metric``'s outcome; ResultsError when the
    file cannot be read."""
    name, _, filter_name = (metric or "").partition(",")
    wanted = filter_name or DEFAULT_FILTER
    answers = []
    for row in read(sample_file):
        if row.get("filter", wanted) != wanted:
            continue
        text = _response(row)
        if text is None:
            raise NotMeasured(f"{sample_file.name} holds no generated text (not a generation task)")
        answers.append(Answer(text, _outcome(row.get(name)) if name else None))
    return answers


# --------------------------------------------------------------------------- tokenizers


@dataclass(frozen=True)
class TokenizerSpec:
    """Where a tokenizer comes from, as lm-eval's ``hf`` model loads it: ``tokenizer`` when given,
    else ``pretrained`` (with ``gguf_file``: read from the GGUF file's metadata), at ``revision``."""

    pretrained: str | None = None
    gguf_file: str | None = None
    tokenizer: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return ",".join(f"{key}={getattr(self, key)}" for key in TOKENIZER_KEYS if getattr(self, key))


def tokenizer_spec(model_args: Mapping[str, Any]) -> TokenizerSpec:
    """The tokenizer part of ``model_args``; NotMeasured when it names no model."""
    values = {key: str(model_args[key]) for key in TOKENIZER_KEYS if model_args.get(key) not in (None, "")}
    if "pretrained" not in values and "tokenizer" not in values:
        raise NotMeasured("config.model_args names no pretrained= model to take the tokenizer from; give --tokenizer_args")
    return TokenizerSpec(**values)


def parse_tokenizer_args(text: str) -> TokenizerSpec:
    """``--tokenizer_args pretrained=DIR,gguf_file=F``; ResultsError for other keys or no model."""
    values = parse_model_args(text)
    unknown = [key for key in values if key not in TOKENIZER_KEYS]
    if unknown:
        raise ResultsError(f"--tokenizer_args: unknown key(s) {', '.join(unknown)}; use {', '.join(TOKENIZER_KEYS)}")
    try:
        return tokenizer_spec(values)
    except NotMeasured:
        raise ResultsError(f"--tokenizer_args {text!r}: give pretrained= (or tokenizer=)") from None


def load_tokenizer(spec: TokenizerSpec) -> Tokenize:
    """Only the tokenizer of ``spec`` (``AutoTokenizer.from_pretrained``; no model weights), as a
    function from text to token ids without special tokens (as lm-eval's ``tok_encode`` for a causal LM)."""
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.pretrained
    if source and (Path(source).is_absolute() or source.startswith(".")) and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such directory")  # instead of the hub's "Repo id must use ..."
    options: dict[str, Any] = {"revision": spec.revision} if spec.revision else {}
    if spec.gguf_file and not spec.tokenizer:
        options["gguf_file"] = spec.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(source, **options)
    return lambda text: list(tokenizer.encode(text, add_special_tokens=False))


class Tokenizers:
    """One tokenizer per :class:`TokenizerSpec`, loaded on first use and shared by every run that names
    it; a failure is remembered too, so it is neither retried nor reported differently per run."""

    def __init__(self, override: TokenizerSpec | None = None, loader: Callable[[TokenizerSpec], Tokenize] = load_tokenizer) -> None:
        self.override = override
        self.loader = loader
        self.loaded: dict[TokenizerSpec, Tokenize | str] = {}

    def for_run(self, run: Run) -> Tokenize:
        """``run``'s tokenizer (``--tokenizer_args`` when given); NotMeasured naming the reason."""
        spec = self.override or tokenizer_spec(run.model_args)
        if spec not in self.loaded:
            try:
                self.loaded[spec] = self.loader(spec)
            except Exception as error:  # noqa: BLE001 (hub, file and format errors alike: a "—", never a crash)
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                self.loaded[spec] = f"tokenizer {spec} could not be loaded ({one_line(first_line, 160)})"
        found = self.loaded[spec]
        if isinstance(found, str):
            raise NotMeasured(found)
        return found


# --------------------------------------------------------------------------- measuring


def measure(run: Run, task: str, metric: str | None, tokenizers: Tokenizers, read: ReadSamples = read_samples) -> Fluency:
    """Degenerate share and fluent pass rate of ``run``'s logged answers to ``task``, ``metric``
    deciding what passes; NotMeasured without samples, generated text or a tokenizer. ``read`` reads
    the samples file: ``compare`` passes its cache, whose parsed lines its other sections reuse."""
    sample_file = run.sample_files.get(task)
    if sample_file is None:
        raise NotMeasured(f"no logged samples for {task}")
    answers = logged_answers(sample_file, metric, read)
    if not answers:
        raise NotMeasured(f"{sample_file.name} logs no document under the filter of {metric or DEFAULT_FILTER}")
    tokenize = tokenizers.for_run(run)
    return count_fluency([is_degenerate(tokenize(answer.text)) for answer in answers], [answer.passed for answer in answers])
