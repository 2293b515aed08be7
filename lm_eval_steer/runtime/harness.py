"""Everything ``steered-hf`` assumes about the internals of the harness, in one place.

Written against **lm-eval 0.4.13** (:data:`HARNESS_VERSION`). The harness hands the model only
strings and token rows, never the request a batch row belongs to, so :class:`SteeredHFLM` finds each
row's steering entries again through assumptions 1-4 about ``HFLM``:

1. ``generate_until`` encodes each batch with ``tok_batch_encode(contexts)``, contexts in batch-row
   order, right before ``_model_generate`` generates that batch.
2. ``generate_until`` encodes every request exactly once (nothing deduplicates identical prompts),
   and encodes the requests of one gen_kwargs group that share a prompt in request order: its
   ``Collator`` keeps each group in request order, sorts it stably by a key of the prompt alone
   and batches it in that order. Requests with the same :func:`generation_group` are in one group.
   The order of the groups is not relied on: a prompt asked under two groups gets one
   ``generate_until`` pass per group.
3. ``loglikelihood`` hands ``_loglikelihood_tokens`` tuples ``(request_strings, context_tokens,
   continuation_tokens)`` whose ``request_strings`` is the request's ``(context, continuation)``.
4. ``_loglikelihood_tokens`` feeds a causal model :func:`loglikelihood_input` of each tuple, rows
   right-padded (with zeros) into one ``_model_call`` batch, so a batch row is the longest of its
   prefixes that is a known input.

Reusing an unsteered run's answers (``unsteered_from=``, :mod:`lm_eval_steer.runtime.reuse`) adds
two assumptions about the evaluator:

5. ``--log_samples`` writes, per document and filter, ``doc`` and ``doc_hash`` (sha256 of the doc as
   ``json.dumps(doc, indent=2, ensure_ascii=False)``), ``arguments`` as
   ``{"gen_args_<i>": {"arg_<j>": request.args[j]}}`` and ``resps`` as each request's responses with
   every scalar turned into a string (:func:`logged_doc_hash`, :func:`logged_arguments`,
   :func:`parse_logged_response`).
6. ``lm_eval.evaluator.evaluate`` calls the model with the tasks in its local ``eval_tasks`` (task
   name -> task) and the run's ``apply_chat_template`` and ``system_instruction`` arguments in scope:
   the model is never told which tasks it serves, so :func:`running_evaluation` reads them there.
   This walks the stack because 0.4.13 offers no supported hook: ``evaluate`` hands the model only
   ``getattr(lm, request_type)(requests)``, and an ``Instance`` carries its task's name and document
   but not the ``Task`` (needed to re-score a reused answer), the chat-template flag or the system
   instruction. ``tests/test_runtime_harness.py`` checks the local names and a real ``evaluate`` call.
   It then scores each document as :func:`rescore` does: the document's requests are the task's
   ``instances`` of its ``doc_id`` in ``idx`` order, each filter pipeline of ``task._filters`` (a
   ``FilterEnsemble`` that reads ``resps`` and ``doc`` and writes ``filtered_resps``) filters their
   responses, and ``task.process_results(doc, filtered responses)`` gives the metrics it logs next
   to them (:func:`logged_value` renders a metric as it is logged).

``tests/test_runtime_harness.py`` checks 1-4 and 6 against the installed harness: if a harness release
changes one, that test fails before steering silently goes to the wrong rows. ``tests/test_runtime_reuse.py``
checks 5 and 6 end to end (reused answers equal a full run's; the run-setting refusals need 6).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from lm_eval.utils import handle_non_serializable

HARNESS_VERSION = "0.4.13"


def generation_group(gen_kwargs: Any) -> str:
    """Which gen_kwargs group (assumption 2) a generation request falls in. Never coarser than the
    harness's grouping by the gen_kwargs' items: equal reprs mean equal items (a harness group
    split in two here costs a pass, never a wrong row)."""
    return repr(gen_kwargs)


def loglikelihood_input(context_tokens: Sequence[int], continuation_tokens: Sequence[int], max_length: int) -> list[int]:
    """The token row ``HFLM._loglikelihood_tokens`` feeds a causal model for one request: context and
    continuation truncated from the left to ``max_length + 1`` tokens, the last one dropped."""
    return (list(context_tokens) + list(continuation_tokens))[-(max_length + 1) :][:-1]


def continuation_start(model_input: Sequence[int], continuation_tokens: Sequence[int]) -> int:
    """First column of ``model_input`` that the harness scores as continuation: ``positions=generated``
    starts steering there, everything before it is prompt."""
    return len(model_input) - len(continuation_tokens) + 1


# --------------------------------------------------------------------------- logged samples (5)


def _logged_json(value: Any, **dumps: Any) -> str:
    return json.dumps(value, default=handle_non_serializable, ensure_ascii=False, **dumps)


def logged_doc_hash(doc: Any) -> str:
    """The ``doc_hash`` that ``--log_samples`` writes for a request's document."""
    return hashlib.sha256(_logged_json(doc, indent=2).encode("utf-8")).hexdigest()


def logged_arguments(args: Sequence[Any]) -> str:
    """A request's arguments as one canonical string, equal for a live request and its logged copy
    (tuples become lists and unserialisable values strings on the way through JSON)."""
    return _logged_json(json.loads(_logged_json(list(args))), sort_keys=True)


def _numbered(logged: Mapping[str, Any]) -> list[Any]:
    """The values of ``{"<name>_0": a, "<name>_1": b, ...}`` in number order."""
    return [logged[key] for key in sorted(logged, key=lambda key: int(key.rpartition("_")[2]))]


def sample_arguments(sample: Mapping[str, Any]) -> list[str]:
    """:func:`logged_arguments` of each request of one logged sample, in request order."""
    return [logged_arguments(_numbered(request)) for request in _numbered(sample.get("arguments") or {})]


def parse_logged_response(request_type: str, logged: Any) -> Any:
    """One response as the model returned it, from its logged (stringified) form."""
    if request_type == "generate_until":
        return str(logged)
    if request_type == "loglikelihood":
        logprob, is_greedy = logged
        return float(logprob), is_greedy == "True"
    if request_type == "loglikelihood_rolling":
        return float(logged)
    raise ValueError(f"unknown request type {request_type!r}")


# --------------------------------------------------------------------------- the running evaluation (6)


@dataclass(frozen=True)
class Evaluation:
    """What the evaluator that is calling the model was asked to do."""

    task_versions: dict[str, Any]
    apply_chat_template: bool
    system_instruction: str | None
    tasks: Mapping[str, Any] = field(default_factory=dict)  # task name -> the harness's Task


def running_evaluation() -> Evaluation | None:
    """The :class:`Evaluation` of the ``lm_eval.evaluator.evaluate`` call on the stack, or None when the
    model is called outside one (directly, as in unit tests)."""
    import lm_eval.evaluator

    code = inspect.unwrap(lm_eval.evaluator.evaluate).__code__
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not code:
        frame = frame.f_back
    if frame is None:
        return None
    scope = frame.f_locals
    tasks = dict(scope.get("eval_tasks") or {})
    return Evaluation(
        task_versions={name: getattr(task, "VERSION", None) for name, task in tasks.items()},
        apply_chat_template=bool(scope.get("apply_chat_template")),
        system_instruction=scope.get("system_instruction"),
        tasks=tasks,
    )


def document_requests(task: Any) -> dict[Any, list[Any]]:
    """The task's requests grouped by ``doc_id``, each group in ``idx`` order, as the evaluator groups
    them to score a document."""
    by_document: dict[Any, list[Any]] = {}
    for instance in task.instances:
        by_document.setdefault(instance.doc_id, []).append(instance)
    for group in by_document.values():
        group.sort(key=lambda instance: instance.idx)
    return by_document


def rescore(task: Any, requests: Sequence[Any], responses: Sequence[Sequence[Any]], filters: Collection[str]) -> dict[str, dict[str, Any]]:
    """Filter name -> the metrics the evaluator computes for one document whose ``requests`` (from
    :func:`document_requests`) got ``responses`` (one list per request, one response per repeat);
    only the filters named in ``filters`` are run."""
    scores: dict[str, dict[str, Any]] = {}
    for ensemble in getattr(task, "_filters", None) or ():
        if ensemble.name not in filters:
            continue
        # Stand-ins for the requests: the live ones must stay untouched (the evaluator filters them
        # itself later), and a filter pipeline reads and writes only these three attributes.
        copies = [SimpleNamespace(resps=list(answers), doc=request.doc, filtered_resps={}) for request, answers in zip(requests, responses, strict=True)]
        ensemble.apply(copies)
        scores[ensemble.name] = task.process_results(requests[0].doc, [copy.filtered_resps[ensemble.name] for copy in copies])
    return scores


def logged_value(value: Any) -> str:
    """A metric value as ``--log_samples`` writes it, canonical (keys sorted): a metric computed now
    and its logged copy are equal exactly when these strings are (NaN included)."""
    return _logged_json(value, sort_keys=True)
