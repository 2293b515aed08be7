"""``lm-eval-steer validate``: vector files side by side on validation questions a build did not use.

A build chooses each entry on ``--n-val`` questions (8 by default; 16 answers with
``--val-with-instruction``), which decides coarsely: one answer more or less changes the choice. This
command answers the questions that *follow* the build's validation questions in the same split (so
no build with those ``--n-train`` / ``--n-val`` / ``--seed`` saw them), without and with the
instruction, greedily at the evaluation's length, once unsteered and once per candidate file, each
candidate's entries routed to the instruction exactly as ``steered-hf`` routes them (``route=auto``;
``FILE*M`` scales their strengths as the ``scale=`` model argument does). Per candidate it reports
passes (IFEval's loose checker), fluent passes (passes whose answer does not loop) and answers that
loop where the unsteered answer to the same prompt does not (``new_looping``) or the reverse
(``cured_looping``); the JSON keeps every prompt and answer. ``--against LABEL`` judges every other candidate
against that one by :func:`shipping_problems`. For a keyword instruction, ``--keywords`` gives the
words, which the questions take in turn, each answer scored for its word and steered by that word's entry.

    lm-eval-steer validate --model_args $M --instruction startend:quotation --against packaged \\
      packaged=smollm2-135m-instruct "joint x0.75=build.safetensors*0.75" --out quotation.json
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tqdm.auto import tqdm

from lm_eval_steer.core.atomic import check_writable, write_json
from lm_eval_steer.core.console import fail
from lm_eval_steer.core.degeneracy import is_degenerate
from lm_eval_steer.core.errors import UserError
from lm_eval_steer.core.ifeval import instruction_ids
from lm_eval_steer.core.paths import resolve_vectors
from lm_eval_steer.runtime.compatibility import ModelShape, check_compatible
from lm_eval_steer.runtime.routing import Overrides, entries_for_document
from lm_eval_steer.runtime.vectorfile import ScaleError, SteeringEntry, VectorFile, load_vector_file, split_scale
from vector_builder import prompts
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.scoring import Scorer, loose_follows
from vector_builder.search import generate_in_batches, looping_changes

MIXED = "mixed"  # --paired-with mixed: every instruction that can share a prompt with the target
REPEAT_PROMPT = "combination:repeat_prompt"


class CandidateError(UserError, ValueError):
    """A candidate argument that cannot be used (its text, its file, or no entry for the instruction)."""


@dataclass(frozen=True)
class Candidate:
    """``label=file[*scale]`` from the command line, its file loaded."""

    label: str
    scale: float
    vectors: VectorFile


@dataclass(frozen=True)
class Outcome:
    """One candidate's answers to the untold prompts, then the told ones, and how they score."""

    label: str
    follows: list[bool]
    loops: list[bool]
    texts: list[str]

    def counts(self, unsteered_loops: Sequence[bool]) -> dict[str, int]:
        """Passes and fluent passes, untold and told; looping answers, new and cured against ``unsteered_loops``."""
        half = len(self.follows) // 2
        fluent = [follows and not loops for follows, loops in zip(self.follows, self.loops)]
        new, cured = looping_changes(self.loops, unsteered_loops)
        return {
            "passes_untold": sum(self.follows[:half]),
            "passes_told": sum(self.follows[half:]),
            "fluent_untold": sum(fluent[:half]),
            "fluent_told": sum(fluent[half:]),
            "looping": sum(self.loops),
            "new_looping": new,
            "cured_looping": cured,
        }


def parse_candidate(text: str) -> tuple[str, str, float]:
    """``label=file[*scale]`` → ``(label, file, scale)``; the scale a finite positive number (default 1)."""
    label, separator, source = text.partition("=")
    if not separator or not label.strip() or not source.strip():
        raise CandidateError(f"candidate {text!r}: expected LABEL=FILE or LABEL=FILE*SCALE")
    try:
        path, scale = split_scale(source)
    except ScaleError as error:
        raise CandidateError(f"candidate {text!r}: {error}") from None
    if scale is None and "*" in source:
        raise CandidateError(f"candidate {text!r}: scale {source.rpartition('*')[2]!r} is not a number")
    if not path:
        raise CandidateError(f"candidate {text!r}: expected LABEL=FILE*SCALE")
    if label.strip() == "unsteered":
        raise CandidateError(f"candidate {text!r}: the label 'unsteered' is taken by the unsteered answers")
    return label.strip(), path, 1.0 if scale is None else scale


def load_candidate(text: str, instruction_id: str) -> Candidate:
    """The candidate's file (a path or a packaged name), checked to route at least one entry to
    ``instruction_id``; whether it fits the model is checked once the model has loaded."""
    label, spec, scale = parse_candidate(text)
    path = resolve_vectors(spec, "")
    vectors = load_vector_file(path)
    if not any(entry.applies_to is None or entry.applies_to.instruction_id == instruction_id for entry in vectors.entries):
        raise CandidateError(f"{path}: no entry is routed to {instruction_id}")
    return Candidate(label, scale, vectors)


def questions_after_build(queries: Sequence[str], n_train: int, n_val: int, count: int, seed: int) -> list[str]:
    """The ``count`` questions that follow a build's ``n_val`` validation questions in its split
    (:func:`~vector_builder.prompts.split_queries` with the same ``n_train`` and ``seed``)."""
    _, validation = prompts.split_queries(queries, n_train, n_val + count, seed)
    return validation[n_val:]


@dataclass(frozen=True)
class Check:
    """One validation prompt: the text the model is shown, the instructions its answer must follow
    (id and kwargs, as an IFEval document lists them) and the full prompt their checkers read."""

    text: str
    instructions: tuple[tuple[str, Mapping[str, Any]], ...]
    checker_prompt: str

    @classmethod
    def of(cls, instruction_id: str, item: prompts.Prompt) -> Check:
        return cls(item.text, ((instruction_id, item.kwargs),), item.checker_prompt)


def checks_for(targets: Sequence[prompts.Target], questions: Sequence[str], seed: int, paired_with: Sequence[str] = ()) -> list[Check]:
    """The build's validation prompts for ``questions``, untold then told. Question ``i`` is asked for
    ``targets[i % len(targets)]`` (a keyword instruction has one target per word, so the words take
    turns), worded as the build words it for that target. With ``paired_with``, question ``i`` also
    asks ``paired_with[i % len(paired_with)]`` (its sentence appended after the target's, shown untold
    too, drawn once per question) and passes only when both hold, as a two-instruction IFEval prompt does."""
    per_target = [prompts.validation_prompts(target, questions, seed, also_with_instruction=True) for target in targets]
    count = len(questions)
    items = [per_target[i % len(targets)][i] for i in range(count)] + [per_target[i % len(targets)][count + i] for i in range(count)]
    instruction_id = targets[0].instruction_id
    if not paired_with:
        return [Check.of(instruction_id, item) for item in items]
    checks = []
    for index, item in enumerate(items):
        question = index % count  # the untold and the told prompt of a question share their second instruction
        second = paired_with[question % len(paired_with)]
        # IFEval's repeat-the-request instruction quotes the request the model is shown.
        fixed = {"prompt_to_repeat": item.text} if second == REPEAT_PROMPT else {}
        text, kwargs = prompts.describe(second, fixed, f"{seed}:val:paired:{second}:{question}")
        checks.append(
            Check(
                prompts.with_instruction(item.text, text),
                ((instruction_id, item.kwargs), (second, kwargs)),
                prompts.with_instruction(item.checker_prompt, text),
            )
        )
    return checks


def paired_instructions(target: prompts.Target, spec: str) -> list[str]:
    """``--paired-with``, checked: ``mixed`` (every IFEval id that can share a prompt with the target,
    sorted, so that the questions take them in turn as IFEval's own prompts mix instructions) or
    comma-separated ids, each other than the target's and not listed by IFEval as conflicting with it
    (a lowercase answer cannot also be in capitals)."""
    from lm_eval.tasks.ifeval.instructions_registry import INSTRUCTION_CONFLICTS  # after the registry's offline setup

    excluded = INSTRUCTION_CONFLICTS.get(target.instruction_id, set()) | {target.instruction_id}
    if spec.strip() == MIXED:
        return sorted(set(prompts.instruction_registry()) - excluded)
    ids = instruction_ids(spec, "--paired-with")  # each one known to IFEval's registry, duplicates merged
    given = [part for part in spec.split(",") if part.strip()]
    if not ids:
        raise CandidateError(f"--paired-with {spec!r}: give IFEval instruction ids separated by commas, or {MIXED!r}")
    if len(ids) < len(given):
        raise CandidateError(f"--paired-with {spec!r}: an instruction is given twice")
    for paired_with in ids:
        if paired_with in excluded:
            raise CandidateError(f"--paired-with {paired_with}: conflicts with --instruction {target.instruction_id} (IFEval never asks both)")
    return list(ids)


def rows_for(candidate: Candidate | None, checks: Sequence[Check]) -> list[tuple[SteeringEntry, ...]]:
    """Per prompt, the entries ``steered-hf`` would apply to an IFEval document with the prompt's
    instructions and kwargs (none for the unsteered answers)."""
    if candidate is None:
        return [() for _ in checks]
    overrides = Overrides(scale=candidate.scale)
    documents = [{"instruction_id_list": [i for i, _ in check.instructions], "kwargs": [dict(k) for _, k in check.instructions]} for check in checks]
    return [entries_for_document(document, [candidate.vectors], "auto", overrides) for document in documents]


def targets_for(instruction_id: str, keywords: Sequence[str] = ()) -> list[prompts.Target]:
    """The build's targets for ``instruction_id``, whose validation prompts are answered: one, or for a
    keyword instruction one per word of ``keywords`` (required there, refused elsewhere)."""
    if instruction_id not in prompts.instruction_registry():
        raise CandidateError(f"--instruction {instruction_id!r}: not an IFEval instruction id")
    if instruction_id not in prompts.KEYWORD_IDS and keywords:
        raise CandidateError(f"--keywords: only for the keyword instructions ({', '.join(sorted(prompts.KEYWORD_IDS))}), not {instruction_id}")
    if instruction_id in prompts.KEYWORD_IDS and not keywords:
        raise CandidateError(f"--instruction {instruction_id}: give the words to ask for with --keywords word1,word2 or a file with one word per line")
    _, targets = prompts.plan([instruction_id], keywords)
    return targets


def validate(runner: Runner, checks: Sequence[Check], candidates: Sequence[Candidate], scorer: Scorer = loose_follows) -> list[Outcome]:
    """The unsteered answers (label ``unsteered``), then each candidate's, to ``checks`` (from
    :func:`checks_for`: the questions without and then with the instruction)."""
    ids = [prompts.chat_ids(runner.tokenizer, check.text) for check in checks]
    outcomes = []
    runs = [("unsteered", None), *((c.label, c) for c in candidates)]
    # Each run takes minutes on a CPU; the bar counts answers over all of them.
    with tqdm(total=len(runs) * len(ids), desc="validate", unit="answer") as bar:
        for label, candidate in runs:
            bar.set_postfix_str(label)
            answers = generate_in_batches(runner, ids, rows_for(candidate, checks), bar)
            texts = [runner.decode(tokens) for tokens in answers]
            follows = [all(scorer(i, kwargs, check.checker_prompt, text) for i, kwargs in check.instructions) for check, text in zip(checks, texts)]
            outcomes.append(Outcome(label, follows, [is_degenerate(tokens) for tokens in answers], texts))
    return outcomes


def shipping_problems(candidate: Mapping[str, int], reference: Mapping[str, int]) -> list[str]:
    """Why ``candidate`` should not replace ``reference`` (both :meth:`Outcome.counts`); empty when it should.

    The rule: more fluent passes (untold + told), no more new looping answers, and no fewer told
    passes (a vector that helps the untold model must not cost the told one).
    """
    problems = []
    fluent, reference_fluent = candidate["fluent_untold"] + candidate["fluent_told"], reference["fluent_untold"] + reference["fluent_told"]
    if fluent <= reference_fluent:
        problems.append(f"fluent passes {fluent} not above {reference_fluent}")
    if candidate["new_looping"] > reference["new_looping"]:
        problems.append(f"new looping {candidate['new_looping']} above {reference['new_looping']}")
    if candidate["passes_told"] < reference["passes_told"]:
        problems.append(f"told passes {candidate['passes_told']} below {reference['passes_told']}")
    return problems


def verdicts(outcomes: Sequence[Outcome], against: str) -> dict[str, list[str]]:
    """Per candidate other than ``against`` (and the unsteered answers): :func:`shipping_problems` against it."""
    unsteered = outcomes[0].loops
    counts = {outcome.label: outcome.counts(unsteered) for outcome in outcomes[1:]}
    return {label: shipping_problems(c, counts[against]) for label, c in counts.items() if label != against}


def summary_table(candidates: Sequence[Mapping[str, Any]], against: str | None = None) -> str:
    """One Markdown row per candidate of :func:`report`: passes, fluent passes (untold + told), looping
    answers, and with ``against`` whether each other candidate should replace that one
    (:func:`shipping_problems`), as the report judged it."""
    header = "| candidate | passes untold + told | fluent passes | looping answers | new looping | cured looping |"
    lines = [header + (f" replaces {against}? |" if against else ""), "|---|---|---|---|---|---|" + ("---|" if against else "")]
    for candidate in candidates:
        c = candidate["counts"]
        row = (
            f"| {candidate['label']} | {c['passes_untold']} + {c['passes_told']} | {c['fluent_untold']} + {c['fluent_told']} | "
            f"{c['looping']} of {len(candidate['loops'])} | {c['new_looping']} | {c['cured_looping']} |"
        )
        if against:
            verdict = candidate.get("replaces")
            row += " — |" if verdict is None else (" yes |" if verdict["yes"] else f" no: {'; '.join(verdict['problems'])} |")
        lines.append(row)
    return "\n".join(lines)


def report(outcomes: Sequence[Outcome], checks: Sequence[Check], settings: Mapping[str, object], against: str | None = None) -> dict[str, Any]:
    """The JSON ``--out`` holds: the settings, every prompt (its text and instructions, as the answers
    are ordered) and per candidate its answers, counts and, with ``against``, its verdict."""
    unsteered = outcomes[0].loops
    judged = verdicts(outcomes, against) if against else {}
    candidates = []
    for outcome in outcomes:
        entry: dict[str, object] = {**asdict(outcome), "counts": outcome.counts(unsteered)}
        if outcome.label in judged:
            entry["replaces"] = {"against": against, "yes": not judged[outcome.label], "problems": judged[outcome.label]}
        candidates.append(entry)
    asked = [{"text": check.text, "instructions": [{"id": i, "kwargs": dict(kwargs)} for i, kwargs in check.instructions]} for check in checks]
    return {"settings": dict(settings), "prompts": asked, "candidates": candidates}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("candidates", nargs="+", metavar="LABEL=FILE[*SCALE]", help="vector files (or packaged names) to compare; *SCALE multiplies their strengths")
    parser.add_argument("--model_args", required=True, help="the model, as for lm_eval --model hf (pretrained=...,gguf_file=...,dtype=...)")
    parser.add_argument("--instruction", required=True, help="the IFEval instruction id whose entries are compared, e.g. startend:quotation")
    parser.add_argument("--keywords", metavar="WORDS",
                        help="keyword instructions: the words to ask for, word1,word2 or a file with one word per line; the questions take them in turn")
    parser.add_argument("--out", required=True, help="JSON file with every prompt, every answer and the counts (written atomically)")
    parser.add_argument("--questions", type=int, default=24, help="questions to answer, each without and with the instruction (default 24)")
    parser.add_argument("--n-train", type=int, default=32, help="the build's --n-train, which fixes its split (default 32)")
    parser.add_argument("--n-val", type=int, default=8, help="the build's --n-val: its validation questions are skipped (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="the build's --seed (default 0)")
    parser.add_argument("--queries", help="the build's --queries (a JSONL file or a packaged set's name; default: queries, the packaged questions)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length (default 256, the evaluation's)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--paired-with",
        metavar="ID[,ID...]|mixed",
        help="also ask a second IFEval instruction in every prompt (shown untold too) and count a pass only when both hold, "
        "as in IFEval's two-instruction prompts; with several ids (or 'mixed': every id that can share a prompt with --instruction) "
        "the questions take them in turn; entries the candidates route to them apply as well",
    )
    parser.add_argument(
        "--against",
        metavar="LABEL",
        help="a candidate (e.g. the packaged file) to judge the others against: a candidate should replace it with more fluent passes, "
        "no more new looping answers and no fewer told passes",
    )


def check_fit(candidates: Sequence[Candidate], shape: ModelShape) -> None:
    """Every candidate's vector file fits the model ``shape`` (hidden size, layer count)."""
    for candidate in candidates:
        check_compatible(candidate.vectors, shape)


def run(args: argparse.Namespace) -> int:
    from vector_builder.cli import load_model, shape_before_loading

    try:
        check_writable(args.out)
        if args.questions < 1 or args.max_new_tokens < 1 or args.batch_size < 1:
            raise CandidateError("--questions, --max-new-tokens and --batch-size must be at least 1")
        targets = targets_for(args.instruction, prompts.parse_keywords(args.keywords))  # fails before the model loads
        paired_with = [] if args.paired_with is None else paired_instructions(targets[0], args.paired_with)
        questions = questions_after_build(prompts.load_queries(args.queries), args.n_train, args.n_val, args.questions, args.seed)
        candidates = [load_candidate(text, args.instruction) for text in args.candidates]  # bad files fail before the model loads
        labels = [candidate.label for candidate in candidates]
        if len(set(labels)) < len(labels):
            raise CandidateError(f"candidate labels must differ: {sorted({label for label in labels if labels.count(label) > 1})} given twice")
        if args.against is not None and args.against not in labels:
            raise CandidateError(f"--against {args.against!r}: not a candidate label ({', '.join(labels)})")
        early = shape_before_loading(args.model_args)
        if early is not None:  # a file built for another model fails before the weights load
            check_fit(candidates, early)
        model, tokenizer, name = load_model(args.model_args)
        if early is None:
            check_fit(candidates, ModelShape.of_model(model, name))
        runner = Runner.of(model, tokenizer, GenerationSettings(batch_size=args.batch_size, seed=args.seed, max_new_tokens=args.max_new_tokens))
        checks = checks_for(targets, questions, args.seed, paired_with)
        outcomes = validate(runner, checks, candidates)
        settings = {key: value for key, value in vars(args).items() if key != "out"}
        saved = report(outcomes, checks, settings, args.against)
        write_json(args.out, saved)
    except (UserError, ValueError, OSError) as error:
        return fail("validate", error)
    print(summary_table(saved["candidates"], args.against))
    print(f"answers: {args.out}")
    return 0
