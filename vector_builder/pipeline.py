"""The whole build: prompts → activations → directions → search → vector file, report and plot."""

from __future__ import annotations

import json
import random
import resource
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from lm_eval_steer.hooks import find_decoder_layers, text_config
from lm_eval_steer.vectorfile import AppliesTo, SteeringEntry, StrengthRule, VectorFile, save_vector_file
from vector_builder import activations, learned_directions, methods, prompts, report, search, targets
from vector_builder.directions import Direction, build_direction
from vector_builder.learned import TrainingSettings
from vector_builder.learned_directions import LearnedDirection, LearnedSettings

BUILDER_VERSION = 1


class ModelMismatchError(ValueError):
    """The model used for the search cannot take vectors of the build model."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden_size: int
    num_layers: int

    @classmethod
    def of(cls, model: nn.Module, name: str) -> ModelShape:
        return cls(name, int(text_config(model).hidden_size), len(find_decoder_layers(model)))


def check_compatible(built_on: ModelShape, applied_to: ModelShape) -> None:
    """Vectors move between models of one shape (an instruct model and its base model): a different
    hidden size or layer count is an error, a different name only a warning."""
    if (built_on.hidden_size, built_on.num_layers) != (applied_to.hidden_size, applied_to.num_layers):
        raise ModelMismatchError(
            f"vectors built on {built_on.name!r} (hidden size {built_on.hidden_size}, {built_on.num_layers} layers) "
            f"cannot steer {applied_to.name!r} (hidden size {applied_to.hidden_size}, {applied_to.num_layers} layers)"
        )
    if built_on.name != applied_to.name:
        warnings.warn(f"vectors built on {built_on.name!r} are applied to a different model, {applied_to.name!r}", stacklevel=2)


@dataclass(frozen=True)
class BuildResult:
    vector_file: VectorFile | None  # None when no entry beat "no steering" on validation
    report_path: Path
    plot_path: Path
    results: dict[str, search.TargetResult]  # per searched target, then one per pooled keyword instruction
    pooled: dict[str, list[str]]  # keyword instruction id -> the sampled targets its choice was pooled over
    methods: dict[str, str | None]  # entry name -> the method whose candidate won (None: no steering)
    training_plot_path: Path | None = None


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    # Chat models end a turn with a special token that may differ from eos (e.g. <|im_end|>, <|eot_id|>).
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token) if token in tokenizer.get_vocab() else None
        if isinstance(token_id, int):
            ids.add(token_id)
    return tuple(sorted(i for i in ids if i is not None))


def _collect_sums(
    model: nn.Module, tokenizer: Any, specs: Sequence[prompts.DirectionSpec], train: Sequence[str], seed: int, batch_size: int, pad_id: int
) -> dict[str, tuple[activations.RunningSum, activations.RunningSum]]:
    groups: dict[str, list[list[int]]] = {}
    for spec in specs:
        pairs = prompts.training_pairs(spec, train, seed)
        groups[f"with:{spec.key}"] = [prompts.chat_ids(tokenizer, text) for text, _ in pairs]
        groups[f"without:{spec.key}"] = [prompts.chat_ids(tokenizer, text) for _, text in pairs]
    sums = activations.collect(model, groups, batch_size=batch_size, pad_id=pad_id, desc="train activations")
    return {spec.key: (sums[f"with:{spec.key}"], sums[f"without:{spec.key}"]) for spec in specs}


def _entry(target: prompts.Target, direction: Direction, layer: int, strength: float, rule_points: Sequence[Sequence[float]] = ()) -> SteeringEntry:
    rule = StrengthRule(target.rule_kwarg, tuple((x, s) for x, s in rule_points)) if target.rule_kwarg and rule_points else None
    applies_to = AppliesTo(target.instruction_id, dict(target.fixed_kwargs), rule)
    return replace(search.make_entry(target, direction, layer, strength), applies_to=applies_to)


def _chosen_entry(target: prompts.Target, direction: Direction, result: search.TargetResult) -> SteeringEntry | None:
    if result.chosen is None:
        return None
    chosen = result.candidate(result.chosen)
    assert chosen.layer is not None and chosen.strength is not None
    return _entry(target, direction, chosen.layer, chosen.strength, result.rule_points)


def _pooled_entry(target: prompts.Target, direction: Direction, pooled: search.TargetResult, strength_base: str) -> SteeringEntry | None:
    """The pooled choice's layer and multiplier, at the strength of this target's own direction."""
    if pooled.chosen is None:
        return None
    chosen = pooled.candidate(pooled.chosen)
    assert chosen.layer is not None
    candidate = search.Candidate(chosen.layer, chosen.multiplier)
    return _entry(target, direction, chosen.layer, search.strength_of(target, direction, candidate, strength_base))


def _pooling_plan(targets: Sequence[prompts.Target], per_instruction: int | None, seed: int) -> dict[str, list[prompts.Target]]:
    """Keyword instruction id → the targets (words) validated for its pooled choice: a seeded sample
    of ``per_instruction`` words (all of them when there are fewer). Empty without pooling."""
    if per_instruction is None:
        return {}
    if per_instruction < 1:
        raise ValueError(f"keyword_sample must be positive, got {per_instruction}")
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
        return "no steering: every steered candidate was disqualified as degenerate; entry left out"
    return "no steering: no candidate beat the unsteered model on validation (ties go to no steering); entry left out"


def default_learned_settings(num_layers: int, seed: int) -> LearnedSettings:
    """One learned layer at about ``num_layers / 5`` (layer 6 of SmolLM2's 30, where learned vectors
    worked in our measurements; later layers needed far more steps)."""
    return LearnedSettings(layers=(max(1, round(num_layers / 5)),), training=TrainingSettings(seed=seed))


def _method_metadata(entries: Sequence[SteeringEntry], winners: Mapping[str, str | None], learned: Mapping[str, LearnedDirection]) -> dict[str, str]:
    """Vector-file metadata: which method made each entry, and the learned directions' targets and
    loss curves (the hyper-parameters are in ``builder``)."""
    written = {entry.name for entry in entries}
    return {
        "methods": json.dumps({name: method for name, method in winners.items() if name in written}, sort_keys=True),
        **({"learned": json.dumps({key: item.summary() for key, item in learned.items()}, sort_keys=True)} if learned else {}),
    }


def _learn(
    model: nn.Module,
    tokenizer: Any,
    specs: Sequence[prompts.DirectionSpec],
    train: Sequence[str],
    learned: LearnedSettings,
    checkpoint: report.Checkpoint,
    *,
    resume: bool,
    batch_size: int,
    pad_id: int,
    seed: int,
    skip_first_token: bool,
) -> dict[str, LearnedDirection]:
    """The learned method's stage: targets and training per direction, checkpointed per direction."""
    target_settings = targets.TargetSettings(
        max_new_tokens=learned.max_target_tokens,
        batch_size=batch_size,
        pad_id=pad_id,
        stop_ids=_stop_ids(tokenizer),
        samples=learned.samples,
        temperature=learned.temperature,
        seed=seed,
    )
    shape = (len(find_decoder_layers(model)), int(text_config(model).hidden_size))
    done = checkpoint.load_learned() if resume else {}
    for key, item in done.items():  # rebuilt from the checkpointed vectors
        item.direction = learned_directions.as_direction(learned_directions.learned_key(key), item.trained, *shape, count=sum(item.sources.values())) if item.trained else None
    return learned_directions.learn_all(
        model, tokenizer, specs, train, learned, target_settings, skip_first_token=skip_first_token, done=done, on_done=checkpoint.save_learned
    )


def _method_targets(
    searched: Sequence[prompts.Target], method_names: Sequence[str], learned: Mapping[str, LearnedDirection], candidate_lists: Mapping[str, list[search.Candidate]]
) -> tuple[list[prompts.Target], dict[str, list[search.Candidate]]]:
    """The targets to search under each method (a learned twin only where its direction was trained)
    and each one's candidates."""
    out, per_target = [], {}
    for method in method_names:
        for target in searched:
            if method == "learned" and learned[target.direction].direction is None:
                continue
            twin = methods.targets_for(target, method)
            out.append(twin)
            per_target[twin.name] = candidate_lists[method]
    return out, per_target


def _winning_entries(
    targets_: Sequence[prompts.Target],
    method_names: Sequence[str],
    directions: Mapping[str, Direction],
    results: Mapping[str, search.TargetResult],
    pooled: Mapping[tuple[str, str], search.TargetResult],
    strength_base: str,
) -> tuple[list[SteeringEntry], dict[str, str | None]]:
    """Per base target, the entry of the method that won on validation (named like the base target)."""
    entries, winners = [], {}
    for target in targets_:
        twins = {method: methods.targets_for(target, method) for method in method_names}
        twins = {method: twin for method, twin in twins.items() if twin.direction in directions}
        if target.instruction_id in {instruction_id for instruction_id, _ in pooled}:
            outcomes = {method: pooled[(target.instruction_id, method)] for method in twins if (target.instruction_id, method) in pooled}
        else:
            outcomes = {method: results[twin.name] for method, twin in twins.items() if twin.name in results}
        winner = methods.pick(outcomes)
        winners[target.name] = winner
        if winner is None:
            continue
        twin = twins[winner]
        if target.instruction_id in {instruction_id for instruction_id, _ in pooled}:
            entry = _pooled_entry(twin, directions[twin.direction], outcomes[winner], strength_base)
        else:
            entry = _chosen_entry(twin, directions[twin.direction], outcomes[winner])
        if entry is not None:
            entries.append(replace(entry, name=target.name))
    return entries, winners


def build(
    model: nn.Module,
    tokenizer: Any,
    *,
    instructions: Sequence[str],
    out: str | Path,
    report_dir: str | Path,
    model_name: str,
    queries: Sequence[str] | None = None,
    keywords: Sequence[str] = (),
    n_train: int = 64,
    n_val: int = 8,
    layers: Sequence[int] | None = None,
    multipliers: Sequence[float] = (0.5, 1.0, 1.5),
    batch_size: int = 8,
    seed: int = 0,
    resume: bool = False,
    max_new_tokens: int = 128,
    max_repetition: float = 0.5,
    allowed_degenerate: int = 0,
    val_with_instruction: bool = False,
    skip_first_token: bool = True,
    strength_base: str = "shift",
    keyword_sample: int | None = None,
    search_model: nn.Module | None = None,
    search_model_name: str | None = None,
    scorer: search.Scorer = search.loose_follows,
    method: str = "both",
    learned: LearnedSettings | None = None,
    learned_multipliers: Sequence[float] = (1.0,),
) -> BuildResult:
    """Builds steering vectors for ``instructions`` (groups or IFEval ids) and writes the vector file
    ``out`` plus ``report.json``, ``scores.png`` and a checkpoint under ``report_dir``.

    ``search_model`` (default: ``model``) is the model the layers and strengths are chosen on, e.g.
    the base model when the vectors come from its instruct variant (same shape required).
    ``keyword_sample=N`` chooses one layer and multiplier per keyword instruction on the pooled
    validation of N sampled words and gives every word that choice (at its own direction's
    strength): the paper chose one keyword layer, and a search per word costs a validation run per
    word. Without it every word is searched on its own.
    ``resume=True`` continues from the checkpoint of an interrupted build with the same settings and
    writes the same file an uninterrupted build would.
    ``method`` is ``diffmean``, ``learned`` or ``both`` (:mod:`vector_builder.methods`); ``learned``
    holds the learned method's settings (default: :func:`default_learned_settings`), and its
    candidates are ``learned.layers × learned_multipliers``.
    """
    started = time.perf_counter()
    shape = ModelShape.of(model, model_name)
    target_model = search_model if search_model is not None else model
    target_shape = ModelShape.of(target_model, search_model_name or model_name)
    check_compatible(shape, target_shape)
    instruction_ids = prompts.expand_instructions(instructions)
    specs, targets = prompts.plan(instruction_ids, keywords)
    query_list = list(queries) if queries is not None else prompts.load_queries()
    train, val = prompts.split_queries(query_list, n_train, n_val, seed)
    layer_list = list(layers) if layers is not None else search.default_layers(shape.num_layers)
    bad = [layer for layer in layer_list if not 0 <= layer < shape.num_layers]
    if bad or not layer_list:
        raise ValueError(f"--layers {bad or layer_list} out of range for a {shape.num_layers}-layer model (0..{shape.num_layers - 1})")
    if strength_base not in search.STRENGTH_BASES:
        raise ValueError(f"strength_base must be one of {', '.join(search.STRENGTH_BASES)}, got {strength_base!r}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    method_names = methods.methods_of(method)
    learned = learned if learned is not None else default_learned_settings(shape.num_layers, seed)
    bad = [layer for layer in learned.layers if not 0 <= layer < shape.num_layers]
    if "learned" in method_names and (bad or not learned.layers):
        raise ValueError(f"--learned-layers {bad or list(learned.layers)} out of range for a {shape.num_layers}-layer model (0..{shape.num_layers - 1})")
    settings = {
        "builder_version": BUILDER_VERSION,
        "model": model_name,
        "search_model": target_shape.name,
        "instructions": instruction_ids,
        "keywords": list(keywords),
        "n_train": n_train,
        "n_val": n_val,
        "layers": layer_list,
        "multipliers": [float(m) for m in multipliers],
        "batch_size": batch_size,  # batch composition changes float rounding, so it is part of the result
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "max_repetition": max_repetition,
        "allowed_degenerate": allowed_degenerate,
        "skip_first_token": skip_first_token,
        "strength_base": strength_base,
        "keyword_sample": keyword_sample,
        "validation_prompts": "without and with instruction" if val_with_instruction else "without instruction",
        "degeneracy_guard": (
            f"degenerate = repetition (1 - distinct {search.NGRAM}-grams / {search.NGRAM}-grams) > {max_repetition}; a candidate with "
            f"more than (unsteered count + {allowed_degenerate}) degenerate outputs is disqualified"
        ),
        "data_sha256": prompts.data_hash(query_list, keywords),
        "method": method,
    }
    if "learned" in method_names:
        settings["learned"] = {**learned.to_json(), "multipliers": [float(m) for m in learned_multipliers]}
    checkpoint = report.Checkpoint(report_dir, settings, resume)

    stage = time.perf_counter()
    directions: dict[str, Direction] = {}
    if "diffmean" in method_names:
        sums = checkpoint.load_sums() if resume else None
        if sums is None:
            sums = _collect_sums(model, tokenizer, specs, train, seed, batch_size, pad_id)
            checkpoint.save_sums(sums)
        directions = {key: build_direction(key, with_sum, without_sum) for key, (with_sum, without_sum) in sums.items()}
    activation_seconds = time.perf_counter() - stage

    stage = time.perf_counter()
    learned_by_key: dict[str, LearnedDirection] = {}
    if "learned" in method_names:
        learned_by_key = _learn(
            model, tokenizer, specs, train, learned, checkpoint, resume=resume, batch_size=batch_size, pad_id=pad_id, seed=seed, skip_first_token=skip_first_token
        )
        directions.update({item.direction.key: item.direction for item in learned_by_key.values() if item.direction is not None})
    learning_seconds = time.perf_counter() - stage

    stage = time.perf_counter()
    pooling = _pooling_plan(targets, keyword_sample, seed)
    sampled = {target.name for group in pooling.values() for target in group}
    searched = [target for target in targets if target.instruction_id not in pooling or target.name in sampled]
    candidate_lists = {"diffmean": search.candidates(layer_list, multipliers), "learned": search.candidates(learned.layers, learned_multipliers)}
    searched, per_target = _method_targets(searched, method_names, learned_by_key, candidate_lists)
    # A learned twin is validated on exactly its base target's prompts (same seed string).
    val_prompts = {target.name: prompts.validation_prompts(target, val, seed, val_with_instruction) for target in searched}
    val_ids = {name: [prompts.chat_ids(tokenizer, p.text) for p in items] for name, items in val_prompts.items()}
    generation = search.SearchSettings(
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        pad_id=pad_id,
        stop_ids=_stop_ids(tokenizer),
        skip_first_token=skip_first_token,
        max_repetition=max_repetition,
        allowed_extra_degenerate=allowed_degenerate,
        strength_base=strength_base,
    )
    decode: Callable[[list[int]], str] = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    results = search.search(
        target_model,
        searched,
        directions,
        val_prompts,
        val_ids,
        per_target,
        generation,
        decode=decode,
        done=checkpoint.load_targets() if resume else None,
        on_target_done=checkpoint.save_target,
        scorer=scorer,
    )
    pooled = {
        (instruction_id, method_name): search.pool(
            f"{instruction_id} (pooled over {len(twins)} words{'' if method_name == 'diffmean' else ', ' + method_name})",
            [results[twin.name] for twin in twins],
            generation,
        )
        for instruction_id, group in pooling.items()
        for method_name in method_names
        if (twins := [methods.targets_for(t, method_name) for t in group if methods.targets_for(t, method_name).name in results])
    }
    for (instruction_id, method_name), outcome in pooled.items():
        for target in pooling[instruction_id]:  # what was applied to every word, so the report and plot show it per word too
            name = methods.targets_for(target, method_name).name
            if name in results:
                results[name] = replace(results[name], chosen=outcome.chosen)
    search_seconds = time.perf_counter() - stage

    entries, winners = _winning_entries(targets, method_names, directions, results, pooled, strength_base)
    vector_file = None
    if entries:
        vector_file = save_vector_file(
            out,
            entries,
            model=model_name,
            hidden_size=shape.hidden_size,
            num_layers=shape.num_layers,
            extra_metadata={
                "builder": json.dumps(settings, sort_keys=True),
                "data_sha256": settings["data_sha256"],
                **_method_metadata(entries, winners, learned_by_key),
            },
        )
    else:
        warnings.warn(f"no entry beat 'no steering' on validation: {out} was not written (see {report_dir}/report.json)", stacklevel=2)

    ordered = [*pooled.values(), *(results[target.name] for target in searched)]
    report_path = report.write_report(
        report_dir,
        {
            "vector_file": str(out) if vector_file is not None else None,
            "vector_file_sha256": None if vector_file is None else vector_file.sha256,
            "settings": settings,
            "directions": {
                key: {"count": d.count, "strength_c": d.strength.tolist(), "baseline_projection": d.baseline.tolist(), "shift_norm": d.shift.tolist()}
                for key, d in directions.items()
            },
            "targets": [report.target_summary(result, _note(result), n_val if result.name in results else None) for result in ordered],
            "pooled_over": {instruction_id: [target.name for target in group] for instruction_id, group in pooling.items()},
            "methods": winners,
            "learned": {key: item.summary() for key, item in learned_by_key.items()},
            "timing_seconds": {
                "activations": round(activation_seconds, 3),
                "learning": round(learning_seconds, 3),
                "search": round(search_seconds, 3),
                "total": round(time.perf_counter() - started, 3),
            },
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
    )
    plot_path = report.write_plot(report_dir, ordered)
    training_plot_path = report.write_training_plot(report_dir, learned_by_key)
    return BuildResult(
        vector_file=vector_file,
        report_path=report_path,
        plot_path=plot_path,
        results={**results, **{result.name: result for result in pooled.values()}},
        pooled={instruction_id: [target.name for target in group] for instruction_id, group in pooling.items()},
        methods=winners,
        training_plot_path=training_plot_path,
    )
