"""Which steering entries each batch row of the harness call in progress gets.

``SteeredHFLM`` knows each request's entries when a harness call begins, but the harness hands the
model only the batch's strings or token rows. One :class:`RequestRows` per model keeps that mapping
for exactly one call: ``begin`` it with the entries per request, ``lookup`` rows while the harness
runs, ``end`` it (``with rows.requests(...)`` does both, also on errors; ``with rows.generations(...)``
is the same for a ``generate_until`` call). How rows are recognised is the harness coupling
described in :mod:`lm_eval_steer.runtime.harness`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from lm_eval_steer.runtime.harness import continuation_start, loglikelihood_input
from lm_eval_steer.runtime.vectorfile import SteeringEntry

Entries = tuple[SteeringEntry, ...]  # one batch row's (or request's) entries
Rows = list[Entries]
_HARNESS_CHANGED = "steered-hf: {what} (harness internals changed? see lm_eval_steer.runtime.harness)"


class RequestRows:
    """The entries per request of one harness call, found again per batch row."""

    def __init__(self) -> None:
        self._by_key: Mapping[Hashable, Entries] = {}
        self._every_row: Entries | None = None
        self._queued: dict[str, deque[Entries]] = {}  # generation: per context, its requests' entries in order
        self._batch: Rows | None = None  # rows of the batch just encoded (generation)
        self._by_input: dict[tuple[int, ...], tuple[Entries, int]] | None = None  # loglikelihood

    # ----------------------------------------------------------------------------- one harness call

    def begin(self, by_key: Mapping[Hashable, Entries] | None = None, *, every_row: Entries | None = None) -> None:
        """Starts a loglikelihood call: ``by_key`` maps how the harness will present each request (its
        ``(context, continuation)``) to its entries; ``every_row`` instead gives every row the same
        entries (rolling windows carry no request). Generation calls use :meth:`generations`."""
        self._by_key = by_key or {}
        self._every_row = every_row

    def lookup(self, key: Hashable) -> Entries:
        """The entries of the request presented as ``key`` (none for a key the call did not begin with)."""
        return self._every_row if self._every_row is not None else self._by_key.get(key, ())

    def end(self) -> None:
        """Forgets the call, so nothing leaks into the next one."""
        self._by_key, self._every_row, self._queued, self._batch, self._by_input = {}, None, {}, None, None

    @contextmanager
    def requests(self, by_key: Mapping[Hashable, Entries] | None = None, *, every_row: Entries | None = None) -> Iterator[None]:
        """``begin`` … ``end`` around one harness call."""
        self.begin(by_key, every_row=every_row)
        try:
            yield
        finally:
            self.end()

    # ----------------------------------------------------------------------------- generation

    @contextmanager
    def generations(self, requests: Sequence[tuple[str, Entries]]) -> Iterator[None]:
        """One ``generate_until`` call of ``requests``, each its ``(context, entries)``, in request order.

        A context may come with several entries (one question, several routes): the harness encodes
        the identical contexts of one gen_kwargs group in request order (harness assumption 2), so
        each encoding of a context takes the next of its entries. The caller gives one gen_kwargs
        group per context. A context encoded more or less often than requested fails (the harness
        changed); a reordering only ``tests/test_runtime_harness.py`` can see."""
        queued: dict[str, deque[Entries]] = {}
        for context, entries in requests:
            queued.setdefault(context, deque()).append(entries)
        self.begin()
        self._queued = queued
        try:
            yield
            if any(queued.values()):
                raise RuntimeError(_HARNESS_CHANGED.format(what="requests were never encoded"))
        finally:
            self.end()

    def encode_batch(self, contexts: Sequence[str]) -> None:
        """Records the rows of the batch the harness is encoding (it generates that batch next); a
        context that is not one of the call's is not steered."""
        self._batch = [self._next_entries(context) for context in contexts]

    def _next_entries(self, context: str) -> Entries:
        queue = self._queued.get(context)
        if queue is None:
            return ()
        if not queue:
            raise RuntimeError(_HARNESS_CHANGED.format(what="a prompt was encoded more often than it was requested"))
        return queue.popleft()

    def take_batch(self, size: int) -> Rows:
        """The rows of the batch about to be generated (unsteered rows when it was not encoded by us)."""
        rows, self._batch = self._batch, None
        return rows if rows is not None and len(rows) == size else [()] * size

    # ----------------------------------------------------------------------------- loglikelihood

    @contextmanager
    def model_inputs(self, requests: Sequence[tuple[Any, list[int], list[int]]], max_length: int) -> Iterator[None]:
        """Indexes, for one ``_loglikelihood_tokens`` call, every model input the harness will build
        by its tokens, with its row's entries and where its continuation starts."""
        index: dict[tuple[int, ...], tuple[Entries, int]] = {}
        for request_strings, context_tokens, continuation_tokens in requests:
            model_input = loglikelihood_input(context_tokens, continuation_tokens, max_length)
            entries = self.lookup(tuple(request_strings) if request_strings else ())
            index[tuple(model_input)] = (entries, continuation_start(model_input, continuation_tokens))
        # Nothing to steer (route=none, or no entry applies): skip the per-row lookups altogether.
        self._by_input = index if any(entries for entries, _ in index.values()) else None
        try:
            yield
        finally:
            self._by_input = None

    def lookup_inputs(self, batch: list[list[int]]) -> tuple[Rows, list[int]] | None:
        """Entries and continuation starts of a ``_model_call`` batch; None when nothing is steered
        (or the call is not one of a loglikelihood pass, e.g. batch-size detection)."""
        if self._by_input is None:
            return None
        found = [self._lookup_input(row) for row in batch]
        return [entries for entries, _ in found], [start for _, start in found]

    def _lookup_input(self, row: list[int]) -> tuple[Entries, int]:
        assert self._by_input is not None
        # Rows are right-padded: the longest prefix that is a known input is this row.
        for length in range(len(row), 0, -1):
            found = self._by_input.get(tuple(row[:length]))
            if found is not None:
                return found
        raise RuntimeError(_HARNESS_CHANGED.format(what="a loglikelihood batch row matches no request"))
