"""``unsteered_from=`` and ``steered_from=``: answer requests from an earlier run's logged samples.

A steered run differs from the unsteered one only on the documents it steers, so the answers of the
other documents are already in an unsteered run's ``--log_samples`` output (``samples_*.jsonl``, or
``.jsonl.gz``). Likewise a run with a changed vector file differs from an earlier steered run only on
the documents whose steering changed. :class:`Reuse` loads such a baseline (``unsteered_from=``: made
by ``hf`` or ``steered-hf route=none``; ``steered_from=``: any ``steered-hf`` run), refuses it when
it could hold different answers (:class:`ReuseError`, one line), and then serves each request whose
document the baseline steered exactly as this run does (the same :func:`route_signature`: vectors
compared by content; an unsteered baseline steered nothing) and whose task, document and exact
arguments (prompt and generation kwargs; context and continuation) it logged. Everything else
(documents steered otherwise, documents the baseline lacks) goes to the model.

A steered baseline's routes are recomputed from what its results JSON recorded (route, overrides,
``skip_first_token`` and each vector file), with the vector files read again: each from its recorded
path, or else the packaged file with its recorded sha256; without either, the baseline is refused.

Documents are recognised by their content hash, never by a logged ``doc_id`` alone: lm-eval 0.4.13
labels logged ``doc_id`` by position in an unsorted ``--samples`` list, not by the document.

What reuse detects, and refuses:

- a baseline of another model or harness: another model type, a steered run given as
  ``unsteered_from=``, a steered run whose vector files are gone or changed, other weights (path,
  revision, GGUF file or its recorded sha256, PEFT adapter ...), another dtype as loaded, another
  lm-eval version; checked before the weights load, except the dtype (known only once loaded);
- other run settings: another task version, ``--apply_chat_template``, ``--system_instruction``;
  a prompt or generation kwargs that differ from the logged ones (``--num_fewshot``,
  ``--gen_kwargs``), sampled generation (its answers are not reproducible);
- a damaged baseline: an unreadable results or samples file, a samples line that is not a logged
  sample, a logged response that is not an answer of its request's type, and a logged answer whose
  re-computed metrics (the task's own filters and ``process_results``, run on each reused document
  once, before its answers are served) differ from the metrics logged next to it: an edited or
  corrupted answer.

What it cannot detect:

- an edit that leaves every metric as logged (a response rewritten into another that scores the
  same), or an edit of the answers and their metrics together: re-scoring checks consistency, not
  origin. The results JSON records the sha256 of every samples file read, so an audit can tell
  which files a run trusted;
- a model whose answers changed while every recorded argument stayed the same (weights replaced in
  place under the same path without a recorded sha256, another transformers or torch version, or
  another device's numerics): reused answers are the baseline's, not this machine's;
- documents served outside an ``lm_eval`` evaluation (a model called directly): without the
  evaluator's tasks there is nothing to re-score with, so only the arguments are matched;
- a task whose scoring is random (unseeded): its re-computed metrics may differ from the logged
  ones, and the baseline is then refused although nothing was edited.
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

from lm_eval_steer.core.digest import file_sha256
from lm_eval_steer.core.errors import MAX_VALUE, UserError, brief
from lm_eval_steer.core.outputs import OutputError, find_results_files, find_sample_files, read_results_json, read_samples
from lm_eval_steer.core.paths import packaged_vector_files
from lm_eval_steer.runtime.harness import (
    Evaluation,
    document_requests,
    logged_arguments,
    logged_doc_hash,
    logged_value,
    parse_logged_response,
    rescore,
    running_evaluation,
    sample_arguments,
)
from lm_eval_steer.runtime.routing import ROUTES, Overrides, entries_for_document, route_signature
from lm_eval_steer.runtime.vectorfile import VectorFile, VectorFileError, load_vector_file

logger = logging.getLogger(__name__)
Answer = TypeVar("Answer")
#: What :func:`route_signature` returns for a document: equal signatures, equal steering.
Signature = tuple[Any, ...]

#: Models whose logged answers are unsteered (``steered-hf`` only with ``route=none`` or no vectors).
UNSTEERED_MODELS = ("hf", "hf-auto", "huggingface", "steered-hf")

#: ``hf`` model args that change the answers a model gives to the same request.
ANSWER_ARGS = ("pretrained", "tokenizer", "gguf_file", "revision", "peft", "delta", "max_length", "max_gen_toks", "add_bos_token", "truncation", "think_end_token")
_PATH_ARGS = ("pretrained", "tokenizer", "peft", "delta")
#: Args that only say where the weights are: a recorded weights sha256 answers for them instead.
_LOCATION_ARGS = ("pretrained", "tokenizer", "gguf_file")
#: What ``HFLM`` uses for an argument not given (a baseline may have given it, or not).
_HFLM_DEFAULTS = {name: parameter.default for name, parameter in inspect.signature(HFLM.__init__).parameters.items()}


def weights_identity(pretrained: Any, gguf_file: str | None) -> dict[str, str] | None:
    """``{"gguf_file", "sha256"}`` of a local GGUF model (None for any other model).

    ``steered-hf`` records it in the results JSON, so that a baseline made on another machine, where
    the same file sits in another folder, is recognised as the same model (a path cannot tell).
    """
    if not gguf_file or not isinstance(pretrained, str):
        return None
    path = Path(pretrained).expanduser() / gguf_file
    return {"gguf_file": Path(gguf_file).name, "sha256": file_sha256(path)} if path.is_file() else None


class ReuseError(UserError, ValueError):
    """A baseline whose answers cannot be reused; the one-line message names the argument, the file
    and the mismatch."""


@dataclass
class LoggedDocument:
    """What a baseline logged for one document of one task."""

    # request arguments (:func:`logged_arguments`) -> the logged responses, one per repeat
    responses: dict[str, list[Any]] = field(default_factory=dict)
    # filter name -> metric -> the value logged next to the responses
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Baseline:
    """An unsteered run's results file and its logged answers."""

    results_file: Path
    sha256: str
    results: dict[str, Any]
    documents: dict[str, dict[str, LoggedDocument]]  # task -> document hash -> what was logged
    sample_files: dict[str, tuple[Path, str]] = field(default_factory=dict)  # task -> (samples file, its sha256)


def _add_sample(documents: dict[str, LoggedDocument], sample: Mapping[str, Any]) -> None:
    """Adds one logged sample (one document under one filter) to ``documents``."""
    document = documents.setdefault(sample["doc_hash"], LoggedDocument())
    requests, responses = sample_arguments(sample), sample["resps"]
    if not isinstance(responses, list) or len(responses) != len(requests) or not all(isinstance(each, list) for each in responses):
        raise ValueError(f"resps is {brief(responses)}, not a list of responses for each of its {len(requests)} requests")
    # One line per filter, all with the same requests: the first line of a document wins.
    for arguments, answers in zip(requests, responses):
        document.responses.setdefault(arguments, answers)
    names = sample.get("metrics") or []
    if not isinstance(names, list):
        raise TypeError(f"metrics is {brief(names)}, not a list of names")
    document.metrics.setdefault(str(sample.get("filter", "none")), {str(name): sample[name] for name in names})


def _logged_documents(path: Path) -> dict[str, LoggedDocument]:
    """Document hash -> what one samples file logged for it."""
    documents: dict[str, LoggedDocument] = {}
    for number, sample in enumerate(read_samples(path), 1):
        try:
            _add_sample(documents, sample)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            reason = f"no {brief(error.args[0])} key" if isinstance(error, KeyError) and error.args else brief(str(error), 120)
            raise OutputError(f"{path}: sample {number} is not a logged sample ({reason})") from None
    return documents


def load_baseline(spec: str, argument: str = "unsteered_from") -> Baseline:
    """Reads the run ``spec`` names (a results file, or an ``--output_path`` holding one model's run);
    ``argument`` names the model arg it was given as, for messages."""
    try:
        files = find_results_files(Path(spec))
        if len(files) > 1:
            raise OutputError(f"holds results of {len(files)} models ({', '.join(map(str, files))}); name one results file")
        results = read_results_json(files[0])
        configs = results.get("configs")
        sample_files = find_sample_files(files[0], configs if isinstance(configs, dict) else {})
        if not sample_files:
            raise OutputError(f"{files[0]}: no samples_*.jsonl(.gz) next to it; run the baseline with --log_samples")
        documents = {task: _logged_documents(path) for task, path in sample_files.items()}
    except OutputError as error:
        raise ReuseError(f"{argument}={spec}: {error}") from error
    digests = {task: (path, file_sha256(path)) for task, path in sample_files.items()}
    return Baseline(files[0], file_sha256(files[0]), results, documents, digests)


def _normal(name: str, value: Any) -> str | None:
    """A model arg's value as compared: paths resolved (the same folder named two ways is one
    model), ``torch.float32`` and ``float32`` alike."""
    if value is None:
        return None
    value = getattr(value, "name_or_path", value)  # pretrained= may be a loaded model
    if name in _PATH_ARGS and isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return str(value).removeprefix("torch.")


def dtype_mismatches(baseline: Mapping[str, Any], dtype: Any) -> list[str]:
    """The loaded dtype against the baseline's (as loaded, not as asked)."""
    config = baseline.get("config") or {}
    here, there = _normal("dtype", dtype), _normal("dtype", config.get("model_dtype"))
    return [] if here == there else [f"dtype {here} here, {there} in the baseline"]


def model_mismatches(
    baseline: Mapping[str, Any], model_args: Mapping[str, Any], dtype: Any = None, weights: Mapping[str, str] | None = None, steered: bool = False
) -> list[str]:
    """Why the run in ``baseline`` (its results JSON) could have answered differently from a model made
    with ``model_args`` whose weights are ``dtype`` (empty when it could not; None: the dtype is not
    compared, as before the weights load). ``steered``: the baseline may be a steered run (its
    routes are compared per document instead).

    ``weights`` is this model's :func:`weights_identity`: when the baseline recorded one too, the two
    sha256 decide whether the weights are the same, and the folders they were loaded from do not."""
    config = baseline.get("config") or {}
    model = config.get("model")
    if model not in UNSTEERED_MODELS:
        return [f"made by model {model!r}; reuse needs one of {', '.join(UNSTEERED_MODELS)}"]
    steering = config.get("steering") or {}
    if not steered and steering.get("route", "none") != "none" and steering.get("vector_files"):
        return [f"a steered run (route={steering['route']}); unsteered_from= needs hf or steered-hf route=none (give a steered run as steered_from=)"]
    given = config.get("model_args") or {}
    given = simple_parse_args_string(given) if isinstance(given, str) else given
    problems = []
    recorded = steering.get("weights")
    same_file = isinstance(recorded, dict) and weights is not None
    if same_file and recorded.get("sha256") != weights["sha256"]:
        problems.append(f"weights {weights['gguf_file']} sha256 {weights['sha256'][:12]}… here, {brief(recorded.get('gguf_file'))} {brief(recorded.get('sha256'))[:14]}… in the baseline")
    for name in ANSWER_ARGS:
        if same_file and name in _LOCATION_ARGS:
            continue
        here, there = (_normal(name, args.get(name, _HFLM_DEFAULTS.get(name))) for args in (model_args, given))
        if here != there:
            problems.append(f"{name}={here} here, {there} in the baseline")
    if dtype is not None:
        problems += dtype_mismatches(baseline, dtype)
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


def _shown(value: Any) -> str:
    """A metric value in a message: as it is logged (``1.0``, not ``np.float64(1.0)``), cut short."""
    text = logged_value(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _unsteered(doc: Mapping[str, Any] | None) -> Signature:
    return ()


def _file_with_digest(path: str, digest: Any, beside: Path | None = None) -> Path | None:
    """The recorded vector file, or else a ``.safetensors`` file in ``beside`` (the folder of the
    earlier run's results, where a run can be archived with the files it used) or a packaged file with
    its sha256 (a packaged file is recorded by its absolute path, which differs on every
    installation, and is replaced when a new version ships); None when none of them is there."""
    kept = sorted(beside.glob("*.safetensors")) if beside is not None else []
    for candidate in [Path(path), *kept, *packaged_vector_files().values()]:
        if candidate.is_file() and file_sha256(candidate) == digest:
            return candidate
    return None


def recorded_routes(argument: str, spec: str, baseline: Baseline) -> Callable[[Mapping[str, Any] | None], Signature]:
    """The :func:`route_signature` a baseline gave each document, recomputed from the steering its
    results JSON recorded, with its vector files read again (each must match its recorded sha256)."""
    steering = (baseline.results.get("config") or {}).get("steering") or {}
    where = f"{argument}={spec}: {baseline.results_file}"
    route = steering.get("route", "none")
    if route not in ROUTES:
        raise ReuseError(f"{where}: records route {brief(route)}, which this version does not know")
    try:
        overrides = Overrides(**(steering.get("overrides") or {}))
    except TypeError:
        raise ReuseError(f"{where}: records overrides {brief(steering.get('overrides'))}, which this version does not know") from None
    files: list[VectorFile] = []
    beside = Path(baseline.results_file).parent
    for record in steering.get("vector_files") or []:
        path, digest = (record.get("path"), record.get("sha256")) if isinstance(record, Mapping) else (None, None)
        found = _file_with_digest(str(path), digest, beside)
        if found is None:
            state = "is gone" if not Path(str(path)).is_file() else f"has changed since (sha256 {file_sha256(Path(str(path)))[:12]}… now)"
            raise ReuseError(
                f"{where}: its vector file {path} {state}, and no packaged file has its recorded sha256 {brief(digest)[:14]}…, "
                f"so its routes cannot be recomputed (a copy of that file in {beside} would be used)"
            )
        try:
            files.append(load_vector_file(found))
        except VectorFileError as error:
            raise ReuseError(f"{where}: its vector file cannot be read again, so its routes cannot be recomputed ({error})") from None
    skip_first_token = bool(steering.get("skip_first_token", True))
    return lambda doc: route_signature(entries_for_document(doc, files, route, overrides), skip_first_token)


@dataclass
class Reuse:
    """The baseline of one ``steered-hf`` model, and what it served so far."""

    spec: str  # the model arg's value, for messages
    baseline: Baseline
    argument: str = "unsteered_from"  # the model arg it was given as
    route_there: Callable[[Mapping[str, Any] | None], Signature] = _unsteered  # how the baseline steered each document
    reused: Counter[str] = field(default_factory=Counter)  # task -> requests answered from the baseline
    missing: Counter[str] = field(default_factory=Counter)  # task -> unsteered requests the baseline lacks
    verified: set[tuple[str, str]] = field(default_factory=set)  # (task, document hash) re-scored
    # task name -> (the harness task, its requests by doc_id), for the evaluation in progress
    _requests: dict[str, tuple[Any, dict[Any, list[Instance]]]] = field(default_factory=dict)

    @classmethod
    def load(cls, spec: str, model_args: Mapping[str, Any], weights: Mapping[str, str] | None = None, argument: str = "unsteered_from") -> Reuse:
        """The baseline ``spec`` names, checked against the model made with ``model_args`` (before
        the weights load; :meth:`check_dtype` compares the dtype once they have). ``argument`` is
        ``unsteered_from`` (an unsteered run) or ``steered_from`` (any run; its routes are recomputed)."""
        baseline = load_baseline(spec, argument)
        steered = argument == "steered_from"
        cls._refuse_if(f"{argument}={spec}", baseline, model_mismatches(baseline.results, model_args, None, weights, steered=steered))
        return cls(spec, baseline, argument, recorded_routes(argument, spec, baseline) if steered else _unsteered)

    @property
    def given_as(self) -> str:
        """``unsteered_from=<spec>``, as messages name it."""
        return f"{self.argument}={self.spec}"

    def check_dtype(self, dtype: Any) -> None:
        """Refuses the baseline when the loaded model's dtype differs from the one it was made with."""
        self._refuse_if(self.given_as, self.baseline, dtype_mismatches(self.baseline.results, dtype))

    @staticmethod
    def _refuse_if(given_as: str, baseline: Baseline, problems: Sequence[str]) -> None:
        if problems:
            raise ReuseError(f"{given_as}: {baseline.results_file} cannot stand in for this run: {'; '.join(problems)}")

    def _refuse(self, request: Instance, problem: str) -> ReuseError:
        return ReuseError(f"{self.given_as}: task {request.task_name} doc_id {request.doc_id}: {problem}")

    def answer(self, requests: list[Instance], route: Callable[[Instance], Signature], run: Callable[[list[Instance]], list[Answer]]) -> list[Answer]:
        """The answers to ``requests``: logged ones for requests the baseline has and steered as this run
        does (``route(request)`` equals the baseline's signature for the document), ``run``'s for the
        rest (in one call, so the harness still batches them together)."""
        # Checked on every call: one model object may serve several evaluations.
        evaluation = running_evaluation()
        if evaluation is not None:
            self._refuse_if(self.given_as, self.baseline, evaluation_mismatches(self.baseline.results, evaluation))
        answers: list[Any] = [None] * len(requests)
        to_run: list[int] = []
        repeat: Counter[int] = Counter()  # the harness passes a request once per repeat
        for index, request in enumerate(requests):
            if is_sampled(request):
                raise ReuseError(f"{self.given_as}: task {request.task_name} samples (do_sample/temperature), and sampled answers cannot be reused")
            same_steering = route(request) == self.route_there(request.doc)
            logged = self._logged(request, repeat[id(request)], evaluation) if same_steering else None
            repeat[id(request)] += 1
            if logged is None:
                to_run.append(index)
            else:
                answers[index] = logged
                self.reused[str(request.task_name)] += 1
        for index, answer in zip(to_run, run([requests[i] for i in to_run]) if to_run else []):
            answers[index] = answer
        return answers

    def _logged(self, request: Instance, repeat: int, evaluation: Evaluation | None) -> Any:
        """The baseline's answer to a request it steered alike; None (and counted) when it lacks the document."""
        task = str(request.task_name)
        document_hash = logged_doc_hash(request.doc)
        document = self.baseline.documents.get(task, {}).get(document_hash)
        responses = None if document is None else document.responses.get(logged_arguments(request.args))
        if document is not None and responses is None:
            raise self._refuse(request, self._difference(request, list(document.responses)))
        if document is None or responses is None or repeat >= len(responses):
            if not self.missing[task]:
                logger.warning("%s: %s has documents the baseline lacks; they are generated", self.given_as, task)
            self.missing[task] += 1
            return None
        if (task, document_hash) not in self.verified:
            self._verify(request, document, evaluation)
            self.verified.add((task, document_hash))
        return self._parsed(request, responses[repeat])

    def _parsed(self, request: Instance, logged: Any) -> Any:
        """One logged response as the model returned it; refused when it is not an answer of the request's type."""
        try:
            return parse_logged_response(request.request_type, logged)
        except (TypeError, ValueError):
            raise self._refuse(request, f"the logged response {brief(logged)} is not a {request.request_type} answer") from None

    def _document_requests(self, task: Any, request: Instance) -> list[Instance]:
        """All requests of ``request``'s document in ``task`` (indexed once per task of an evaluation)."""
        name = str(request.task_name)
        known = self._requests.get(name)
        if known is None or known[0] is not task:
            known = self._requests[name] = (task, document_requests(task))
        return known[1].get(request.doc_id) or [request]

    def _verify(self, request: Instance, document: LoggedDocument, evaluation: Evaluation | None) -> None:
        """Refuses a document whose logged answers, scored by the task's own filters and
        ``process_results``, do not give the metrics logged next to them (an edited or corrupted
        answer). Needs the evaluation's task; a document some of whose requests the baseline lacks
        is generated in part and not compared."""
        task = evaluation.tasks.get(str(request.task_name)) if evaluation is not None else None
        if task is None or not document.metrics:
            return
        requests = self._document_requests(task, request)
        logged = [document.responses.get(logged_arguments(each.args)) for each in requests]
        if any(responses is None or len(responses) < each.repeats for each, responses in zip(requests, logged)):
            return
        answers = [[self._parsed(each, response) for response in responses] for each, responses in zip(requests, logged)]
        for filter_name, metrics in rescore(task, requests, answers, document.metrics).items():
            for metric, value in metrics.items():
                recorded = document.metrics[filter_name].get(metric, value)  # a metric not logged: nothing to compare
                if logged_value(value) != logged_value(recorded):
                    raise self._refuse(
                        request,
                        f"the logged answer scores {metric}={_shown(value)} (filter {filter_name}), but the baseline logged {metric}={_shown(recorded)}: "
                        "its samples file was edited or is corrupted",
                    )

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
        """What ``config.steering.<argument>`` records in the results JSON. A steered baseline's own
        ``unsteered_from`` record is kept with it: the unsteered answers served from that baseline
        may have come from there."""
        baseline_reuse = ((self.baseline.results.get("config") or {}).get("steering") or {}).get("unsteered_from")
        return {
            "results_file": str(self.baseline.results_file),
            "sha256": self.baseline.sha256,
            "samples": {task: {"file": str(path), "sha256": digest} for task, (path, digest) in sorted(self.baseline.sample_files.items())},
            "reused_requests": dict(sorted(self.reused.items())),
            "missing_requests": dict(sorted(self.missing.items())),
            **({"unsteered_from": baseline_reuse} if self.argument == "steered_from" and baseline_reuse else {}),
        }
