"""The degeneracy measure shared by the builder's guard and ``lm-eval-steer quality``.

The paper called an output degenerate when GPT-2 found it too predictable (perplexity < 2.5:
repetitive text). Without GPT-2 offline we measure the repetition directly on the token ids.
"""

from __future__ import annotations

from collections.abc import Sequence

MIN_DEGENERATE_TOKENS = 16
NGRAM = 4


def repetition(token_ids: Sequence[int], n: int = NGRAM) -> float:
    """``1 − |distinct n-grams| / |n-grams|`` (0 for sequences shorter than n)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def is_degenerate(token_ids: Sequence[int], max_repetition: float = 0.5) -> bool:
    """At least ``MIN_DEGENERATE_TOKENS`` long and ``repetition > max_repetition`` (by default: more
    than half of its token 4-grams are repeats)."""
    return len(token_ids) >= MIN_DEGENERATE_TOKENS and repetition(token_ids) > max_repetition


def repeated_ngram_ends(token_ids: Sequence[int], n: int = NGRAM) -> list[bool]:
    """Per token: whether the n-gram ending at it already ended at an earlier token of the sequence.

    The tokens of a loop after its first pass are exactly these; the first ``n − 1`` tokens (no full
    n-gram yet) are never repeats. ``repetition`` counts the same repeats over the whole sequence.
    """
    seen: set[tuple[int, ...]] = set()
    flags = []
    for end in range(len(token_ids)):
        gram = tuple(token_ids[end - n + 1 : end + 1]) if end >= n - 1 else None
        flags.append(gram is not None and gram in seen)
        if gram is not None:
            seen.add(gram)
    return flags
