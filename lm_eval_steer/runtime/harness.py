"""Everything ``steered-hf`` assumes about the internals of the harness's ``HFLM``, in one place.

Written against **lm-eval 0.4.13** (:data:`HARNESS_VERSION`). The harness hands the model only
strings and token rows, never the request a batch row belongs to, so :class:`SteeredHFLM` finds each
row's steering entries again through these assumptions:

1. ``generate_until`` encodes each batch with ``tok_batch_encode(contexts)``, contexts in batch-row
   order, right before ``_model_generate`` generates that batch.
2. ``loglikelihood`` hands ``_loglikelihood_tokens`` tuples ``(request_strings, context_tokens,
   continuation_tokens)`` whose ``request_strings`` is the request's ``(context, continuation)``.
3. ``_loglikelihood_tokens`` feeds a causal model :func:`loglikelihood_input` of each tuple, rows
   right-padded (with zeros) into one ``_model_call`` batch, so a batch row is the longest of its
   prefixes that is a known input.

``tests/test_harness_coupling.py`` checks each of them against the installed harness: if a harness
release changes one, that test fails before steering silently goes to the wrong rows.
"""

from __future__ import annotations

from collections.abc import Sequence

HARNESS_VERSION = "0.4.13"


def loglikelihood_input(context_tokens: Sequence[int], continuation_tokens: Sequence[int], max_length: int) -> list[int]:
    """The token row ``HFLM._loglikelihood_tokens`` feeds a causal model for one request: context and
    continuation truncated from the left to ``max_length + 1`` tokens, the last one dropped."""
    return (list(context_tokens) + list(continuation_tokens))[-(max_length + 1) :][:-1]


def continuation_start(model_input: Sequence[int], continuation_tokens: Sequence[int]) -> int:
    """First column of ``model_input`` that the harness scores as continuation: ``positions=generated``
    starts steering there, everything before it is prompt."""
    return len(model_input) - len(continuation_tokens) + 1
