"""Training targets for learned vectors: responses that follow an instruction, shown a prompt without it.

For every training query the model answers the query *with* the instruction, and the answer becomes
a target for the same query *without* it (context distillation). Per query, the first that passes
IFEval's **strict** checker is kept:

1. ``greedy``: the greedy answer;
2. ``sampled``: one of ``samples`` sampled answers (temperature ``temperature``), for queries the
   greedy answer fails (the first :data:`PROBE` such queries are sampled first, the rest only if
   that found a passing answer);
3. ``repaired``: a deterministic repair of the greedy answer (:data:`REPAIRS`: case changes, commas
   removed, quotes, a ``<<title>>``, an end phrase …), re-checked after repair;

and a query none of these pass gives no target. With ``max_repetition`` set, an answer that loops (the
search guard's measure, :func:`~lm_eval_steer.core.degeneracy.is_degenerate`) does not pass either,
so the vector is not taught to loop; the report counts targets per source and the looping answers
refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from lm_eval_steer.core.degeneracy import is_degenerate
from vector_builder import prompts
from vector_builder.runner import Runner
from vector_builder.scoring import Scorer, strict_follows

Source = Literal["greedy", "sampled", "repaired"]
PROBE = 4  # failing queries sampled first; sampling goes on only if one of them found a passing answer


@dataclass(frozen=True)
class TargetResponse:
    """A response that follows ``instruction_id`` (with ``kwargs``) for the plain ``query``."""

    query: str
    kwargs: Mapping[str, Any]
    response: str
    source: Source


@dataclass(frozen=True, kw_only=True)
class TargetSettings:
    """How training targets are generated (recorded as ``targets``; the command line's
    ``--target-<field>``); batches and seed are the build's generation settings."""

    samples: int = 4  # sampled answers per query whose greedy answer fails (0: none)
    max_tokens: int = 128  # length limit of a target answer
    temperature: float = 0.8
    max_repetition: float | None = None  # None: looping answers may be targets; else refused above this repetition

    def __post_init__(self) -> None:
        if self.max_repetition is not None and not 0 <= self.max_repetition < 1:
            raise ValueError(f"--target-max-repetition must be a number from 0 up to but not including 1, got {self.max_repetition}")
        if self.max_tokens < 1:
            raise ValueError(f"--target-max-tokens must be at least 1, got {self.max_tokens}")
        if self.samples < 0:
            raise ValueError(f"--target-samples must not be negative, got {self.samples}")


# ------------------------------------------------------------------------------------------ repairs


def _title(query: str) -> str:
    words = re.findall(r"[A-Za-z0-9']+", query)[:6]
    return " ".join(word.capitalize() for word in words) or "Answer"


def _highlight(response: str, count: int) -> str | None:
    """``*line*`` around the first ``count`` non-empty lines that hold no ``*`` yet (None if too few)."""
    lines = response.split("\n")
    free = [index for index, line in enumerate(lines) if line.strip() and "*" not in line]
    if len(free) < count:
        return None
    for index in free[:count]:
        lines[index] = f"*{lines[index].strip()}*"
    return "\n".join(lines)


def _capital_words(response: str, kwargs: Mapping[str, Any]) -> str | None:
    """At least N all-capital words: capitalise whole lines from the top until there are N + 1."""
    if kwargs.get("capital_relation") != "at least":
        return None
    lines, needed, capitals = response.split("\n"), int(kwargs.get("capital_frequency", 1)) + 1, 0
    for index, line in enumerate(lines):
        if capitals >= needed:
            break
        lines[index] = line.upper()
        capitals += len(re.findall(r"[A-Za-z]{2,}", line))
    return "\n".join(lines) if capitals >= needed else None


def _constrained(response: str) -> str:
    """``My answer is yes/no/maybe.`` put first (yes or no when the answer opens with that word), so
    the phrase is what a vector learns to write at the start, not a tail after a long answer."""
    opening = re.match(r"\W*(\w+)", response)
    word = opening.group(1).lower() if opening else ""
    choice = word if word in ("yes", "no") else "maybe"
    return f"My answer is {choice}. {response.lstrip()}"


def _first_sentences(response: str, kwargs: Mapping[str, Any]) -> str | None:
    """Fewer than N sentences: keep the first N − 1 (split after ``.``, ``!`` or ``?``)."""
    if kwargs.get("relation") != "less than":
        return None
    sentences = re.split(r"(?<=[.!?])\s+", response.strip())
    return " ".join(sentences[: max(1, int(kwargs.get("num_sentences", 2)) - 1)])


def _first_words(response: str, kwargs: Mapping[str, Any]) -> str | None:
    """Fewer than N words: cut after the (N − 1)-th word, at a sentence end where one is near."""
    if kwargs.get("relation") != "less than":
        return None
    words = list(re.finditer(r"\w+", response))
    keep = max(1, int(kwargs.get("num_words", 2)) - 1)
    if len(words) <= keep:
        return response
    cut = response[: words[keep - 1].end()]
    sentence_end = max(cut.rfind("."), cut.rfind("!"), cut.rfind("?"))
    return cut[: sentence_end + 1] if sentence_end > len(cut) // 2 else cut


REPAIRS: Mapping[str, Callable[[str, Mapping[str, Any], str], str | None]] = {
    "change_case:english_lowercase": lambda response, kwargs, query: response.lower(),
    "change_case:english_capital": lambda response, kwargs, query: response.upper(),
    "change_case:capital_word_frequency": lambda response, kwargs, query: _capital_words(response, kwargs),
    "punctuation:no_comma": lambda response, kwargs, query: response.replace(",", ""),
    "startend:quotation": lambda response, kwargs, query: '"' + response.strip().strip('"') + '"',
    "startend:end_checker": lambda response, kwargs, query: f"{response.rstrip()}\n\n{kwargs['end_phrase']}" if kwargs.get("end_phrase") else None,
    "detectable_format:title": lambda response, kwargs, query: f"<<{_title(query)}>>\n\n{response.lstrip()}",
    "detectable_format:json_format": lambda response, kwargs, query: "```json\n" + json.dumps({"answer": response.strip()}, indent=2) + "\n```",
    "detectable_format:constrained_response": lambda response, kwargs, query: _constrained(response),
    "detectable_format:number_highlighted_sections": lambda response, kwargs, query: _highlight(response, int(kwargs.get("num_highlights", 1))),
    "length_constraints:number_sentences": lambda response, kwargs, query: _first_sentences(response, kwargs),
    "length_constraints:number_words": lambda response, kwargs, query: _first_words(response, kwargs),
}
"""instruction id → ``repair(response, kwargs, query)``: a minimal edit meant to make the response
follow the instruction, or None when no such edit is known for these kwargs."""


# ---------------------------------------------------------------------------------------- sampling


def generate_texts(runner: Runner, messages: Sequence[str], settings: TargetSettings, *, sample: bool, desc: str) -> list[list[str]]:
    """Answers per chat message: one greedy answer, or ``settings.samples`` sampled ones (seeded per batch)."""
    per_prompt = settings.samples if sample else 1
    step = max(1, runner.settings.batch_size // per_prompt)
    answers: list[list[str]] = []
    with tqdm(total=len(messages), desc=desc, unit="prompt", leave=False) as bar:
        for start in range(0, len(messages), step):
            batch = messages[start : start + step]
            options = {"do_sample": True, "temperature": settings.temperature, "num_return_sequences": per_prompt} if sample else {"do_sample": False}
            torch.manual_seed(runner.settings.seed * 100_003 + start)
            rows = runner.continuations([prompts.chat_ids(runner.tokenizer, text) for text in batch], settings.max_tokens, **options)
            texts = [runner.decode(row) for row in rows]
            answers += [texts[i : i + per_prompt] for i in range(0, len(texts), per_prompt)]
            bar.update(len(batch))
    return answers


@dataclass
class TargetCheck:
    """Whether an answer may be a target: it passes the checker and, with ``settings.max_repetition``,
    does not loop. ``refused`` counts the looping answers that passed the checker (for the report)."""

    runner: Runner
    spec: prompts.DirectionSpec
    settings: TargetSettings
    checker: Scorer
    refused: int = 0

    def __call__(self, prompt: prompts.Prompt, answer: str) -> bool:
        if not self.checker(self.spec.instruction_id, prompt.kwargs, prompt.checker_prompt, answer):
            return False
        limit = self.settings.max_repetition
        if limit is not None and is_degenerate(self.runner.tokenizer.encode(answer, add_special_tokens=False), limit):
            self.refused += 1
            return False
        return True


def _sampled_passing(runner: Runner, instructed: Sequence[prompts.Prompt], settings: TargetSettings, accept: TargetCheck) -> list[str | None]:
    """Per prompt, the first of ``settings.samples`` sampled answers that ``accept`` takes (None if none)."""
    if not instructed:
        return []
    sampled = generate_texts(runner, [p.checker_prompt for p in instructed], settings, sample=True, desc=f"samples {accept.spec.key}")
    return [next((answer for answer in answers if accept(prompt, answer)), None) for prompt, answers in zip(instructed, sampled)]


def collect(
    runner: Runner, spec: prompts.DirectionSpec, queries: Sequence[str], settings: TargetSettings, *, checker: Scorer = strict_follows
) -> tuple[list[TargetResponse], int]:
    """Targets for ``spec`` on ``queries`` (see the module docstring), in query order, and how many
    answers passed the checker but were refused for looping."""
    instructed = prompts.training_prompts(spec, queries, runner.settings.seed)
    messages = [p.checker_prompt for p in instructed]
    greedy = [answers[0] for answers in generate_texts(runner, messages, settings, sample=False, desc=f"targets {spec.key}")]
    accept = TargetCheck(runner, spec, settings, checker)
    chosen: dict[int, tuple[str, Source]] = {}
    for index, (prompt, answer) in enumerate(zip(instructed, greedy)):
        if accept(prompt, answer):
            chosen[index] = (answer, "greedy")
    failing = [index for index in range(len(instructed)) if index not in chosen]
    if failing and settings.samples > 0:
        # Sampling is the expensive step: probe a few failing queries first and go on only if that
        # finds passing answers at all (a small model told "all lowercase" may never comply).
        probe = _sampled_passing(runner, [instructed[i] for i in failing[:PROBE]], settings, accept)
        rest = _sampled_passing(runner, [instructed[i] for i in failing[PROBE:]], settings, accept) if any(a is not None for a in probe) else []
        for index, answer in zip(failing, probe + rest):
            if answer is not None:
                chosen[index] = (answer, "sampled")
    repair = REPAIRS.get(spec.instruction_id)
    for index in [i for i in range(len(instructed)) if i not in chosen and repair is not None]:
        prompt = instructed[index]
        fixed = repair(greedy[index], prompt.kwargs, prompt.text)
        if fixed is not None and accept(prompt, fixed):
            chosen[index] = (fixed, "repaired")
    found = [
        TargetResponse(query=instructed[index].text, kwargs=instructed[index].kwargs, response=response, source=source)
        for index, (response, source) in sorted(chosen.items())
    ]
    return found, accept.refused
