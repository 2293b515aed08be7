"""What a build is asked to do, as one frozen record.

``dataclasses.asdict(settings)`` is the recorded settings: the vector file's ``builder`` metadata,
``report.json``'s ``settings`` and the checkpoint fingerprint that ``--resume`` checks. A new build
option (or method) is a new field here; the CLI, :func:`vector_builder.build` and the records follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from vector_builder import prompts, search

BUILDER_VERSION = 1
WITHOUT_INSTRUCTION = "without instruction"
WITH_INSTRUCTION_TOO = "without and with instruction"
VALIDATION_PROMPTS = (WITHOUT_INSTRUCTION, WITH_INSTRUCTION_TOO)


def _degeneracy_guard(max_repetition: float, allowed_degenerate: int) -> str:
    return (
        f"degenerate = repetition (1 - distinct {search.NGRAM}-grams / {search.NGRAM}-grams) > {max_repetition}; a candidate with "
        f"more than (unsteered count + {allowed_degenerate}) degenerate outputs is disqualified"
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
    skip_first_token: bool = True
    strength_base: str = "shift"
    keyword_sample: int | None = None
    validation_prompts: str = WITHOUT_INSTRUCTION
    degeneracy_guard: str = field(init=False)
    data_sha256: str = ""

    def __post_init__(self) -> None:
        # Tuples keep the record immutable; JSON writes them as the lists it always held.
        for name, kind in (("instructions", str), ("keywords", str), ("layers", int), ("multipliers", float)):
            object.__setattr__(self, name, tuple(kind(item) for item in getattr(self, name)))
        object.__setattr__(self, "degeneracy_guard", _degeneracy_guard(self.max_repetition, self.allowed_degenerate))
        if self.strength_base not in search.STRENGTH_BASES:
            raise ValueError(f"strength_base must be one of {', '.join(search.STRENGTH_BASES)}, got {self.strength_base!r}")
        if self.validation_prompts not in VALIDATION_PROMPTS:
            raise ValueError(f"validation_prompts must be one of {VALIDATION_PROMPTS}, got {self.validation_prompts!r}")
        if self.keyword_sample is not None and self.keyword_sample < 1:
            raise ValueError(f"keyword_sample must be positive, got {self.keyword_sample}")

    @property
    def with_instruction_too(self) -> bool:
        """Whether validation also shows the instruction (``--val-with-instruction``)."""
        return self.validation_prompts == WITH_INSTRUCTION_TOO

    def resolved(self, num_layers: int, queries: Sequence[str]) -> BuildSettings:
        """The settings as recorded: instruction ids, layers and search model filled in, data hashed."""
        layers = self.layers or tuple(search.default_layers(num_layers))
        bad = [layer for layer in layers if not 0 <= layer < num_layers]
        if bad or not layers:
            raise ValueError(f"--layers {bad or list(layers)} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
        return replace(
            self,
            search_model=self.search_model or self.model,
            instructions=tuple(prompts.expand_instructions(self.instructions)),
            layers=layers,
            data_sha256=prompts.data_hash(queries, self.keywords),
        )
