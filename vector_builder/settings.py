"""What a build is asked to do, as one frozen record of per-stage parts.

``dataclasses.asdict(settings)`` is the recorded settings: the vector file's ``builder`` metadata,
``report.json``'s ``settings`` and the checkpoint fingerprint that ``--resume`` checks. Each stage
reads its own part: ``generation`` (:class:`~vector_builder.runner.GenerationSettings`, every stage
that runs the model), ``search`` (:class:`~vector_builder.search.SearchSettings`), ``learned``
(:class:`~vector_builder.methods.learned.LearnedSettings`) and ``targets``
(:class:`~vector_builder.methods.learned.targets.TargetSettings`). A new build option is a field of
the part whose stage reads it; the CLI, :func:`vector_builder.build` and the records follow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from vector_builder import methods, prompts, search
from vector_builder.methods.learned import LearnedSettings
from vector_builder.methods.learned.targets import TargetSettings
from vector_builder.runner import GenerationSettings
from vector_builder.search import SearchSettings

#: 2: the settings are recorded nested by stage (version 1 recorded 30 flat fields).
BUILDER_VERSION = 2


@dataclass(frozen=True, kw_only=True)
class BuildSettings:
    """Everything that determines a build's result, in the order it is recorded.

    ``model``: the name recorded for the build model; ``search_model``: the model layers and strengths
    are chosen on ("" = the build model); ``instructions``: groups (``format``, ``length``,
    ``keywords``) or IFEval ids; ``keywords``: the words of keyword instructions; ``n_train`` /
    ``n_val``: training questions and validation questions per instruction; ``method``: ``diffmean``,
    ``learned``, ``token`` or ``both`` (:mod:`vector_builder.methods`). :meth:`resolved` turns groups
    into ids, fills in the default layers and the search model, and hashes the data into
    ``data_sha256``; ``builder_version`` is derived.
    """

    builder_version: int = field(default=BUILDER_VERSION, init=False)
    model: str
    search_model: str = ""
    instructions: tuple[str, ...]
    keywords: tuple[str, ...] = ()
    n_train: int = 64
    n_val: int = 8
    method: str = "both"
    data_sha256: str = ""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    learned: LearnedSettings = field(default_factory=LearnedSettings)
    targets: TargetSettings = field(default_factory=TargetSettings)

    def __post_init__(self) -> None:
        # Tuples keep the record immutable; JSON writes them as the lists it always held.
        object.__setattr__(self, "instructions", tuple(str(item) for item in self.instructions))
        object.__setattr__(self, "keywords", tuple(str(item) for item in self.keywords))
        methods.methods_of(self.method)  # raises for an unknown method
        for flag, counts in self.search.window_axes.items():
            # Validation answers end at --max-new-tokens, so a stop there could not be told from steering
            # to the end, nor a start there from not steering at all.
            beyond = [n for n in counts if n >= self.generation.max_new_tokens]
            if beyond:
                raise ValueError(f"{flag} {beyond} must be below --max-new-tokens {self.generation.max_new_tokens}")

    @property
    def method_names(self) -> tuple[str, ...]:
        """The methods searched: ``("diffmean", "learned")`` for ``both``."""
        return methods.methods_of(self.method)

    def layers_for(self, num_layers: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(search layers, learned layers)`` on a ``num_layers``-layer model: the ones given, or the
        defaults; a layer outside the model is refused."""
        layers = self.search.layers or tuple(search.default_layers(num_layers))
        # Learned vectors worked at about n_layers / 5 in our measurements (layer 6 of SmolLM2's 30);
        # later layers needed far more steps.
        learned_layers = self.learned.layers or (max(1, round(num_layers / 5)),)
        for flag, chosen in (("--layers", layers), ("--learned-layers", learned_layers)):
            bad = [layer for layer in chosen if not 0 <= layer < num_layers]
            if bad or not chosen:
                raise ValueError(f"{flag} {bad or list(chosen)} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
        return layers, learned_layers

    def resolved(self, num_layers: int, queries: Sequence[str]) -> BuildSettings:
        """The settings as recorded: instruction ids, layers and search model filled in, data hashed."""
        layers, learned_layers = self.layers_for(num_layers)
        return replace(
            self,
            search_model=self.search_model or self.model,
            instructions=tuple(prompts.expand_instructions(self.instructions)),
            data_sha256=prompts.data_hash(queries, self.keywords),
            search=replace(self.search, layers=layers),
            learned=replace(self.learned, layers=learned_layers),
        )
