"""Everything ``steered-hf`` assumes about the internals of the harness, in one place.

Written against **lm-eval 0.4.13** (:data:`HARNESS_VERSION`). The harness hands the model only
strings and token rows, never the request a batch row belongs to, so :class:`SteeredHFLM` finds each
row's steering entries again through assumptions 1-3 about ``HFLM``:

1. ``generate_until`` encodes each batch with ``tok_batch_encode(contexts)``, contexts in batch-row
   order, right before ``_model_generate`` generates that batch.
2. ``loglikelihood`` hands ``_loglikelihood_tokens`` tuples ``(request_strings, context_tokens,
   continuation_tokens)`` whose ``request_strings`` is the request's ``(context, continuation)``.
3. ``_loglikelihood_tokens`` feeds a causal model :func:`loglikelihood_input` of each tuple, rows
   right-padded (with zeros) into one ``_model_call`` batch, so a batch row is the longest of its
   prefixes that is a known input.

Reusing an unsteered run's answers (``unsteered_from=``, :mod:`lm_eval_steer.runtime.reuse`) adds
two assumptions about the evaluator:

4. ``--log_samples`` writes, per document and filter, ``doc`` and ``doc_hash`` (sha256 of the doc as
   ``json.dumps(doc, indent=2, ensure_ascii=False)``), ``arguments`` as
   ``{"gen_args_<i>": {"arg_<j>": request.args[j]}}`` and ``resps`` as each request's responses with
   every scalar turned into a string (:func:`logged_doc_hash`, :func:`logged_arguments`,
   :func:`parse_logged_response`).
5. ``lm_eval.evaluator.evaluate`` calls the model with the tasks in its local ``eval_tasks`` (task
   name -> task) and the run's ``apply_chat_template`` and ``system_instruction`` arguments in scope:
   the model is never told which tasks it serves, so :func:`running_evaluation` reads them there.

``tests/test_harness_coupling.py`` checks 1-3 against the installed harness: if a harness release
changes one, that test fails before steering silently goes to the wrong rows. ``tests/test_reuse.py``
checks 4 and 5 end to end (reused answers equal a full run's; the run-setting refusals need 5).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lm_eval.utils import handle_non_serializable

HARNESS_VERSION = "0.4.13"


def loglikelihood_input(context_tokens: Sequence[int], continuation_tokens: Sequence[int], max_length: int) -> list[int]:
    """The token row ``HFLM._loglikelihood_tokens`` feeds a causal model for one request: context and
    continuation truncated from the left to ``max_length + 1`` tokens, the last one dropped."""
    return (list(context_tokens) + list(continuation_tokens))[-(max_length + 1) :][:-1]


def continuation_start(model_input: Sequence[int], continuation_tokens: Sequence[int]) -> int:
    """First column of ``model_input`` that the harness scores as continuation: ``positions=generated``
    starts steering there, everything before it is prompt."""
    return len(model_input) - len(continuation_tokens) + 1


# --------------------------------------------------------------------------- logged samples (4)


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


# --------------------------------------------------------------------------- the running evaluation (5)


@dataclass(frozen=True)
class Evaluation:
    """What the evaluator that is calling the model was asked to do."""

    task_versions: dict[str, Any]
    apply_chat_template: bool
    system_instruction: str | None


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
    return Evaluation(
        task_versions={name: getattr(task, "VERSION", None) for name, task in (scope.get("eval_tasks") or {}).items()},
        apply_chat_template=bool(scope.get("apply_chat_template")),
        system_instruction=scope.get("system_instruction"),
    )
