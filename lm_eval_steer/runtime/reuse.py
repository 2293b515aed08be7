"""``unsteered_from=``: answer the requests a route leaves unsteered from an earlier unsteered run.

A steered run differs from the unsteered one only on the documents it steers, so the answers of the
other documents are already in an unsteered run's ``--log_samples`` output. :class:`Reuse` loads such
a baseline (made by ``hf`` or ``steered-hf route=none``), refuses it when it could hold different
answers (:class:`ReuseError`, one line), and then serves each unsteered request whose task, document
and exact arguments (prompt and generation kwargs; context and continuation) it logged. Everything
else (steered requests, documents the baseline lacks) goes to the model.

Documents are recognised by their content hash, never by a logged ``doc_id`` alone: lm-eval 0.4.13
labels logged ``doc_id`` by position in an unsorted ``--samples`` list, not by the document.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import simple_parse_args_string

from lm_eval_steer.digest import file_sha256
from lm_eval_steer.errors import brief
from lm_eval_steer.outputs import OutputError, find_results_files, find_sample_files, read_results_json, read_samples
from lm_eval_steer.runtime.harness import (
    Evaluation,
    logged_arguments,
    logged_doc_hash,
    parse_logged_response,
    running_evaluation,
    sample_arguments,
)

logger = logging.getLogger(__name__)
Answer = TypeVar("Answer")

#: Models whose logged answers are unsteered (``steered-hf`` only with ``route=none`` or no vectors).
UNSTEERED_MODELS = ("hf", "hf-auto", "huggingface", "steered-hf")

#: ``hf`` model args that change the answers a model gives to the same request.
ANSWER_ARGS = ("pretrained", "tokenizer", "gguf_file", "revision", "peft", "delta", "max_length", "max_gen_toks", "add_bos_token", "truncation", "think_end_token")
_PATH_ARGS = ("pretrained", "tokenizer", "peft", "delta")
#: Args that only say where the weights are: a recorded weights sha256 answers for them instead.
_LOCATION_ARGS = ("pretrained", "tokenizer", "gguf_file")


def weights_identity(pretrained: Any, gguf_file: str | None) -> dict[str, str] | None:
    """``{"gguf_file", "sha256"}`` of a local GGUF model (None for any other model).

    ``steered-hf`` records it in the results JSON, so that a baseline made on another machine, where
    the same file sits in another folder, is recognised as the same model (a path cannot tell).
    """
    if not gguf_file or not isinstance(pretrained, str):
        return None
    path = Path(pretrained).expanduser() / gguf_file
    return {"gguf_file": Path(gguf_file).name, "sha256": file_sha256(path)} if path.is_file() else None


class ReuseError(ValueError):
    """A baseline whose answers cannot be reused; the one-line message names the argument, the file
    and the mismatch."""


@dataclass(frozen=True)
class Baseline:
    """An unsteered run's results file and its logged answers."""

    results_file: Path
    sha256: str
    results: dict[str, Any]
    # task -> document hash -> request arguments -> the logged responses (one per repeat)
    answers: dict[str, dict[str, dict[str, list[Any]]]]


def load_baseline(spec: str) -> Baseline:
    """Reads the run ``spec`` names (a results file, or an ``--output_path`` holding one model's run)."""
    try:
        files = find_results_files(Path(spec))
        if len(files) > 1:
            raise OutputError(f"holds results of {len(files)} models ({', '.join(map(str, files))}); name one results file")
        results = read_results_json(files[0])
        sample_files = find_sample_files(files[0], results.get("configs") or {})
        if not sample_files:
            raise OutputError(f"{files[0]}: no samples_*.jsonl next to it; run the baseline with --log_samples")
        answers: dict[str, dict[str, dict[str, list[Any]]]] = {}
        for task, path in sample_files.items():
            by_document = answers.setdefault(task, {})
            for sample in read_samples(path):
                # One line per filter, all with the same requests: the first line of a document wins.
                requests = by_document.setdefault(sample["doc_hash"], {})
                for arguments, responses in zip(sample_arguments(sample), sample["resps"]):
                    requests.setdefault(arguments, responses)
    except (OutputError, KeyError, TypeError, ValueError) as error:
        raise ReuseError(f"unsteered_from={spec}: {error}") from error
    return Baseline(files[0], file_sha256(files[0]), results, answers)


def _normal(name: str, value: Any) -> str | None:
    """A model arg's value as compared: paths resolved (the same folder named two ways is one
    model), ``torch.float32`` and ``float32`` alike."""
    if value is None:
        return None
    value = getattr(value, "name_or_path", value)  # pretrained= may be a loaded model
    if name in _PATH_ARGS and isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return str(value).removeprefix("torch.")


def model_mismatches(baseline: Mapping[str, Any], model_args: Mapping[str, Any], dtype: Any, weights: Mapping[str, str] | None = None) -> list[str]:
    """Why the run in ``baseline`` (its results JSON) could have answered differently from a model made
    with ``model_args`` whose weights are ``dtype`` (empty when it could not).

    ``weights`` is this model's :func:`weights_identity`: when the baseline recorded one too, the two
    sha256 decide whether the weights are the same, and the folders they were loaded from do not."""
    config = baseline.get("config") or {}
    model = config.get("model")
    if model not in UNSTEERED_MODELS:
        return [f"made by model {model!r}; reuse needs one of {', '.join(UNSTEERED_MODELS)}"]
    steering = config.get("steering") or {}
    if steering.get("route", "none") != "none" and steering.get("vector_files"):
        return [f"a steered run (route={steering['route']}); reuse needs hf or steered-hf route=none"]
    given = config.get("model_args") or {}
    given = simple_parse_args_string(given) if isinstance(given, str) else given
    defaults = {name: parameter.default for name, parameter in inspect.signature(HFLM.__init__).parameters.items()}
    problems = []
    recorded = steering.get("weights")
    same_file = isinstance(recorded, dict) and weights is not None
    if same_file and recorded.get("sha256") != weights["sha256"]:
        problems.append(f"weights {weights['gguf_file']} sha256 {weights['sha256'][:12]}… here, {brief(recorded.get('gguf_file'))} {brief(recorded.get('sha256'))[:14]}… in the baseline")
    for name in ANSWER_ARGS:
        if same_file and name in _LOCATION_ARGS:
            continue
        here, there = (_normal(name, args.get(name, defaults.get(name))) for args in (model_args, given))
        if here != there:
            problems.append(f"{name}={here} here, {there} in the baseline")
    here, there = _normal("dtype", dtype), _normal("dtype", config.get("model_dtype"))  # as loaded, not as asked
    if here != there:
        problems.append(f"dtype {here} here, {there} in the baseline")
    here, there = version("lm_eval"), baseline.get("lm_eval_version")
    if here != there:
        problems.append(f"lm-eval {here} here, {there} in the baseline")
    return problems


def evaluation_mismatches(baseline: Mapping[str, Any], evaluation: Evaluation) -> list[str]:
    """Run settings of the evaluation in progress that differ from the baseline's."""
    problems = []
    versions = baseline.get("versions") or {}
    for task, task_version in sorted(evaluation.task_versions.items()):
        if task in versions and str(versions[task]) != str(task_version):
            problems.append(f"task {task} version {task_version} here, {versions[task]} in the baseline")
    templated = baseline.get("chat_template_sha") is not None
    if evaluation.apply_chat_template != templated:
        problems.append(f"--apply_chat_template {'on' if evaluation.apply_chat_template else 'off'} here, {'on' if templated else 'off'} in the baseline")
    if (evaluation.system_instruction or None) != (baseline.get("system_instruction") or None):
        problems.append("--system_instruction differs from the baseline's")
    return problems


def is_sampled(request: Instance) -> bool:
    """Whether a generation request samples (as the harness reads its kwargs: ``do_sample``, or a
    temperature above 0 without it)."""
    return request.request_type == "generate_until" and bool(normalize_gen_kwargs(dict(request.args[1]))["do_sample"])


def _first_difference(here: str, there: str) -> str:
    index = next((i for i, (a, b) in enumerate(zip(here, there)) if a != b), min(len(here), len(there)))
    return f"first difference at character {index}: {here[index : index + 30]!r} here, {there[index : index + 30]!r} in the baseline"


@dataclass
class Reuse:
    """The baseline of one ``steered-hf`` model, and what it served so far."""

    spec: str  # the unsteered_from= value, for messages
    baseline: Baseline
    reused: Counter[str] = field(default_factory=Counter)  # task -> requests answered from the baseline
    missing: Counter[str] = field(default_factory=Counter)  # task -> unsteered requests the baseline lacks

    @classmethod
    def load(cls, spec: str, model_args: Mapping[str, Any], dtype: Any, weights: Mapping[str, str] | None = None) -> Reuse:
        """The baseline ``spec`` names, checked against the model made with ``model_args``."""
        baseline = load_baseline(spec)
        cls._refuse_if(spec, baseline, model_mismatches(baseline.results, model_args, dtype, weights))
        return cls(spec, baseline)

    @staticmethod
    def _refuse_if(spec: str, baseline: Baseline, problems: Sequence[str]) -> None:
        if problems:
            raise ReuseError(f"unsteered_from={spec}: {baseline.results_file} cannot stand in for this run: {'; '.join(problems)}")

    def answer(self, requests: list[Instance], steered: Callable[[Instance], bool], run: Callable[[list[Instance]], list[Answer]]) -> list[Answer]:
        """The answers to ``requests``: logged ones for unsteered requests the baseline has, ``run``'s
        for the rest (in one call, so the harness still batches them together)."""
        # Checked on every call: one model object may serve several evaluations.
        evaluation = running_evaluation()
        if evaluation is not None:
            self._refuse_if(self.spec, self.baseline, evaluation_mismatches(self.baseline.results, evaluation))
        answers: list[Any] = [None] * len(requests)
        to_run: list[int] = []
        repeat: Counter[int] = Counter()  # the harness passes a request once per repeat
        for index, request in enumerate(requests):
            if is_sampled(request):
                raise ReuseError(f"unsteered_from={self.spec}: task {request.task_name} samples (do_sample/temperature), and sampled answers cannot be reused")
            logged = None if steered(request) else self._logged(request, repeat[id(request)])
            repeat[id(request)] += 1
            if logged is None:
                to_run.append(index)
            else:
                answers[index] = parse_logged_response(request.request_type, logged)
                self.reused[str(request.task_name)] += 1
        for index, answer in zip(to_run, run([requests[i] for i in to_run]) if to_run else []):
            answers[index] = answer
        return answers

    def _logged(self, request: Instance, repeat: int) -> Any:
        """The baseline's response to an unsteered request; None (and counted) when it lacks the document."""
        task = str(request.task_name)
        requests = self.baseline.answers.get(task, {}).get(logged_doc_hash(request.doc))
        responses = None if requests is None else requests.get(logged_arguments(request.args))
        if requests is not None and responses is None:
            raise ReuseError(f"unsteered_from={self.spec}: task {task} doc_id {request.doc_id}: {self._difference(request, list(requests))}")
        if responses is None or repeat >= len(responses):
            if not self.missing[task]:
                logger.warning("unsteered_from=%s: %s has documents the baseline lacks; they are generated", self.spec, task)
            self.missing[task] += 1
            return None
        return responses[repeat]

    @staticmethod
    def _difference(request: Instance, logged: list[str]) -> str:
        """What differs between a request and the baseline's requests for the same document."""
        here = json.loads(logged_arguments(request.args))
        there = [json.loads(arguments) for arguments in logged]
        if request.request_type != "generate_until":
            return f"request arguments differ from the baseline's ({len(there)} logged for this document)"
        for prompt, kwargs in there:
            if prompt == here[0]:
                return f"generation kwargs differ: {here[1]} here, {kwargs} in the baseline"
        return f"the prompt differs from the baseline's ({_first_difference(here[0], there[0][0])}); check --apply_chat_template, --system_instruction, --num_fewshot"

    def record(self) -> dict[str, Any]:
        """What ``config.steering.unsteered_from`` records in the results JSON."""
        return {
            "results_file": str(self.baseline.results_file),
            "sha256": self.baseline.sha256,
            "reused_requests": dict(sorted(self.reused.items())),
            "missing_requests": dict(sorted(self.missing.items())),
        }
