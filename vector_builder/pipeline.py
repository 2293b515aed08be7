"""The whole build, stage by stage: plan → directions (one stage per method) → layer search → entries →
vector file, report and plot. Each stage is a function of the :class:`Plan` and what the stages
before it produced, and hands the modules it calls only their own part of the settings;
:func:`build` runs the stages in order and times them."""

from __future__ import annotations

import json
import random
import resource
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from lm_eval_steer.core.atomic import check_writable, remove_leftovers
from lm_eval_steer.runtime.compatibility import ModelShape, check_compatible
from lm_eval_steer.runtime.entrysets import set_name
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, StrengthRule, VectorFile, save_vector_file
from vector_builder import activations, methods, prompts, report, search
from vector_builder.direction import Direction
from vector_builder.methods import diffmean, token
from vector_builder.methods.learned import stage
from vector_builder.methods.learned.stage import LearnedDirection
from vector_builder.runner import Runner
from vector_builder.scoring import Scorer, loose_follows
from vector_builder.settings import BuildSettings


@dataclass(frozen=True)
class BuildResult:
    vector_file: VectorFile | None  # None when no entry beat "no steering" on validation
    report_path: Path
    plot_path: Path
    results: dict[str, search.TargetResult]  # per searched target, then one per pooled keyword instruction
    pooled: dict[str, list[str]]  # keyword instruction id -> the sampled targets its choice was pooled over
    methods: dict[str, str | None]  # entry name -> the method whose candidate won (None: no steering)
    training_plot_path: Path | None = None  # loss curves of the learned vectors (None: nothing trained)


def _entries(
    target: prompts.Target,
    direction: Direction,
    candidate: search.Candidate,
    strength: float,
    settings: search.SearchSettings,
    rule_points: Sequence[Sequence[float]] = (),
) -> list[SteeringEntry]:
    """The candidate's entries (one, or one per layer of a jointly trained set), routed to the
    target's instruction; a strength rule, fitted at the first layer, scales with the set."""
    assert candidate.layer is not None
    stop = search.entry_stop_strings(target, direction, settings)
    entries = []
    for entry in search.make_entries(target, direction, candidate, strength, stop):
        scale = search.joint_scale(direction, entry.layer, candidate.layer)
        rule = StrengthRule(target.rule_kwarg, tuple((x, s * scale) for x, s in rule_points)) if target.rule_kwarg and rule_points else None
        entries.append(replace(entry, applies_to=AppliesTo(target.instruction_id, dict(target.fixed_kwargs), rule)))
    return entries


def _chosen_entries(target: prompts.Target, direction: Direction, result: search.TargetResult, settings: search.SearchSettings) -> list[SteeringEntry]:
    if result.chosen is None:
        return []
    chosen = result.candidate(result.chosen)
    assert chosen.strength is not None
    return _entries(target, direction, chosen.as_candidate(), chosen.strength, settings, result.rule_points)


def _pooled_entries(target: prompts.Target, direction: Direction, pooled: search.TargetResult, settings: search.SearchSettings) -> list[SteeringEntry]:
    """The pooled choice's layer and multiplier, at the strength of this target's own direction."""
    if pooled.chosen is None:
        return []
    candidate = pooled.candidate(pooled.chosen).as_candidate()
    assert candidate.layer is not None
    return _entries(target, direction, candidate, search.strength_of(target, direction, candidate, settings.strength_base), settings)


def _pooling_plan(targets: Sequence[prompts.Target], per_instruction: int | None, seed: int) -> dict[str, list[prompts.Target]]:
    """Keyword instruction id → the targets (words) validated for its pooled choice: a seeded sample
    of ``per_instruction`` words (all of them when there are fewer). Empty without pooling."""
    if per_instruction is None:
        return {}
    plan: dict[str, list[prompts.Target]] = {}
    for instruction_id in prompts.KEYWORD_IDS:
        group = [target for target in targets if target.instruction_id == instruction_id]
        if group:
            keep = set(random.Random(f"{seed}:pool:{instruction_id}").sample(range(len(group)), min(per_instruction, len(group))))
            plan[instruction_id] = [target for index, target in enumerate(group) if index in keep]
    return plan


def _note(result: search.TargetResult) -> str | None:
    if result.chosen is not None:
        return None
    if all(item.disqualified for item in result.candidates[1:]):
        return "no steering: every steered candidate was disqualified (degenerate or too short); entry left out"
    return "no steering: no candidate beat the unsteered model on validation (ties go to no steering); entry left out"


@dataclass(frozen=True)
class Plan:
    """What the resolved settings and the data say to do, before any model runs."""

    settings: BuildSettings
    specs: list[prompts.DirectionSpec]  # directions to train
    targets: list[prompts.Target]  # entries to choose a layer and strength for
    train: list[str]
    val: list[str]
    pooling: dict[str, list[prompts.Target]]  # keyword instruction id -> the sampled words its choice is pooled over

    @property
    def searched(self) -> list[prompts.Target]:
        """Targets validated on their own prompts: every target but the unsampled pooled words."""
        sampled = {target.name for group in self.pooling.values() for target in group}
        return [target for target in self.targets if target.instruction_id not in self.pooling or target.name in sampled]


@dataclass(frozen=True)
class Searched:
    """The search stage's outcome: a result per searched target and method (a learned twin is named
    ``<target>@learned``; pooled words show the pooled choice) and one pooled result per pooled
    keyword instruction and method."""

    targets: list[prompts.Target]  # what was searched, every method's twin of every searched target
    results: dict[str, search.TargetResult]
    pooled: dict[tuple[str, str], search.TargetResult]  # (instruction id, method) -> pooled result


def plan_build(settings: BuildSettings, queries: Sequence[str], num_layers: int) -> Plan:
    """Stage 1: resolve the settings and lay out directions, targets, the query split and pooling."""
    resolved = settings.resolved(num_layers, queries)
    seed = resolved.generation.seed
    specs, targets = prompts.plan(resolved.instructions, resolved.keywords)
    train, val = prompts.split_queries(queries, resolved.n_train, resolved.n_val, seed)
    return Plan(resolved, specs, targets, train, val, _pooling_plan(targets, resolved.search.keyword_sample, seed))


def collect_directions(runner: Runner, plan: Plan, checkpoint: report.Checkpoint, resume: bool) -> dict[str, Direction]:
    """Stage 2 (difference of means): activation running sums (from the checkpoint when resuming) ->
    one direction per spec (nothing when the build does not use the method)."""
    if "diffmean" not in plan.settings.method_names:
        return {}
    sums = checkpoint.load_sums() if resume else None
    if sums is None:
        sums = diffmean.collect_sums(runner, plan.specs, plan.train)
        checkpoint.save_sums(sums)
    return {key: diffmean.build_direction(key, with_sum, without_sum) for key, (with_sum, without_sum) in sums.items()}


def token_method_directions(runner: Runner, plan: Plan) -> dict[str, Direction]:
    """Stage 2c (token method): one output-embedding direction per keyword spec, scaled per layer by
    the residual stream's norm on the training questions (nothing when the build does not use it)."""
    if "token" not in plan.settings.method_names:
        return {}
    return token.token_directions(runner, plan.specs, plan.train)


def learn_directions(runner: Runner, plan: Plan, checkpoint: report.Checkpoint, resume: bool) -> dict[str, LearnedDirection]:
    """Stage 2b (learned method): per spec, training targets and one trained vector per learned layer,
    checkpointed per spec (nothing when the build does not use the learned method)."""
    settings = plan.settings
    if "learned" not in settings.method_names:
        return {}
    done = checkpoint.load_learned() if resume else {}
    return stage.learn_all(runner, plan.specs, plan.train, settings.learned, settings.targets, done=done, on_done=checkpoint.save_learned)


def method_targets(plan: Plan, learned: Mapping[str, LearnedDirection]) -> tuple[list[prompts.Target], dict[str, list[search.Candidate]]]:
    """Every searched target under each method (a learned twin only where its direction was trained)
    and each one's candidates: the search's ``layers`` × ``multipliers`` (token method:
    ``token_multipliers``), or the learned method's ``layers × multipliers`` (jointly trained: its
    set × ``multipliers``)."""
    settings = plan.settings
    windows = (settings.search.stop_after_tokens, settings.search.start_after_tokens)
    candidate_lists = {
        "diffmean": search.candidates(settings.search.layers, settings.search.multipliers, *windows),
        "learned": search.candidates(settings.learned.layers, settings.learned.multipliers, *windows, joint=settings.learned.joint),
        "token": search.candidates(settings.search.layers, settings.search.token_multipliers, *windows),
    }
    searched, per_target = [], {}
    for method in settings.method_names:
        for target in plan.searched:
            candidates = candidate_lists[method]
            if method == "learned":
                outcome = learned[target.direction]
                if outcome.direction is None:
                    continue  # too few training targets passed the checker
                candidates = [item for item in candidates if item.layer is None or outcome.learned_at(item.layer)]
                if len(candidates) == 1:
                    continue  # nothing learned at any layer: only "no steering" would be validated
            twin = methods.targets_for(target, method)
            searched.append(twin)
            per_target[twin.name] = candidates
    return searched, per_target


def warn_unlearned(learned: Mapping[str, LearnedDirection]) -> None:
    """One warning per learned direction that training did not move at some layer (those layers are
    not validated)."""
    for key, outcome in learned.items():
        idle = sorted(layer for layer in outcome.trained if not outcome.learned_at(layer))
        if idle:
            warnings.warn(
                f"{key}: the learned vector at layer(s) {', '.join(map(str, idle))} never lowered its held-out loss below the "
                "start (best step 0), so it is zero and is not validated; try another layer, more --n-train or --learned-lr",
                UserWarning,
                stacklevel=2,
            )


def search_layers(
    runner: Runner,
    plan: Plan,
    directions: Mapping[str, Direction],
    learned: Mapping[str, LearnedDirection],
    checkpoint: report.Checkpoint,
    resume: bool,
    scorer: Scorer,
) -> Searched:
    """Stage 3: validate every searched target (under each method) x candidate on ``runner``'s model,
    choose, and pool the sampled words. A method's twin is validated on its base target's prompts."""
    settings = plan.settings
    searched, per_target = method_targets(plan, learned)
    seed, with_instruction_too = settings.generation.seed, settings.search.with_instruction_too
    val_prompts = {target.name: prompts.validation_prompts(target, plan.val, seed, with_instruction_too) for target in plan.searched}
    val_prompts.update({twin.name: val_prompts[methods.base_name(twin.name)] for twin in searched})
    val_ids = {name: [prompts.chat_ids(runner.tokenizer, p.text) for p in items] for name, items in val_prompts.items()}
    tasks = [search.Task(twin, directions[twin.direction], val_prompts[twin.name], val_ids[twin.name], per_target[twin.name]) for twin in searched]
    done = checkpoint.load_targets() if resume else None
    results = search.search(runner, tasks, settings.search, scorer=scorer, done=done, on_target_done=checkpoint.save_target)
    return Searched(searched, results, _pool(plan, results))


def _pool(plan: Plan, results: dict[str, search.TargetResult]) -> dict[tuple[str, str], search.TargetResult]:
    """One pooled choice per keyword instruction and method; every sampled word's result then shows it."""
    pooled = {}
    for instruction_id, group in plan.pooling.items():
        for method in plan.settings.method_names:
            twins = [name for target in group if (name := methods.targets_for(target, method).name) in results]
            if not twins:
                continue
            label = f"{instruction_id} (pooled over {len(twins)} words{'' if method == 'diffmean' else ', ' + method})"
            pooled[(instruction_id, method)] = search.pool(label, [results[name] for name in twins], plan.settings.search, instruction_id)
            for name in twins:  # what was applied to every word, so the report and plot show it per word too
                results[name] = replace(results[name], chosen=pooled[(instruction_id, method)].chosen)
    return pooled


def chosen_entries(plan: Plan, directions: Mapping[str, Direction], searched: Searched) -> tuple[list[SteeringEntry], dict[str, str | None]]:
    """Stage 4: per target, the method whose choice validated best (:func:`methods.pick`) and its
    entry, named like the target (a jointly trained set: an entry per layer, the further ones named
    :func:`~lm_eval_steer.runtime.entrysets.member_name`); nothing where every method chose "no steering". Pooled words
    take their instruction's pooled choice at their own direction's strength."""
    entries, winners = [], {}
    for target in plan.targets:
        twins = {method: twin for method in plan.settings.method_names if (twin := methods.targets_for(target, method)).direction in directions}
        pooled = target.instruction_id in plan.pooling
        outcomes = {
            method: searched.pooled.get((target.instruction_id, method)) if pooled else searched.results.get(twin.name) for method, twin in twins.items()
        }
        winners[target.name] = winner = methods.pick({method: outcome for method, outcome in outcomes.items() if outcome is not None}, plan.settings.search.objective)
        if winner is None:
            continue
        twin, direction = twins[winner], directions[twins[winner].direction]
        choose = _pooled_entries if pooled else _chosen_entries
        # the twin under the target's own name, so search.make_entries names the entries (and a set's members)
        entries += choose(replace(twin, name=target.name), direction, outcomes[winner], plan.settings.search)
    return entries, winners


def method_metadata(entries: Sequence[SteeringEntry], winners: Mapping[str, str | None], learned: Mapping[str, LearnedDirection]) -> dict[str, str]:
    """Vector-file metadata beside the settings: which method made each entry, and each learned
    direction's training targets and loss curves."""
    return {
        # every entry of a jointly trained set was made by its set's method
        "methods": json.dumps({entry.name: winners.get(entry.name) or winners[set_name(entry.name)] for entry in entries}, sort_keys=True),
        **({"learned": json.dumps({key: item.summary(timing=False) for key, item in learned.items()}, sort_keys=True)} if learned else {}),
    }


def write_vectors(
    out: str | Path, entries: Sequence[SteeringEntry], settings: BuildSettings, shape: ModelShape, report_dir: str | Path, metadata: Mapping[str, str]
) -> VectorFile | None:
    """Stage 5: the vector file with the settings (and ``metadata``) in its metadata; nothing (and a
    warning) without entries."""
    if not entries:
        warnings.warn(f"no entry beat 'no steering' on validation: {out} was not written (see {report_dir}/report.json)", stacklevel=3)
        return None
    return save_vector_file(
        out,
        entries,
        model=settings.model,
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        extra_metadata={"builder": json.dumps(asdict(settings), sort_keys=True), "data_sha256": settings.data_sha256, **metadata},
    )


def ordered_results(plan: Plan, searched: Searched) -> list[search.TargetResult]:
    """Pooled results first, then each searched target: the order of the report and the plot."""
    return [*searched.pooled.values(), *(searched.results[target.name] for target in searched.targets)]


@dataclass(frozen=True)
class Built:
    """What the stages that run the model produced: every method's directions, the learned
    directions' training, the search and, per entry, the method that won."""

    directions: dict[str, Direction]
    learned: dict[str, LearnedDirection]
    searched: Searched
    winners: dict[str, str | None]


def assemble_report(plan: Plan, built: Built, out: str | Path, vector_file: VectorFile | None, timing: Mapping[str, float], device: str) -> dict[str, Any]:
    """Stage 6: ``report.json``: settings, per-layer direction statistics, every target's candidates
    and choice (per method), which method won per entry, the learned directions' targets and loss
    curves, what pooled choices were pooled over, timings, peak memory and the device they were
    measured on."""
    searched = built.searched
    return {
        "vector_file": str(out) if vector_file is not None else None,
        "vector_file_sha256": None if vector_file is None else vector_file.sha256,
        "settings": asdict(plan.settings),
        "directions": {
            key: {"count": d.count, "strength_c": d.strength.tolist(), "baseline_projection": d.baseline.tolist(), "shift_norm": d.shift.tolist()}
            for key, d in built.directions.items()
        },
        "targets": [
            report.target_summary(result, _note(result), plan.settings.n_val if result.name in searched.results else None)
            for result in ordered_results(plan, searched)
        ],
        "pooled_over": {instruction_id: [target.name for target in group] for instruction_id, group in plan.pooling.items()},
        "methods": dict(built.winners),
        "learned": {key: item.summary() for key, item in built.learned.items()},
        "timing_seconds": {key: round(seconds, 3) for key, seconds in timing.items()},
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "device": device,
    }


def check_outputs(out: str | Path, report_dir: str | Path) -> None:
    """Fails now, not after an hour of building, when the vector file or the report cannot be
    written (:class:`~lm_eval_steer.core.atomic.WriteError`); removes the temp files a killed build left."""
    for path in (out, Path(report_dir) / report.REPORT_NAME):
        check_writable(path)
    remove_leftovers(Path(out).parent, Path(out).name)


@dataclass(frozen=True, eq=False)
class Validation:
    """Where layers and strengths are chosen: ``model`` answers the validation prompts (None: the build
    model; another model needs the same shape, e.g. the base model when the vectors come from its
    instruct variant, and its name is ``settings.search_model``), ``scorer`` judges each answer."""

    model: nn.Module | None = None
    scorer: Scorer = loose_follows


@contextmanager
def _timed(timing: dict[str, float], stage_name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timing[stage_name] = time.perf_counter() - started


def build(
    model: nn.Module,
    tokenizer: Any,
    settings: BuildSettings,
    *,
    out: str | Path,
    report_dir: str | Path,
    queries: Sequence[str] | None = None,
    resume: bool = False,
    validation: Validation = Validation(),
) -> BuildResult:
    """Builds steering vectors as ``settings`` say and writes the vector file ``out`` plus
    ``report.json``, ``scores.png`` and a checkpoint under ``report_dir``.

    ``queries`` (default: the packaged questions) are the training and validation questions;
    ``validation`` says which model answers the validation prompts and how answers are scored.
    ``resume=True`` continues from the checkpoint of an interrupted build with the same settings and
    writes the same file an uninterrupted build would. ``settings.method`` decides which methods'
    directions are searched (:mod:`vector_builder.methods`); ``training.png`` shows the learned
    vectors' loss curves.
    """
    started = time.perf_counter()
    check_outputs(out, report_dir)
    shape = ModelShape.of_model(model, settings.model)
    validation_model = validation.model if validation.model is not None else model
    check_compatible(shape, ModelShape.of_model(validation_model, settings.search_model or settings.model))
    plan = plan_build(settings, list(queries) if queries is not None else prompts.load_queries(), shape.num_layers)
    checkpoint = report.Checkpoint(report_dir, asdict(plan.settings), resume)
    runner = Runner.of(model, tokenizer, plan.settings.generation)

    timing: dict[str, float] = {}
    with _timed(timing, "activations"):
        directions = {**collect_directions(runner, plan, checkpoint, resume), **token_method_directions(runner, plan)}
    with _timed(timing, "learning"):
        learned = learn_directions(runner, plan, checkpoint, resume)
        warn_unlearned(learned)
        directions.update({item.direction.key: item.direction for item in learned.values() if item.direction is not None})
    with _timed(timing, "search"):
        searched = search_layers(replace(runner, model=validation_model), plan, directions, learned, checkpoint, resume, validation.scorer)

    entries, winners = chosen_entries(plan, directions, searched)
    vector_file = write_vectors(out, entries, plan.settings, shape, report_dir, method_metadata(entries, winners, learned))
    timing["total"] = time.perf_counter() - started
    built = Built(directions, learned, searched, winners)
    report_path = report.write_report(report_dir, assemble_report(plan, built, out, vector_file, timing, str(activations.model_device(model))))
    return BuildResult(
        vector_file=vector_file,
        report_path=report_path,
        plot_path=report.write_plot(report_dir, ordered_results(plan, searched), plan.settings.search.objective),
        results={**searched.results, **{result.name: result for result in searched.pooled.values()}},
        pooled={instruction_id: [target.name for target in group] for instruction_id, group in plan.pooling.items()},
        methods=winners,
        training_plot_path=report.write_training_plot(report_dir, learned, plan.settings.learned.fluency),
    )
