"""Layer and strength search on validation prompts.

Every target (vector-file entry) is tried at each candidate ``(layer, multiplier)`` plus "no
steering" on the same validation prompts; generations of all targets and candidates run batched
together through :func:`lm_eval_steer.runtime.hooks.steering` (one row per (prompt, candidate), each row
with its own entry). Identical generations are run once: the unsteered generation of a validation
query serves every target, and targets that share a direction and mode (the two length entries)
share their steered generations too. Outputs are scored with IFEval's loose checker.

Degeneracy guard: the paper disqualified candidates whose outputs had GPT-2 perplexity below 2.5
(repetitive text). Without GPT-2 we use a token repetition measure,
``repetition = 1 − distinct 4-grams / 4-grams`` of the generated ids; an output is degenerate when
it is at least 16 tokens long and ``repetition > max_repetition`` (default 0.5: over half of its
4-grams are repeats). A steered candidate is disqualified when it has more degenerate outputs than
the unsteered model on the same prompts (plus ``allowed_extra_degenerate``, default 0), so a small
model's own tendency to repeat does not disqualify everything.

Choice: the best qualified candidate by (score, fewer degenerate outputs, earlier in candidate
order) is chosen only if its score is strictly above "no steering"; a tie goes to no steering.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lm_eval_steer.core.degeneracy import NGRAM, is_degenerate
from lm_eval_steer.runtime.hooks import steering
from lm_eval_steer.runtime.vectorfile import SteeringEntry
from vector_builder.activations import left_pad, model_device
from vector_builder.directions import Direction
from vector_builder.prompts import Prompt, Target

Scorer = Callable[[str, Mapping[str, Any], str, str], bool]
"""``scorer(instruction_id, kwargs, prompt_with_instruction, response) -> followed``."""

@dataclass(frozen=True)
class Candidate:
    """``layer=None`` is "no steering"; otherwise the strength follows from the multiplier (:func:`strength_of`)."""

    layer: int | None
    multiplier: float = 0.0

    @property
    def label(self) -> str:
        return "none" if self.layer is None else f"L{self.layer}x{self.multiplier:g}"


def default_layers(num_layers: int, step: int = 2) -> list[int]:
    """The paper's candidates: from about ``num_layers / 5`` up to the last layer, every ``step``."""
    return list(range(max(1, round(num_layers / 5)), num_layers, step))


def candidates(layers: Sequence[int], multipliers: Sequence[float]) -> list[Candidate]:
    return [Candidate(None)] + [Candidate(layer, float(m)) for layer in layers for m in multipliers]


def ifeval_follows(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str, *, strict: bool) -> bool:
    """IFEval's strict or loose check of one instruction, exactly as the harness scores it."""
    from lm_eval_steer.core.ifeval import harness_ifeval

    utils = harness_ifeval()  # finds the offline NLTK data and seeds langdetect (deterministic scores)
    example = utils.InputExample(key=0, instruction_id_list=[instruction_id], prompt=prompt, kwargs=[dict(kwargs)])
    test = utils.test_instruction_following_strict if strict else utils.test_instruction_following_loose
    return bool(test(example, response).follow_all_instructions)


def loose_follows(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str) -> bool:
    """IFEval's loose check (the validation score)."""
    return ifeval_follows(instruction_id, kwargs, prompt, response, strict=False)


def strict_follows(instruction_id: str, kwargs: Mapping[str, Any], prompt: str, response: str) -> bool:
    """IFEval's strict check (what a learned vector's training target must pass)."""
    return ifeval_follows(instruction_id, kwargs, prompt, response, strict=True)


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

    @property
    def score(self) -> float:
        return sum(self.follows) / len(self.follows) if self.follows else 0.0

    @property
    def mean_length(self) -> float | None:
        return sum(self.lengths) / len(self.lengths) if self.lengths else None

    @property
    def n_degenerate(self) -> int:
        return sum(self.degenerate)


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


@dataclass(frozen=True)
class SearchSettings:
    max_new_tokens: int
    batch_size: int
    pad_id: int
    stop_ids: tuple[int, ...]
    skip_first_token: bool = True
    max_repetition: float = 0.5
    allowed_extra_degenerate: int = 0
    strength_base: str = "shift"
    min_length_ratio: float = 0.5
    stop_after_keyword: bool = True


STRENGTH_BASES = ("shift", "paper")


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


def stop_strings(target: Target, stop_after_keyword: bool) -> tuple[str, ...]:
    """An entry's ``stop_after``: a keyword-inclusion target's word (once written, the vector has done
    its job, and pushing on makes the model repeat it), when ``stop_after_keyword``; else nothing."""
    if not stop_after_keyword or target.instruction_id != "keywords:existence" or target.sign < 0:
        return ()
    return tuple(str(word) for word in target.fixed_kwargs.get("keywords", ()))


def make_entry(target: Target, direction: Direction, layer: int, strength: float, stop_after: tuple[str, ...] = ()) -> SteeringEntry:
    return SteeringEntry(
        name=target.name, vector=direction.unit[layer].clone(), layer=layer, mode=target.mode, strength=strength, positions="all", stop_after=stop_after
    )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    rows: Sequence[Sequence[SteeringEntry]],
    settings: SearchSettings,
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """Greedy continuations (ids, cut at the first stop token) of left-padded ``prompts``, row ``i``
    steered with ``rows[i]``: one ``generate`` call for the whole batch (``decode`` serves entries
    with ``stop_after``)."""
    ids, mask = left_pad(prompts, settings.pad_id)
    device = model_device(model)
    with steering(model, rows, skip_first_token=settings.skip_first_token, decode=decode):
        output = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            pad_token_id=settings.pad_id,
            eos_token_id=list(settings.stop_ids),
        )
    return [cut_at_stop(row, settings.stop_ids) for row in output[:, ids.shape[1] :].tolist()]


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """``ids`` up to (not including) the first stop token."""
    stop = next((i for i, token in enumerate(ids) if token in stop_ids), len(ids))
    return list(ids[:stop])


def guards_length(instruction_id: str) -> bool:
    """Whether the length guard applies: not to length instructions, whose vectors shorten on purpose."""
    return not instruction_id.startswith("length_constraints:")


def too_short(item: CandidateResult, baseline: CandidateResult, ratio: float) -> bool:
    """The length guard: mean answer length below ``ratio`` × the unsteered mean (unknown lengths pass).

    A vector can pass a checker by saying little (a word cannot be used in an answer that is not
    written), which the repetition measure does not see."""
    steered, unsteered = item.mean_length, baseline.mean_length
    return steered is not None and unsteered is not None and steered < ratio * unsteered


def _choose(result: TargetResult, settings: SearchSettings, instruction_id: str) -> str | None:
    baseline = result.candidates[0]
    limit = baseline.n_degenerate + settings.allowed_extra_degenerate
    ratio = settings.min_length_ratio if guards_length(instruction_id) else 0.0
    best: tuple[float, int, int] | None = None
    best_label = None
    for index, item in enumerate(result.candidates[1:], 1):
        item.disqualified = item.n_degenerate > limit or too_short(item, baseline, ratio)
        if item.disqualified:
            continue
        key = (item.score, -item.n_degenerate, -index)
        if best is None or key > best:
            best, best_label = key, item.label
    if best is None or best[0] <= baseline.score:
        return None  # ties (and losses) go to no steering
    return best_label


def pool(name: str, results: Sequence[TargetResult], settings: SearchSettings, instruction_id: str) -> TargetResult:
    """One choice for many targets of one instruction (e.g. every keyword of ``keywords:existence``):
    candidate ``i``'s validation outcomes are concatenated over ``results`` (its score is the pooled
    loose accuracy, its degenerate count the pooled count) and chosen like a single target. The
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


def _per_target(targets: Sequence[Target], candidate_list: Sequence[Candidate] | Mapping[str, Sequence[Candidate]]) -> dict[str, list[Candidate]]:
    return {target.name: list(candidate_list[target.name] if isinstance(candidate_list, Mapping) else candidate_list) for target in targets}


def search(
    model: nn.Module,
    targets: Sequence[Target],
    directions: Mapping[str, Direction],
    prompts: Mapping[str, Sequence[Prompt]],
    prompt_ids: Mapping[str, Sequence[Sequence[int]]],
    candidate_list: Sequence[Candidate] | Mapping[str, Sequence[Candidate]],
    settings: SearchSettings,
    *,
    decode: Callable[[list[int]], str],
    done: Mapping[str, TargetResult] | None = None,
    on_target_done: Callable[[TargetResult], None] | None = None,
    scorer: Scorer = loose_follows,
) -> dict[str, TargetResult]:
    """Scores every target × candidate on its validation prompts and chooses per target.

    ``prompts[name]`` / ``prompt_ids[name]`` are a target's validation prompts and their chat token
    ids; ``candidate_list`` is one list for every target or a list per target name (a learned
    direction exists only at the layers it was trained at). Targets in ``done`` (from a checkpoint) are not recomputed, only chosen
    again under ``settings``' guards (they may differ from the interrupted build's). Batches are cut from the full,
    deterministic job list, and a batch is re-run whole if any of its rows is still needed, so a
    resumed search generates every row in exactly the batch it would have had without interruption.
    """
    by_name = {target.name: target for target in targets}
    results = {name: rechosen(result, settings, by_name[name].instruction_id) for name, result in (done or {}).items() if name in by_name}
    jobs: dict[tuple, tuple[list[int], list[SteeringEntry]]] = {}
    owners: dict[tuple, set[str]] = {}
    grid: dict[str, list[list[tuple]]] = {}  # target -> [candidate][prompt] -> job key
    per_target = _per_target(targets, candidate_list)
    for target in targets:
        direction = directions[target.direction]
        stop = stop_strings(target, settings.stop_after_keyword)
        grid[target.name] = []
        for candidate in per_target[target.name]:
            strength = None if candidate.layer is None else strength_of(target, direction, candidate, settings.strength_base)
            entries = [] if candidate.layer is None else [make_entry(target, direction, candidate.layer, strength, stop)]
            # Two rows are the same generation when prompt, direction, layer, mode, strength and stop agree.
            config = None if candidate.layer is None else (target.direction, candidate.layer, target.mode, strength, stop)
            row = []
            for ids in prompt_ids[target.name]:
                key = (tuple(ids), config)
                jobs.setdefault(key, (list(ids), entries))
                owners.setdefault(key, set()).add(target.name)
                row.append(key)
            grid[target.name].append(row)
    order = list(jobs)
    batches = [order[i : i + settings.batch_size] for i in range(0, len(order), settings.batch_size)]
    needed = [batch for batch in batches if any(owners[key] - set(results) for key in batch)]

    outputs: dict[tuple, list[int]] = {}
    pending = [target for target in targets if target.name not in results]
    with tqdm(total=sum(len(batch) for batch in needed), desc="validation", unit="generation") as bar:
        for batch in needed:
            outputs.update(zip(batch, generate(model, [jobs[key][0] for key in batch], [jobs[key][1] for key in batch], settings, decode)))
            bar.update(len(batch))
            for target in [t for t in pending if all(key in outputs for row in grid[t.name] for key in row)]:
                pending.remove(target)
                generations = [[outputs[key] for key in row] for row in grid[target.name]]
                results[target.name] = _score_target(
                    target, directions[target.direction], prompts[target.name], per_target[target.name], generations, settings, scorer, decode
                )
                if on_target_done is not None:
                    on_target_done(results[target.name])
    return {target.name: results[target.name] for target in targets}


def rechosen(result: TargetResult, settings: SearchSettings, instruction_id: str) -> TargetResult:
    """``result`` (from a checkpoint) with its choice made again under ``settings``' guards."""
    result.chosen = _choose(result, settings, instruction_id)
    return result


def _score_target(
    target: Target,
    direction: Direction,
    prompts: Sequence[Prompt],
    candidate_list: Sequence[Candidate],
    generations: Sequence[Sequence[list[int]]],
    settings: SearchSettings,
    scorer: Scorer,
    decode: Callable[[list[int]], str],
) -> TargetResult:
    """Scores ``generations[candidate][prompt]`` and makes the choice (and strength rule)."""
    items = []
    for candidate, row in zip(candidate_list, generations):
        responses = [decode(ids) for ids in row]
        items.append(
            CandidateResult(
                label=candidate.label,
                layer=candidate.layer,
                multiplier=candidate.multiplier,
                strength=None if candidate.layer is None else strength_of(target, direction, candidate, settings.strength_base),
                follows=[
                    scorer(target.instruction_id, prompt.kwargs, prompt.checker_prompt, response)
                    for prompt, response in zip(prompts, responses)
                ],
                degenerate=[is_degenerate(ids, settings.max_repetition) for ids in row],
                responses=responses,
                lengths=[len(ids) for ids in row],
            )
        )
    result = TargetResult(name=target.name, candidates=items)
    result.chosen = _choose(result, settings, target.instruction_id)
    if target.rule_kwarg is not None:
        result.rule_points = fit_rule(result, prompts, target.rule_kwarg)
    return result
