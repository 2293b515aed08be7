"""What a build is asked to do, as one frozen record.

``dataclasses.asdict(settings)`` is the recorded settings: the vector file's ``builder`` metadata,
``report.json``'s ``settings`` and the checkpoint fingerprint that ``--resume`` checks. A new build
option (or method) is a new field here; the CLI, :func:`vector_builder.build` and the records follow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from vector_builder import methods, prompts, search
from vector_builder.learned import TrainingSettings
from vector_builder.learned_directions import LearnedSettings

BUILDER_VERSION = 1
WITHOUT_INSTRUCTION = "without instruction"
WITH_INSTRUCTION_TOO = "without and with instruction"
VALIDATION_PROMPTS = (WITHOUT_INSTRUCTION, WITH_INSTRUCTION_TOO)


def _degeneracy_guard(max_repetition: float, allowed_degenerate: int, min_length_ratio: float) -> str:
    return (
        f"degenerate = repetition (1 - distinct {search.NGRAM}-grams / {search.NGRAM}-grams) > {max_repetition}; a candidate with "
        f"more than (unsteered count + {allowed_degenerate}) degenerate outputs is disqualified, and so is one whose mean answer "
        f"length is below {min_length_ratio} x the unsteered mean (length instructions excepted)"
    )


@dataclass(frozen=True, kw_only=True)
class BuildSettings:
    """Everything that determines a build's result, in the order it is recorded.

    ``model``: the name recorded for the build model; ``search_model``: the model layers and strengths
    are chosen on ("" = the build model); ``instructions``: groups (``format``, ``length``,
    ``keywords``) or IFEval ids; ``layers``: candidate layers (empty = the paper's default for the
    model); ``validation_prompts``: :data:`WITHOUT_INSTRUCTION` or :data:`WITH_INSTRUCTION_TOO`.
    :meth:`resolved` turns groups into ids and fills in the default layers, the search model and the
    hash of the data; ``builder_version`` and ``degeneracy_guard`` are derived.

    ``method`` is ``diffmean``, ``learned`` or ``both`` (:mod:`vector_builder.methods`); the
    ``learned_*`` and ``target_*`` fields configure the learned method (:meth:`learned`):
    ``learned_layers`` (empty = about ``n_layers / 5``) × ``learned_multipliers`` are its candidates.
    ``token`` (keyword instructions) searches ``layers`` × ``token_multipliers``, fractions of the
    residual stream's norm at each layer (:mod:`vector_builder.token_directions`).
    ``stop_after_keyword``: keyword-inclusion entries stop steering an answer once it contains the
    word (their ``stop_after``), in validation as in evaluation.
    """

    builder_version: int = field(default=BUILDER_VERSION, init=False)
    model: str
    search_model: str = ""
    instructions: tuple[str, ...]
    keywords: tuple[str, ...] = ()
    n_train: int = 64
    n_val: int = 8
    layers: tuple[int, ...] = ()
    multipliers: tuple[float, ...] = (0.5, 1.0, 1.5)
    batch_size: int = 8  # batch composition changes float rounding, so it is part of the result
    seed: int = 0
    max_new_tokens: int = 128
    max_repetition: float = 0.5
    allowed_degenerate: int = 0
    min_length_ratio: float = 0.5
    skip_first_token: bool = True
    strength_base: str = "shift"
    keyword_sample: int | None = None
    validation_prompts: str = WITHOUT_INSTRUCTION
    degeneracy_guard: str = field(init=False)
    data_sha256: str = ""
    method: str = "both"
    learned_layers: tuple[int, ...] = ()
    learned_multipliers: tuple[float, ...] = (1.0,)
    learned_steps: int = 40
    learned_lr: float = 0.08
    learned_batch_size: int = 4
    learned_l2: float = 0.0
    target_samples: int = 4
    target_max_tokens: int = 128
    token_multipliers: tuple[float, ...] = (0.1, 0.2, 0.3)
    stop_after_keyword: bool = True

    def __post_init__(self) -> None:
        # Tuples keep the record immutable; JSON writes them as the lists it always held.
        tuples = (("instructions", str), ("keywords", str), ("layers", int), ("multipliers", float), ("learned_layers", int), ("learned_multipliers", float), ("token_multipliers", float))
        for name, kind in tuples:
            object.__setattr__(self, name, tuple(kind(item) for item in getattr(self, name)))
        object.__setattr__(self, "degeneracy_guard", _degeneracy_guard(self.max_repetition, self.allowed_degenerate, self.min_length_ratio))
        if self.strength_base not in search.STRENGTH_BASES:
            raise ValueError(f"strength_base must be one of {', '.join(search.STRENGTH_BASES)}, got {self.strength_base!r}")
        if self.validation_prompts not in VALIDATION_PROMPTS:
            raise ValueError(f"validation_prompts must be one of {VALIDATION_PROMPTS}, got {self.validation_prompts!r}")
        if not (math.isfinite(self.min_length_ratio) and 0 <= self.min_length_ratio < 1):
            raise ValueError(f"--min-length-ratio must be a number from 0 (off) up to but not including 1, got {self.min_length_ratio}")
        if self.keyword_sample is not None and self.keyword_sample < 1:
            raise ValueError(f"keyword_sample must be positive, got {self.keyword_sample}")
        if not self.multipliers or not all(math.isfinite(m) for m in self.multipliers):
            raise ValueError(f"--multipliers must be finite numbers, got {list(self.multipliers)}")
        methods.methods_of(self.method)  # raises for an unknown method
        for name in ("learned_steps", "learned_batch_size", "target_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.target_samples < 0:
            raise ValueError(f"--target-samples must not be negative, got {self.target_samples}")
        if not self.token_multipliers or not all(math.isfinite(m) and m > 0 for m in self.token_multipliers):
            raise ValueError(f"--token-multipliers must be positive finite numbers, got {list(self.token_multipliers)}")
        for name, value in (("learned-lr", self.learned_lr), ("learned-l2", self.learned_l2), *(("learned-multipliers", m) for m in self.learned_multipliers)):
            if not math.isfinite(value) or value < 0 or (name == "learned-lr" and value == 0):
                raise ValueError(f"--{name} must be a finite {'positive' if name == 'learned-lr' else 'non-negative'} number, got {value}")

    @property
    def method_names(self) -> tuple[str, ...]:
        """The methods searched: ``("diffmean", "learned")`` for ``both``."""
        return methods.methods_of(self.method)

    def learned(self) -> LearnedSettings:
        """The learned method's training settings (after :meth:`resolved`, whose layers are filled in);
        ``target_*`` go to the targets' generation settings instead."""
        training = TrainingSettings(
            max_steps=self.learned_steps, learning_rate=self.learned_lr, batch_size=self.learned_batch_size, l2=self.learned_l2, seed=self.seed
        )
        return LearnedSettings(layers=self.learned_layers, training=training)

    @property
    def with_instruction_too(self) -> bool:
        """Whether validation also shows the instruction (``--val-with-instruction``)."""
        return self.validation_prompts == WITH_INSTRUCTION_TOO

    def resolved(self, num_layers: int, queries: Sequence[str]) -> BuildSettings:
        """The settings as recorded: instruction ids, layers and search model filled in, data hashed."""
        layers = self.layers or tuple(search.default_layers(num_layers))
        # Learned vectors worked at about n_layers / 5 in our measurements (layer 6 of SmolLM2's 30);
        # later layers needed far more steps.
        learned_layers = self.learned_layers or (max(1, round(num_layers / 5)),)
        for flag, chosen in (("--layers", layers), ("--learned-layers", learned_layers)):
            bad = [layer for layer in chosen if not 0 <= layer < num_layers]
            if bad or not chosen:
                raise ValueError(f"{flag} {bad or list(chosen)} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
        return replace(
            self,
            search_model=self.search_model or self.model,
            instructions=tuple(prompts.expand_instructions(self.instructions)),
            layers=layers,
            learned_layers=learned_layers,
            data_sha256=prompts.data_hash(queries, self.keywords),
        )
