"""Stop conditions: a row stops being steered by an entry once its generated text contains one of the
entry's ``stop_after`` strings (case-insensitive).

A keyword-inclusion vector has done its job once the word is written; pushing on makes the model
repeat it. The rule, per row and entry: a generated position is steered unless the text of the
generated tokens up to and including that position's *input* token contains a stop string. So the
forward pass that reads the token completing the word already runs unsteered, and so does every
later one. Prompt positions are never stopped.

The rule depends only on the tokens, never on how they are fed: with the KV cache each decoding step
brings one new column, without it every step re-reads the whole sequence, and both give the same
masks. A forward call that starts at column 0 starts the record afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Decode = Callable[[list[int]], str]


class StopTracker:
    """The generated tokens of every batch row so far, and where each row's stop condition was met."""

    def __init__(self, decode: Decode) -> None:
        self._decode = decode
        self._tokens: list[list[int]] = []  # per row: generated token ids in column order
        self._columns: list[list[int]] = []  # per row: the absolute column of each of those tokens
        self._checked: dict[tuple[int, tuple[str, ...]], int] = {}  # how many tokens were searched
        self._stopped: dict[tuple[int, tuple[str, ...]], int] = {}  # first column steered no more
        self._start = 0  # first absolute column of the current chunk

    def observe(self, tokens: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor) -> None:
        """Records the generated tokens of one forward chunk: ``tokens [batch, chunk]`` are the last
        columns of ``attention_mask [batch, total]``; column ``t >= prompt_lengths[b]`` is generated."""
        total, chunk = attention_mask.shape[1], tokens.shape[1]
        self._start = total - chunk
        if self._start == 0 or len(self._tokens) != tokens.shape[0]:
            self._tokens = [[] for _ in range(tokens.shape[0])]
            self._columns = [[] for _ in range(tokens.shape[0])]
            self._checked, self._stopped = {}, {}
        real = attention_mask[:, self._start :].bool().tolist()
        ids = tokens.tolist()
        for row, first_generated in enumerate(prompt_lengths.tolist()):
            for offset in range(chunk):
                column = self._start + offset
                if column >= first_generated and real[row][offset]:
                    self._tokens[row].append(ids[row][offset])
                    self._columns[row].append(column)

    def steered(self, stops: Sequence[tuple[str, ...]], chunk_length: int) -> torch.Tensor:
        """``[batch, chunk_length]`` bool: True where row ``b`` is still steered under ``stops[b]``
        (an empty tuple never stops)."""
        keep = torch.ones(len(stops), chunk_length, dtype=torch.bool)
        for row, strings in enumerate(stops):
            if strings:
                column = self._stop_column(row, strings)
                if column is not None:
                    keep[row, max(0, column - self._start) :] = False
        return keep

    def _stop_column(self, row: int, strings: tuple[str, ...]) -> int | None:
        key = (row, strings)
        if key in self._stopped:
            return self._stopped[key]
        needles = [text.lower() for text in strings]
        tokens = self._tokens[row]
        # The prefixes are searched in order, so a match in tokens[:count] ends in its last token and
        # spans at most 4 tokens per character (byte-level pieces): decoding that window, not the
        # whole prefix, keeps each step's cost flat. Decoding several tokens together (not one by
        # one) keeps multi-token words and split characters whole.
        window = 4 * max(len(needle) for needle in needles) + 8
        for count in range(self._checked.get(key, 0) + 1, len(tokens) + 1):
            text = self._decode(tokens[max(0, count - window) : count]).lower()
            if any(needle in text for needle in needles):
                self._stopped[key] = self._columns[row][count - 1]
                return self._stopped[key]
        self._checked[key] = len(tokens)
        return None
