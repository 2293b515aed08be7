"""Layer and strength search on validation prompts.

Every target (vector-file entry) is tried at each candidate ``(layer, multiplier)`` plus "no
steering" on the same validation prompts; generations of all targets and candidates run batched
together through :func:`lm_eval_steer.runtime.hooks.steering` (one row per (prompt, candidate), each row
with its own entry). Identical generations are run once: the unsteered generation of a validation
query serves every target, and targets that share a direction and mode (the two length entries)
share their steered generations too. Outputs are scored with IFEval's loose checker.

Degeneracy guard: the paper disqualified candidates whose outputs had GPT-2 perplexity below 2.5
(repetitive text). Without GPT-2 we use a token repetition measure,
``repetition = 1 − distinct 4-grams / 4-grams`` of the generated ids; an output is degenerate (it
*loops*) when it is at least 16 tokens long and ``repetition > max_repetition`` (default 0.5: over
half of its 4-grams are repeats). Each steered answer is judged against the unsteered answer to the
same prompt: a candidate is disqualified when more than ``allowed_degenerate`` (default 0) of its
answers loop whose unsteered answer does not (*new looping*). Answers that loop unsteered and not
steered (*cured looping*) are counted and reported, but never pay for new looping elsewhere: pooled
counts would let a model that loops in most unsteered answers hide new looping behind cured answers,
and would be strict where the unsteered model never loops.

Choice: the best qualified candidate by (score, fewer degenerate outputs, earlier in candidate
order) is chosen only if its score is strictly above "no steering"; a tie goes to no steering. The
score is the ``objective``: ``follows``, the share of answers the checker passes, or ``fluent``, the
share it passes that do not loop either (what a user can trust; a candidate cannot buy passes with
looping answers, not even with answers that looped unsteered already).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm.auto import tqdm

from lm_eval_steer.core.degeneracy import NGRAM, is_degenerate
from lm_eval_steer.runtime.entrysets import member_name
from lm_eval_steer.runtime.hooks import steering
from lm_eval_steer.runtime.vectorfile import SteeringEntry
from vector_builder.direction import Direction
from vector_builder.prompts import Prompt, Target
from vector_builder.runner import Runner
from vector_builder.scoring import Scorer, loose_follows

STRENGTH_BASES = ("shift", "paper")
WITHOUT_INSTRUCTION = "without instruction"
WITH_INSTRUCTION_TOO = "without and with instruction"
VALIDATION_PROMPTS = (WITHOUT_INSTRUCTION, WITH_INSTRUCTION_TOO)
OBJECTIVES = ("follows", "fluent")

#: Instructions that a string, once written, satisfies whatever the answer says after it: IFEval's title
#: checker asks for one ``<<…>>``, its constrained-response checker for one of three phrases anywhere.
#: Their entries stop steering there (``--stop-once-followed``): steering on only bends the rest of the
#: answer, where looping starts (``<<poem of joy>>`` followed by a loop).
FOLLOWED_ONCE_WRITTEN: Mapping[str, tuple[str, ...]] = {
    "detectable_format:title": (">>",),
    "detectable_format:constrained_response": ("My answer is yes.", "My answer is no.", "My answer is maybe."),
}


@dataclass(frozen=True)
class Candidate:
    """``layer=None`` is "no steering"; otherwise the strength follows from the multiplier (:func:`strength_of`),
    ``stop_after_tokens`` (None: to the end) is the entry's token stop rule and ``start_after_tokens``
    (None: from the prompt on) its delayed start. ``also``: the further layers of a jointly trained
    set of vectors, steered together with ``layer`` at the same multiplier (:func:`make_entries`)."""

    layer: int | None
    multiplier: float = 0.0
    stop_after_tokens: int | None = None
    start_after_tokens: int | None = None
    also: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return candidate_label(self.layer, self.multiplier, self.stop_after_tokens, self.start_after_tokens, self.also)


def candidate_label(layer: int | None, multiplier: float, stop_after_tokens: int | None, start_after_tokens: int | None = None, also: Sequence[int] = ()) -> str:
    """``none``, ``L12x1.5``, ``L12x1.5@64`` (steering the first 64 answer tokens only), ``L12x1.5>4``
    (steering from answer token 4 on), ``L12x1.5>4@64`` (answer tokens 4 to 63) or ``L2+6+10x1`` (a
    set trained jointly at layers 2, 6 and 10)."""
    if layer is None:
        return "none"
    start = "" if start_after_tokens is None else f">{start_after_tokens}"
    layers = "+".join(str(item) for item in (layer, *also))
    return f"L{layers}x{multiplier:g}{start}" + ("" if stop_after_tokens is None else f"@{stop_after_tokens}")


def window_words(start_after_tokens: int | None, stop_after_tokens: int | None) -> str:
    """A candidate's answer window as the build summary and plot legend write it after layer and
    strength: ``", from token 4, first 64 tokens"``, one part per rule it has (empty for neither)."""
    start = "" if start_after_tokens is None else f", from token {start_after_tokens}"
    return start + ("" if stop_after_tokens is None else f", first {stop_after_tokens} tokens")


def default_layers(num_layers: int, step: int = 2) -> list[int]:
    """The paper's candidates: from about ``num_layers / 5`` up to the last layer, every ``step``."""
    return list(range(max(1, round(num_layers / 5)), num_layers, step))


def candidates(
    layers: Sequence[int], multipliers: Sequence[float], stop_after_tokens: Sequence[int] = (), start_after_tokens: Sequence[int] = (), *, joint: bool = False
) -> list[Candidate]:
    """"No steering", then every layer × multiplier × token stop rule × delayed start (``joint``: the
    set trained jointly at all ``layers`` in place of each layer). The stop rules
    come shortest first and "to the end" last, the starts latest first and "from the prompt" last, so
    that on a complete tie the earlier candidate, which steers less, is chosen (as a tie with no
    steering goes to no steering). A start at or after a stop would steer nothing and is left out."""
    stops: list[int | None] = [*sorted(stop_after_tokens), None]
    starts: list[int | None] = [*sorted(start_after_tokens, reverse=True), None]
    steered = [(layers[0], tuple(layers[1:]))] if joint else [(layer, ()) for layer in layers]
    return [Candidate(None)] + [
        Candidate(layer, float(m), stop, start, also)
        for layer, also in steered
        for m in multipliers
        for stop in stops
        for start in starts
        if start is None or stop is None or start < stop
    ]


@dataclass
class CandidateResult:
    label: str
    layer: int | None
    multiplier: float
    strength: float | None
    follows: list[bool]
    degenerate: list[bool]
    responses: list[str]
    disqualified: bool = False
    lengths: list[int] = field(default_factory=list)  # answer lengths in tokens (absent in old checkpoints)
    stop_after_tokens: int | None = None  # the candidate's token stop rule (None: steered to the end)
    start_after_tokens: int | None = None  # the candidate's delayed start (None: steered from the prompt on)
    new_looping: int = 0  # answers that loop here but not unsteered (set by the choice)
    cured_looping: int = 0  # answers that loop unsteered but not here
    also: list[int] = field(default_factory=list)  # further layers of a jointly trained set (absent in old checkpoints)

    @property
    def score(self) -> float:
        return sum(self.follows) / len(self.follows) if self.follows else 0.0

    @property
    def fluent_score(self) -> float:
        """Share of answers that follow the instruction and do not loop."""
        return sum(ok and not bad for ok, bad in zip(self.follows, self.degenerate, strict=True)) / len(self.follows) if self.follows else 0.0

    def objective(self, name: str) -> float:
        """The score the choice maximises: ``follows`` (:attr:`score`) or ``fluent`` (:attr:`fluent_score`)."""
        return self.fluent_score if name == "fluent" else self.score

    @property
    def joint_layers(self) -> list[int] | None:
        """All layers of a jointly trained set, first layer first (None: not a set)."""
        return [self.layer, *self.also] if self.also and self.layer is not None else None

    @property
    def mean_length(self) -> float | None:
        return sum(self.lengths) / len(self.lengths) if self.lengths else None

    @property
    def n_degenerate(self) -> int:
        return sum(self.degenerate)

    def as_candidate(self) -> Candidate:
        """The candidate these results are of (its layer, multiplier, token stop rule, delayed start and joint layers)."""
        return Candidate(self.layer, self.multiplier, self.stop_after_tokens, self.start_after_tokens, tuple(self.also))


@dataclass
class TargetResult:
    """All candidates of one target and the choice (``chosen`` is a label, None = no steering)."""

    name: str
    candidates: list[CandidateResult]
    chosen: str | None = None
    rule_points: list[list[float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TargetResult:
        return cls(
            name=raw["name"],
            candidates=[CandidateResult(**item) for item in raw["candidates"]],
            chosen=raw["chosen"],
            rule_points=[list(point) for point in raw["rule_points"]],
        )

    def candidate(self, label: str) -> CandidateResult:
        return next(item for item in self.candidates if item.label == label)


@dataclass(frozen=True, kw_only=True)
class SearchSettings:
    """How layers and strengths are searched and chosen (recorded as ``search``).

    Candidates are ``layers`` (empty = :func:`default_layers`) × ``multipliers`` for difference of
    means and ``layers`` × ``token_multipliers`` for the token method, at the strength
    :func:`strength_of` gives for ``strength_base``. ``validation_prompts``: :data:`WITHOUT_INSTRUCTION`
    or :data:`WITH_INSTRUCTION_TOO`; ``keyword_sample``: keyword instructions choose once, pooled over
    that many sampled words (None: each word alone). The guards (module docstring):
    ``max_repetition``, ``allowed_degenerate`` and ``min_length_ratio``, described in the derived
    ``degeneracy_guard``; ``objective`` (:data:`OBJECTIVES`) is the score the choice maximises. ``stop_after_keyword``: keyword-inclusion entries stop steering an answer once
    it contains the word (their ``stop_after``), in validation as in evaluation; with
    ``stop_after_first_token``, token-method ones also once the pushed first token of a longer word is
    written; with ``stop_once_followed``, entries of :data:`FOLLOWED_ONCE_WRITTEN` once the string that
    satisfies their instruction is (:func:`stop_strings`). ``stop_after_tokens``:
    token counts tried as every candidate's ``stop_after_tokens`` rule besides steering to the end
    (:func:`candidates`); empty: not searched. ``start_after_tokens``: likewise, token counts tried as a
    delayed start (the answer's first K tokens written unsteered) besides steering from the prompt on.
    """

    layers: tuple[int, ...] = ()
    multipliers: tuple[float, ...] = (0.5, 1.0, 1.5)
    token_multipliers: tuple[float, ...] = (0.1, 0.2, 0.3)
    strength_base: str = "shift"
    validation_prompts: str = WITHOUT_INSTRUCTION
    keyword_sample: int | None = None
    max_repetition: float = 0.5
    allowed_degenerate: int = 0
    min_length_ratio: float = 0.5
    degeneracy_guard: str = field(init=False)
    stop_after_keyword: bool = True
    stop_after_first_token: bool = True
    stop_after_tokens: tuple[int, ...] = ()
    start_after_tokens: tuple[int, ...] = ()
    objective: str = "follows"
    stop_once_followed: bool = True

    def __post_init__(self) -> None:
        # Tuples keep the record immutable; JSON writes them as the lists it always held.
        for name, kind in (("layers", int), ("multipliers", float), ("token_multipliers", float), ("stop_after_tokens", int), ("start_after_tokens", int)):
            object.__setattr__(self, name, tuple(kind(item) for item in getattr(self, name)))
        guard = (
            f"degenerate = repetition (1 - distinct {NGRAM}-grams / {NGRAM}-grams) > {self.max_repetition}; a candidate with "
            f"more than {self.allowed_degenerate} answers that are degenerate where the unsteered answer to the same prompt is not is "
            f"disqualified, and so is one whose mean answer length is below {self.min_length_ratio} x the unsteered mean (length and constrained-response instructions excepted)"
        )
        object.__setattr__(self, "degeneracy_guard", guard)
        if self.strength_base not in STRENGTH_BASES:
            raise ValueError(f"strength_base must be one of {', '.join(STRENGTH_BASES)}, got {self.strength_base!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.validation_prompts not in VALIDATION_PROMPTS:
            raise ValueError(f"validation_prompts must be one of {VALIDATION_PROMPTS}, got {self.validation_prompts!r}")
        if not (math.isfinite(self.min_length_ratio) and 0 <= self.min_length_ratio < 1):
            raise ValueError(f"--min-length-ratio must be a number from 0 (off) up to but not including 1, got {self.min_length_ratio}")
        if self.keyword_sample is not None and self.keyword_sample < 1:
            raise ValueError(f"keyword_sample must be positive, got {self.keyword_sample}")
        if not self.multipliers or not all(math.isfinite(m) for m in self.multipliers):
            raise ValueError(f"--multipliers must be finite numbers, got {list(self.multipliers)}")
        if not self.token_multipliers or not all(math.isfinite(m) and m > 0 for m in self.token_multipliers):
            raise ValueError(f"--token-multipliers must be positive finite numbers, got {list(self.token_multipliers)}")
        for flag, counts in self.window_axes.items():
            if any(n < 1 for n in counts) or len(set(counts)) != len(counts):
                raise ValueError(f"{flag} must be distinct positive token counts, got {list(counts)}")

    @property
    def window_axes(self) -> dict[str, tuple[int, ...]]:
        """The answer-window token counts searched, by command-line flag."""
        return {"--stop-after-tokens": self.stop_after_tokens, "--start-after-tokens": self.start_after_tokens}

    @property
    def with_instruction_too(self) -> bool:
        """Whether validation also shows the instruction (``--val-with-instruction``)."""
        return self.validation_prompts == WITH_INSTRUCTION_TOO


@dataclass(frozen=True)
class Task:
    """One target to validate: its direction, its validation prompts and their chat token ids, and its
    candidates (a learned direction exists only at the layers it was trained at)."""

    target: Target
    direction: Direction
    prompts: Sequence[Prompt]
    prompt_ids: Sequence[Sequence[int]]
    candidates: Sequence[Candidate]


def strength_of(target: Target, direction: Direction, candidate: Candidate, base: str) -> float:
    """The candidate's strength ``s`` at layer ``L`` for multiplier ``m`` (``b`` = mean projection
    without the instruction, ``‖d‖`` = difference-of-means norm, ``c = b + ‖d‖`` the paper's strength):

    - ``base="paper"``: ``s = sign × m × c`` in both modes (m = 1 is the paper exactly);
    - ``base="shift"`` (default): ``project``: ``s = b + m × ‖d‖`` (sets the component to m times the
      instruction's shift past its unsteered mean; m = 1 is again the paper's c), ``add``:
      ``s = sign × m × ‖d‖`` (adds m times the mean difference). Multiplying ``c`` itself is only
      meaningful when ``b ≈ 0``; on SmolLM2 ``c`` is negative at some layers, where ``2c`` would move
      *away* from the instruction.
    """
    assert candidate.layer is not None
    layer, m = candidate.layer, candidate.multiplier
    if base == "paper":
        return float(target.sign * m * float(direction.strength[layer]))
    if base != "shift":
        raise ValueError(f"strength base must be one of {', '.join(STRENGTH_BASES)}, got {base!r}")
    if target.mode == "project":
        return float(direction.baseline[layer] + m * direction.shift[layer])
    return float(target.sign * m * float(direction.shift[layer]))


def stop_strings(target: Target, stop_after_keyword: bool, first_piece: str | None = None, stop_once_followed: bool = False) -> tuple[str, ...]:
    """An entry's ``stop_after``: a keyword-inclusion target's word (once written, the vector has done
    its job, and pushing on makes the model repeat it), when ``stop_after_keyword``; with
    ``stop_once_followed``, the strings of :data:`FOLLOWED_ONCE_WRITTEN` for its instruction; else
    nothing. ``first_piece`` (a token direction's pushed first token of a longer word, see
    :func:`vector_builder.methods.token.first_piece`) is a stop string too: the push can write only
    that piece, so the word itself might never be completed under it."""
    if target.sign < 0:
        return ()
    if stop_once_followed and target.instruction_id in FOLLOWED_ONCE_WRITTEN:
        return FOLLOWED_ONCE_WRITTEN[target.instruction_id]
    if not stop_after_keyword or target.instruction_id != "keywords:existence":
        return ()
    words = tuple(str(word) for word in target.fixed_kwargs.get("keywords", ()))
    return words + ((first_piece,) if first_piece else ())


def entry_stop_strings(target: Target, direction: Direction, settings: SearchSettings) -> tuple[str, ...]:
    """:func:`stop_strings` under ``settings`` (``stop_after_keyword``, ``stop_after_first_token``, ``stop_once_followed``)."""
    return stop_strings(target, settings.stop_after_keyword, direction.first_piece if settings.stop_after_first_token else None, settings.stop_once_followed)


def joint_scale(direction: Direction, layer: int, anchor: int) -> float:
    """How a jointly trained set scales as one: the strength at ``layer`` is the strength at its first
    layer ``anchor`` times ``shift[layer] / shift[anchor]`` (at multiplier ``m``, every layer adds
    ``m × v_layer``); 1 at the anchor itself, whatever its shift (a one-layer candidate)."""
    return 1.0 if layer == anchor else float(direction.shift[layer] / direction.shift[anchor])


def make_entries(target: Target, direction: Direction, candidate: Candidate, strength: float, stop_after: tuple[str, ...] = ()) -> list[SteeringEntry]:
    """The entries a steered ``candidate`` applies: the direction's unit vector at its layer at
    ``strength``, then one entry per further layer of a jointly trained set (``candidate.also``,
    named :func:`~lm_eval_steer.runtime.entrysets.member_name`, strength scaled by :func:`joint_scale`)."""
    assert candidate.layer is not None
    anchor = candidate.layer
    return [
        SteeringEntry(
            name=target.name if layer == anchor else member_name(target.name, layer),
            vector=direction.unit[layer].clone(),
            layer=layer,
            mode=target.mode,
            strength=strength * joint_scale(direction, layer, anchor),
            positions="all",
            stop_after=stop_after,
            stop_after_tokens=candidate.stop_after_tokens,
            start_after_tokens=candidate.start_after_tokens,
        )
        for layer in (anchor, *candidate.also)
    ]


def generate(runner: Runner, prompts: Sequence[Sequence[int]], rows: Sequence[Sequence[SteeringEntry]]) -> list[list[int]]:
    """Greedy validation answers (ids, cut at the first stop token) of ``prompts``, row ``i`` steered
    with ``rows[i]``: one ``generate`` call for the whole batch."""
    with steering(runner.model, rows, skip_first_token=runner.settings.skip_first_token, decode=runner.decode):
        return runner.continuations(prompts, runner.settings.max_new_tokens, do_sample=False)


def generate_in_batches(runner: Runner, prompts: Sequence[Sequence[int]], rows: Sequence[Sequence[SteeringEntry]], bar: tqdm | None = None) -> list[list[int]]:
    """:func:`generate`, ``runner.settings.batch_size`` prompts per call; ``bar`` (if given) advances
    by each call's prompts."""
    size = runner.settings.batch_size
    answers: list[list[int]] = []
    for start in range(0, len(prompts), size):
        answers.extend(generate(runner, prompts[start : start + size], rows[start : start + size]))
        if bar is not None:
            bar.update(len(prompts[start : start + size]))
    return answers


#: Instructions whose answer may rightly be a few words, so the length guard does not apply: IFEval's
#: constrained-response prompts ask for one of three phrases ("You should just say …").
SHORT_ANSWER_INSTRUCTIONS = frozenset({"detectable_format:constrained_response"})


def guards_length(instruction_id: str) -> bool:
    """Whether the length guard applies: not to length instructions, whose vectors shorten on purpose,
    nor to :data:`SHORT_ANSWER_INSTRUCTIONS`."""
    return not instruction_id.startswith("length_constraints:") and instruction_id not in SHORT_ANSWER_INSTRUCTIONS


def too_short(item: CandidateResult, baseline: CandidateResult, ratio: float) -> bool:
    """The length guard: mean answer length below ``ratio`` × the unsteered mean (unknown lengths pass).

    A vector can pass a checker by saying little (a word cannot be used in an answer that is not
    written), which the repetition measure does not see."""
    steered, unsteered = item.mean_length, baseline.mean_length
    return steered is not None and unsteered is not None and steered < ratio * unsteered


def looping_changes(steered: Sequence[bool], unsteered: Sequence[bool]) -> tuple[int, int]:
    """``(new, cured)``: answers that loop steered where the unsteered answer to the same prompt does
    not, and answers that loop unsteered but not steered (answer ``j`` of both answers prompt ``j``)."""
    pairs = list(zip(steered, unsteered, strict=True))
    return sum(steered and not unsteered for steered, unsteered in pairs), sum(unsteered and not steered for steered, unsteered in pairs)


def _choose(result: TargetResult, settings: SearchSettings, instruction_id: str) -> str | None:
    baseline = result.candidates[0]
    ratio = settings.min_length_ratio if guards_length(instruction_id) else 0.0
    best: tuple[float, int, int, int] | None = None
    best_label = None
    for index, item in enumerate(result.candidates[1:], 1):
        item.new_looping, item.cured_looping = looping_changes(item.degenerate, baseline.degenerate)
        item.disqualified = item.new_looping > settings.allowed_degenerate or too_short(item, baseline, ratio)
        if item.disqualified:
            continue
        key = (item.objective(settings.objective), -item.new_looping, -item.n_degenerate, -index)
        if best is None or key > best:
            best, best_label = key, item.label
    if best is None or best[0] <= baseline.objective(settings.objective):
        return None  # ties (and losses) go to no steering
    return best_label


def pool(name: str, results: Sequence[TargetResult], settings: SearchSettings, instruction_id: str) -> TargetResult:
    """One choice for many targets of one instruction (e.g. every keyword of ``keywords:existence``):
    candidate ``i``'s validation outcomes are concatenated over ``results`` (its score is the pooled
    loose accuracy, its looping answers those of every target, each against its own unsteered answer)
    and chosen like a single target. The
    pooled candidates carry no strength: each target's strength follows from its own direction."""
    if not results:
        raise ValueError(f"{name}: nothing to pool")
    labels = [[item.label for item in result.candidates] for result in results]
    if any(row != labels[0] for row in labels):
        raise ValueError(f"{name}: pooled targets were searched over different candidates")
    items = [
        CandidateResult(
            label=first.label,
            layer=first.layer,
            multiplier=first.multiplier,
            strength=None,
            follows=[ok for result in results for ok in result.candidates[index].follows],
            degenerate=[bad for result in results for bad in result.candidates[index].degenerate],
            responses=[],
            lengths=[length for result in results for length in result.candidates[index].lengths],
            stop_after_tokens=first.stop_after_tokens,
            start_after_tokens=first.start_after_tokens,
            also=list(first.also),
        )
        for index, first in enumerate(results[0].candidates)
    ]
    pooled = TargetResult(name=name, candidates=items)
    pooled.chosen = _choose(pooled, settings, instruction_id)
    return pooled


def fit_rule(result: TargetResult, prompts: Sequence[Prompt], rule_kwarg: str) -> list[list[float]]:
    """Strength rule points ``[(v, s_v)]`` at the chosen layer: for each requested value ``v`` in the
    validation kwargs, the strength of the qualified candidate (same layer) that scores best on the
    prompts requesting ``v``; ties keep the overall choice's strength."""
    chosen = result.candidate(result.chosen) if result.chosen else None
    if chosen is None:
        return []
    same_layer = [item for item in result.candidates if item.layer == chosen.layer and not item.disqualified]
    values = sorted({float(prompt.kwargs[rule_kwarg]) for prompt in prompts if rule_kwarg in prompt.kwargs})
    points = []
    for value in values:
        rows = [i for i, prompt in enumerate(prompts) if float(prompt.kwargs.get(rule_kwarg, "nan")) == value]
        # max() keeps the first best, so list the overall choice first: ties keep its strength
        ranked = sorted(same_layer, key=lambda item: item is not chosen)
        best = max(ranked, key=lambda item: sum(item.follows[i] for i in rows))
        points.append([value, float(best.strength or 0.0)])
    return points


@dataclass
class _Jobs:
    """Every generation the search needs, each once: job key → (prompt ids, steering entries), which
    targets need it, and per target its ``[candidate][prompt]`` job keys and candidate strengths."""

    rows: dict[tuple, tuple[list[int], list[SteeringEntry]]] = field(default_factory=dict)
    owners: dict[tuple, set[str]] = field(default_factory=dict)
    grid: dict[str, list[list[tuple]]] = field(default_factory=dict)
    strengths: dict[str, list[float | None]] = field(default_factory=dict)

    def add(self, task: Task, settings: SearchSettings) -> None:
        target, direction = task.target, task.direction
        stop = entry_stop_strings(target, direction, settings)
        self.strengths[target.name] = [None if c.layer is None else strength_of(target, direction, c, settings.strength_base) for c in task.candidates]
        self.grid[target.name] = []
        for candidate, strength in zip(task.candidates, self.strengths[target.name]):
            entries = [] if candidate.layer is None else make_entries(target, direction, candidate, strength, stop)
            # Two rows are the same generation when prompt, direction, layers, mode, strength and stop rules agree.
            config = None if candidate.layer is None else (target.direction, candidate.layer, candidate.also, target.mode, strength, stop, candidate.stop_after_tokens, candidate.start_after_tokens)
            row = []
            for ids in task.prompt_ids:
                key = (tuple(ids), config)
                self.rows.setdefault(key, (list(ids), entries))
                self.owners.setdefault(key, set()).add(target.name)
                row.append(key)
            self.grid[target.name].append(row)


def search(
    runner: Runner,
    tasks: Sequence[Task],
    settings: SearchSettings,
    *,
    scorer: Scorer = loose_follows,
    done: Mapping[str, TargetResult] | None = None,
    on_target_done: Callable[[TargetResult], None] | None = None,
) -> dict[str, TargetResult]:
    """Scores every task's target × candidate on its validation prompts (answers by ``runner``) and
    chooses per target.

    Targets in ``done`` (from a checkpoint) are not recomputed, only chosen again under ``settings``'
    guards (they may differ from the interrupted build's). Batches are cut from the full,
    deterministic job list, and a batch is re-run whole if any of its rows is still needed, so a
    resumed search generates every row in exactly the batch it would have had without interruption.
    """
    by_name = {task.target.name: task for task in tasks}
    results = {name: rechosen(result, settings, by_name[name].target.instruction_id) for name, result in (done or {}).items() if name in by_name}
    jobs = _Jobs()
    for task in tasks:
        jobs.add(task, settings)
    order, size = list(jobs.rows), runner.settings.batch_size
    needed = [batch for batch in (order[i : i + size] for i in range(0, len(order), size)) if any(jobs.owners[key] - set(results) for key in batch)]

    outputs: dict[tuple, list[int]] = {}
    pending = [name for name in by_name if name not in results]
    with tqdm(total=sum(len(batch) for batch in needed), desc="validation", unit="generation") as bar:
        for batch in needed:
            outputs.update(zip(batch, generate(runner, [jobs.rows[key][0] for key in batch], [jobs.rows[key][1] for key in batch])))
            bar.update(len(batch))
            for name in [name for name in pending if all(key in outputs for row in jobs.grid[name] for key in row)]:
                pending.remove(name)
                generations = [[outputs[key] for key in row] for row in jobs.grid[name]]
                results[name] = _score_target(by_name[name], jobs.strengths[name], generations, settings, scorer, runner.decode)
                if on_target_done is not None:
                    on_target_done(results[name])
    return {name: results[name] for name in by_name}


def rechosen(result: TargetResult, settings: SearchSettings, instruction_id: str) -> TargetResult:
    """``result`` (from a checkpoint) with its choice made again under ``settings``' guards."""
    result.chosen = _choose(result, settings, instruction_id)
    return result


def _score_target(
    task: Task,
    strengths: Sequence[float | None],
    generations: Sequence[Sequence[list[int]]],
    settings: SearchSettings,
    scorer: Scorer,
    decode: Callable[[list[int]], str],
) -> TargetResult:
    """Scores ``generations[candidate][prompt]`` and makes the choice (and strength rule)."""
    target, items = task.target, []
    for candidate, strength, row in zip(task.candidates, strengths, generations):
        responses = [decode(ids) for ids in row]
        items.append(
            CandidateResult(
                label=candidate.label,
                layer=candidate.layer,
                multiplier=candidate.multiplier,
                strength=strength,
                stop_after_tokens=candidate.stop_after_tokens,
                start_after_tokens=candidate.start_after_tokens,
                also=list(candidate.also),
                follows=[
                    scorer(target.instruction_id, prompt.kwargs, prompt.checker_prompt, response)
                    for prompt, response in zip(task.prompts, responses)
                ],
                degenerate=[is_degenerate(ids, settings.max_repetition) for ids in row],
                responses=responses,
                lengths=[len(ids) for ids in row],
            )
        )
    result = TargetResult(name=target.name, candidates=items)
    result.chosen = _choose(result, settings, target.instruction_id)
    if target.rule_kwarg is not None:
        result.rule_points = fit_rule(result, task.prompts, target.rule_kwarg)
    return result
