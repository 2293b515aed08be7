"""``lm-eval-steer anti-looping``: a direction against looping, made from the model's own answers,
with its layer and strength chosen on held-out requests.

    lm-eval-steer anti-looping --model_args pretrained=DIR,gguf_file=F,dtype=float32 \\
        --route detectable_format:title --out anti-looping.safetensors --report anti-looping/

1. The model answers the first ``--n-train`` writing requests unsteered (greedy). An answer *loops*
   by the builder's guard (:func:`~lm_eval_steer.core.degeneracy.is_degenerate`).
2. At each candidate layer ``L``, over answer tokens from the ``--skip-tokens``-th on (answers open
   alike whether they loop later or not)::

       d[L] = mean(h_L at repeating tokens of looping answers) − mean(h_L at tokens of answers that do not loop)

   A token *repeats* when the 4-gram ending at it ended earlier in its answer
   (:func:`~lm_eval_steer.core.degeneracy.repeated_ngram_ends`); ``h_L`` is decoder layer ``L``'s output.
3. Candidate ``(L, m)`` steers ``x ← x − m·d[L]`` at generated tokens: an ``add`` entry along
   ``d[L]/‖d[L]‖`` of strength ``−m‖d[L]‖``, positions ``generated``. The unsteered model and every
   candidate answer the next ``--n-val`` requests; each gets its looping answers, mean length, and
   the perplexity of its answers under the unsteered model.
4. Chosen: the fewest looping answers among candidates that loop less than unsteered and whose
   perplexity rises by at most ``--max-perplexity-rise`` (ties: lower perplexity, then smaller ``m``).
   Loops are easy to predict, so curing them raises perplexity; the bound keeps the cure from
   writing text the model finds unlikely. When no candidate qualifies, no file is written (exit 1).

The entry applies to every document, or with ``--route`` one copy per instruction, named
``<instruction>:anti-looping`` and routed to it, to merge (``lm-eval-steer merge FILE --stack``) over a
file whose entries for those instructions it should join. ``--not-with`` keeps those copies off
documents that also carry another instruction the entry would cost (its prose has commas, so
``--not-with punctuation:no_comma``); ``lm-eval-steer validate --paired-with`` measures that cost.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lm_eval_steer.analysis.quality import perplexity
from lm_eval_steer.core.atomic import atomic_write, check_writable, write_json
from lm_eval_steer.core.console import fail
from lm_eval_steer.core.degeneracy import is_degenerate, repeated_ngram_ends
from lm_eval_steer.core.errors import UserError
from lm_eval_steer.core.ifeval import instruction_ids
from lm_eval_steer.runtime.hooks import find_decoder_layers, text_config
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file
from vector_builder import prompts
from vector_builder.activations import RunningSum
from vector_builder.runner import GenerationSettings, Runner
from vector_builder.search import generate_in_batches, looping_changes
from vector_builder.teacher_forcing import answer_logprobs, answer_state_sums

WRITING_TASKS = prompts.DEFAULT_QUERIES.parent / "writing_tasks.jsonl"
REPORT_NAME = "anti-looping.json"
PLOT_NAME = "anti-looping.png"
ENTRY_NAME = "anti-looping"
REPEATING, FLUENT = "repeating", "fluent"


class AntiLoopingError(UserError):
    """A bad option or a model whose training answers cannot give a direction."""


@dataclass(frozen=True)
class Settings:
    """Everything that decides the result (recorded in the file and the report)."""

    layers: tuple[int, ...]
    multipliers: tuple[float, ...]
    n_train: int = 64
    n_val: int = 32
    skip_tokens: int = 16
    max_new_tokens: int = 256
    batch_size: int = 16
    max_perplexity_rise: float = 0.5
    routes: tuple[str, ...] = ()
    not_with: tuple[str, ...] = ()  # routed copies stay off documents that also carry one of these


@dataclass(frozen=True)
class LayerDirection:
    """``d[L]`` and what it was averaged over; ``repeating_projection`` and ``fluent_projection`` are
    the two group means projected on ``d/‖d‖`` (they differ by ‖d‖: how far apart the groups lie)."""

    layer: int
    vector: torch.Tensor
    repeating_tokens: int
    fluent_tokens: int
    repeating_projection: float
    fluent_projection: float

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def entry(self, multiplier: float, name: str = ENTRY_NAME) -> SteeringEntry:
        """``x ← x − m·d`` at generated tokens."""
        return SteeringEntry(name, self.vector / self.vector.norm(), self.layer, "add", -multiplier * self.norm, "generated")


@dataclass(frozen=True)
class Candidate:
    """Subtracting ``multiplier`` × ``direction``'s ``d``."""

    direction: LayerDirection
    multiplier: float

    @property
    def label(self) -> str:
        return f"L{self.direction.layer} x{self.multiplier:g}"


@dataclass
class HeldOut:
    """One candidate's (or the unsteered model's: no layer, multiplier 0) answers to the held-out requests."""

    label: str
    layer: int | None
    multiplier: float
    looping: list[bool]
    mean_tokens: float
    perplexity: float | None  # under the unsteered model; None when every answer is empty
    texts: list[str] = field(repr=False)
    new_looping: int = 0
    cured_looping: int = 0

    @property
    def looping_answers(self) -> int:
        return sum(self.looping)


def token_groups(answers: Sequence[Sequence[int]], skip_tokens: int) -> list[list[str | None]]:
    """Per answer token: ``repeating`` (a repeat in a looping answer), ``fluent`` (any token of an
    answer that does not loop) or None (the first ``skip_tokens``, and a looping answer's first passes)."""
    groups: list[list[str | None]] = []
    for answer in answers:
        loops = is_degenerate(answer)
        flags = repeated_ngram_ends(answer)
        groups.append([None if j < skip_tokens else REPEATING if loops and flags[j] else None if loops else FLUENT for j in range(len(answer))])
    return groups


def directions(sums: Mapping[str, RunningSum], layers: Sequence[int]) -> list[LayerDirection]:
    """``d[L] = mean(repeating) − mean(fluent)`` per layer, from :func:`answer_state_sums`' running sums."""
    repeating, fluent = sums.get(REPEATING), sums.get(FLUENT)
    if repeating is None or fluent is None or not repeating.count or not fluent.count:
        missing = "no training answer loops" if repeating is None or not repeating.count else "every training answer loops"
        raise AntiLoopingError(f"{missing}: nothing to set against; try more --n-train requests or longer --max-new-tokens")
    repeating_mean, fluent_mean = repeating.mean().float(), fluent.mean().float()
    out = []
    for k, layer in enumerate(layers):
        vector = repeating_mean[k] - fluent_mean[k]
        unit = vector / vector.norm()
        out.append(LayerDirection(layer, vector, repeating.count, fluent.count, float(repeating_mean[k] @ unit), float(fluent_mean[k] @ unit)))
    return out


def choose(unsteered: HeldOut, candidates: Sequence[HeldOut], max_perplexity_rise: float) -> HeldOut | None:
    """The candidate with the fewest looping answers among those that loop less than ``unsteered`` and
    whose perplexity is at most ``unsteered.perplexity + max_perplexity_rise`` (ties: lower perplexity,
    then smaller multiplier); None when none qualifies."""
    if unsteered.perplexity is None:
        return None
    bound = unsteered.perplexity + max_perplexity_rise
    qualified = [c for c in candidates if c.looping_answers < unsteered.looping_answers and c.perplexity is not None and c.perplexity <= bound]
    return min(qualified, key=lambda c: (c.looping_answers, c.perplexity, c.multiplier), default=None)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """Layers at 40% and 60% of the depth, where the direction worked on SmolLM2 (18 of 30) and Qwen2.5 (14 of 24)."""
    return tuple(sorted({round(0.4 * num_layers), round(0.6 * num_layers)}))


def held_out(runner: Runner, ids: Sequence[Sequence[int]], candidate: Candidate | None, bar: tqdm) -> HeldOut:
    """Greedy answers to ``ids`` steered by ``candidate`` (None: unsteered), scored by the unsteered model."""
    label = "unsteered" if candidate is None else candidate.label
    bar.set_postfix_str(label)
    answers = generate_in_batches(runner, ids, [() if candidate is None else (candidate.direction.entry(candidate.multiplier),)] * len(ids), bar)
    scored = answer_logprobs(runner.model, ids, answers, batch_size=runner.settings.batch_size, pad_id=runner.pad_id, desc=f"likelihood {label}")
    return HeldOut(
        label,
        None if candidate is None else candidate.direction.layer,
        0.0 if candidate is None else candidate.multiplier,
        [is_degenerate(answer) for answer in answers],
        sum(map(len, answers)) / len(answers),
        perplexity(sum(lp for lp, _ in scored), sum(n for _, n in scored)),
        [runner.decode(answer) for answer in answers],
    )


def build(runner: Runner, requests: Sequence[str], settings: Settings) -> tuple[list[LayerDirection], HeldOut, list[HeldOut], HeldOut | None]:
    """Steps 1-4 of the module docstring: ``(directions, unsteered, candidates' results, chosen)``."""
    ids = [prompts.chat_ids(runner.tokenizer, text) for text in requests]
    train_ids, val_ids = ids[: settings.n_train], ids[settings.n_train : settings.n_train + settings.n_val]
    with tqdm(total=len(train_ids), desc="anti-looping: training answers", unit="answer") as bar:
        answers = generate_in_batches(runner, train_ids, [()] * len(train_ids), bar)
    groups = token_groups(answers, settings.skip_tokens)
    sums = answer_state_sums(runner.model, train_ids, answers, groups, settings.layers, batch_size=runner.settings.batch_size, pad_id=runner.pad_id)
    found = directions(sums, settings.layers)
    candidates = [Candidate(d, m) for d in found for m in settings.multipliers]
    # Each answer set takes minutes on a CPU; the bar counts answers over all of them.
    with tqdm(total=(len(candidates) + 1) * len(val_ids), desc="anti-looping: held-out answers", unit="answer") as bar:
        unsteered = held_out(runner, val_ids, None, bar)
        results = [held_out(runner, val_ids, candidate, bar) for candidate in candidates]
    for result in results:
        result.new_looping, result.cured_looping = looping_changes(result.looping, unsteered.looping)
    return found, unsteered, results, choose(unsteered, results, settings.max_perplexity_rise)


def entries_for(direction: LayerDirection, multiplier: float, routes: Sequence[str], not_with: Sequence[str] = ()) -> list[SteeringEntry]:
    """One entry for every document, or one per routed instruction, kept off documents that also
    carry an instruction of ``not_with``."""
    entry = direction.entry(multiplier)
    if not routes:
        return [entry]
    # a copy's own instruction is never one it is kept off (the file format refuses it there)
    return [replace(entry, name=f"{route}:{ENTRY_NAME}", applies_to=AppliesTo(route, not_with=tuple(p for p in not_with if p != route))) for route in routes]


def summary_table(unsteered: HeldOut, candidates: Sequence[HeldOut], chosen: HeldOut | None, bound: float) -> str:
    n = len(unsteered.looping)
    lines = [f"{'candidate':14s} {'looping':>9s} {'new/cured':>10s} {'tokens':>7s} {'perplexity':>11s}"]
    for item in (unsteered, *candidates):
        ppl = "-" if item.perplexity is None else f"{item.perplexity:.2f}"
        changes = "" if item is unsteered else f"+{item.new_looping}/-{item.cured_looping}"
        mark = "  <- chosen" if item is chosen else ""
        lines.append(f"{item.label:14s} {item.looping_answers:>4d} of {n:<2d} {changes:>10s} {item.mean_tokens:7.0f} {ppl:>11s}{mark}")
    if unsteered.perplexity is not None:
        lines.append(f"(perplexity under the unsteered model; bound {unsteered.perplexity + bound:.2f})")
    return "\n".join(lines)


def write_plot(path: Path, unsteered: HeldOut, candidates: Sequence[HeldOut], chosen: HeldOut | None, bound: float) -> None:
    """Two panels: looping answers and perplexity per candidate (the chosen one in orange), the
    unsteered values and the perplexity bound as lines."""
    from matplotlib.figure import Figure

    labels = [c.label for c in candidates]
    figure = Figure(figsize=(max(5.0, 1.2 * len(labels) + 2), 3.5), layout="constrained")
    loops, ppl = figure.subplots(1, 2)
    colours = ["tab:orange" if c is chosen else "tab:blue" for c in candidates]
    loops.bar(labels, [c.looping_answers for c in candidates], color=colours)
    loops.axhline(unsteered.looping_answers, color="black", linestyle="--", label="unsteered")
    loops.set_title(f"looping answers of {len(unsteered.looping)}")
    ppl.bar(labels, [c.perplexity or 0.0 for c in candidates], color=colours)
    if unsteered.perplexity is not None:
        ppl.axhline(unsteered.perplexity, color="black", linestyle="--", label="unsteered")
        ppl.axhline(unsteered.perplexity + bound, color="red", linestyle=":", label="bound")
    ppl.set_title("perplexity under the unsteered model")
    for axis in (loops, ppl):
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
        axis.legend(fontsize=7)
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=80))


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected layer numbers separated by commas") from None


def _multipliers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected numbers separated by commas") from None
    if not values or not all(0 < value < float("inf") for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every multiplier must be a positive finite number (m in x <- x - m*d)")
    return values


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model_args", required=True, help="the model, as for lm_eval --model hf (pretrained=...,gguf_file=...,dtype=...,name=...)")
    parser.add_argument("--out", required=True, help="vector file to write (.safetensors, atomically); only written when a candidate qualifies")
    parser.add_argument("--report", required=True, help=f"directory for {REPORT_NAME} (every held-out answer and number) and {PLOT_NAME}")
    parser.add_argument("--layers", type=_layers, default=None, help="candidate layers, e.g. 12,18 (default: at 40%% and 60%% of the depth)")
    parser.add_argument("--multipliers", type=_multipliers, default=(0.5, 1.0), help="candidate m in x <- x - m*d (default 0.5,1)")
    parser.add_argument("--route", default="", metavar="ID,ID", help="IFEval instruction ids to route the entry to, one copy each (default: every document)")
    parser.add_argument("--not-with", default="", metavar="ID,ID",
                        help="with --route: keep the copies off documents that also carry another instruction matching one of these "
                             "IFEval ids or globs (punctuation:no_comma, which the prose the entry writes breaks; '*': any other instruction)")
    parser.add_argument("--queries", default=None, help="JSONL of {'query': ...} requests, long answers wanted, or a packaged set's name (default: writing_tasks, 120 writing requests)")
    parser.add_argument("--n-train", type=int, default=64, help="requests whose unsteered answers give the direction (default 64)")
    parser.add_argument("--n-val", type=int, default=32, help="the next requests, on which layer and strength are chosen (default 32)")
    parser.add_argument("--skip-tokens", type=int, default=16, help="answer tokens left out of both means at the start of each answer (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer length (default 256, the evaluation's)")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="requests per generate call and forward pass (default 16; batching changes float rounding, so it is part of the result)")
    parser.add_argument("--max-perplexity-rise", type=float, default=0.5,
                        help="a candidate's answers may raise the perplexity under the unsteered model by at most this much (default 0.5)")


def settings_from(args: argparse.Namespace, num_layers: int) -> Settings:
    layers = tuple(dict.fromkeys(args.layers)) if args.layers else default_layers(num_layers)  # a layer given twice is one candidate set
    bad = [layer for layer in layers if not 0 <= layer < num_layers]
    if bad:
        raise AntiLoopingError(f"--layers {','.join(map(str, bad))}: the model has layers 0-{num_layers - 1}")
    return Settings(layers, tuple(dict.fromkeys(args.multipliers)), args.n_train, args.n_val, args.skip_tokens, args.max_new_tokens, args.batch_size,
                    args.max_perplexity_rise, *routes_from(args))


def routes_from(args: argparse.Namespace) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(--route ids, --not-with ids or globs)``, checked against IFEval's registry."""
    routes, not_with = instruction_ids(args.route, "--route"), instruction_ids(args.not_with, "--not-with", patterns=True)
    if not_with and not routes:
        raise AntiLoopingError("--not-with needs --route: an entry for every document has no instruction to be kept off")
    return routes, not_with


def check_options(args: argparse.Namespace, requests: Sequence[str]) -> None:
    """Fails before the model loads."""
    if min(args.n_train, args.n_val, args.max_new_tokens, args.batch_size) < 1 or args.skip_tokens < 0:
        raise AntiLoopingError("--n-train, --n-val, --max-new-tokens and --batch-size must be at least 1, --skip-tokens at least 0")
    if args.skip_tokens >= args.max_new_tokens:
        raise AntiLoopingError(f"--skip-tokens {args.skip_tokens}: must be below --max-new-tokens {args.max_new_tokens}")
    if not args.max_perplexity_rise >= 0:
        raise AntiLoopingError(f"--max-perplexity-rise {args.max_perplexity_rise}: must be a number of at least 0")
    if args.n_train + args.n_val > len(requests):
        raise AntiLoopingError(f"--n-train {args.n_train} + --n-val {args.n_val}: only {len(requests)} requests in {args.queries or WRITING_TASKS.name}")
    routes_from(args)
    check_writable(args.out)
    check_writable(Path(args.report) / REPORT_NAME)


def run(args: argparse.Namespace) -> int:
    from vector_builder.cli import load_model, shape_before_loading

    try:
        requests = prompts.load_queries(args.queries or WRITING_TASKS)
        check_options(args, requests)
        shape = shape_before_loading(args.model_args)
        if shape is not None and shape.num_layers is not None:
            settings_from(args, shape.num_layers)  # refuses layers outside the model before the weights load
        model, tokenizer, name = load_model(args.model_args)
        settings = settings_from(args, len(find_decoder_layers(model)))
        runner = Runner.of(model, tokenizer, GenerationSettings(batch_size=settings.batch_size, max_new_tokens=settings.max_new_tokens))
        found, unsteered, candidates, chosen = build(runner, requests, settings)
        report = {
            "model": name,
            "settings": asdict(settings),
            "directions": [{key: value for key, value in asdict(d).items() if key != "vector"} | {"norm": d.norm} for d in found],
            "held_out": [asdict(item) for item in (unsteered, *candidates)],
            "chosen": None if chosen is None else chosen.label,
        }
        write_json(Path(args.report) / REPORT_NAME, report)
        write_plot(Path(args.report) / PLOT_NAME, unsteered, candidates, chosen, settings.max_perplexity_rise)
        if chosen is not None:
            direction = next(d for d in found if d.layer == chosen.layer)
            record = {"settings": asdict(settings), "chosen": chosen.label, "queries": args.queries or WRITING_TASKS.name,
                      "held_out": {item.label: {"looping": item.looping_answers, "perplexity": item.perplexity} for item in (unsteered, chosen)}}
            save_vector_file(args.out, entries_for(direction, chosen.multiplier, settings.routes, settings.not_with), model=name,
                             hidden_size=int(text_config(model).hidden_size), num_layers=len(find_decoder_layers(model)),
                             extra_metadata={"anti_looping": json.dumps(record, sort_keys=True)})
    except (UserError, ValueError, OSError) as error:
        return fail("anti-looping", error)
    print(summary_table(unsteered, candidates, chosen, settings.max_perplexity_rise))
    print(f"report: {Path(args.report) / REPORT_NAME}\nplot:   {Path(args.report) / PLOT_NAME}")
    if chosen is None:
        print("no candidate loops less than unsteered within the perplexity bound: no vector file written")
        return 1
    print(f"vectors: {args.out} ({chosen.label}, strength {-chosen.multiplier * direction.norm:.3g})")
    return 0
