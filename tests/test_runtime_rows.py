"""``RequestRows`` for generation: each encoding of a prompt takes the next of its requests' entries."""

from __future__ import annotations

import pytest
import torch

from lm_eval_steer.runtime.rows import RequestRows
from lm_eval_steer.runtime.vectorfile import SteeringEntry

A, B = (SteeringEntry("a", torch.ones(4), 0),), (SteeringEntry("b", torch.ones(4), 1),)


def test_a_prompt_takes_its_entries_in_request_order_across_batches() -> None:
    rows = RequestRows()
    with rows.generations([("q", A), ("other", B), ("q", ()), ("q", B)]):
        rows.encode_batch(["q", "other"])
        assert rows.take_batch(2) == [A, B]
        rows.encode_batch(["q", "q", "not asked"])
        assert rows.take_batch(3) == [(), B, ()]
    rows.encode_batch(["q"])  # the call is over: nothing is steered
    assert rows.take_batch(1) == [()]


def test_encoding_a_prompt_more_or_less_often_than_requested_fails() -> None:
    rows = RequestRows()
    with pytest.raises(RuntimeError, match="encoded more often than it was requested"):
        with rows.generations([("q", A)]):
            rows.encode_batch(["q", "q"])
    with pytest.raises(RuntimeError, match="requests were never encoded"):
        with rows.generations([("q", A), ("q", B)]):
            rows.encode_batch(["q"])
    rows.encode_batch(["q"])  # a failed call leaves nothing behind
    assert rows.take_batch(1) == [()]
