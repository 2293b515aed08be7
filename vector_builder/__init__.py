"""Build steering vectors from paired prompts and choose their layers and strengths on validation data.

    from vector_builder import BuildSettings, build
    settings = BuildSettings(model="HuggingFaceTB/SmolLM2-135M-Instruct", instructions=("format",))
    result = build(model, tokenizer, settings, out="fmt.safetensors", report_dir="build/")

Data flow: :mod:`~vector_builder.prompts` → one stage per method in :mod:`~vector_builder.methods`
(:mod:`~vector_builder.methods.diffmean` over :mod:`~vector_builder.activations`,
:mod:`~vector_builder.methods.token`, :mod:`~vector_builder.methods.learned`), each giving a
:class:`~vector_builder.direction.Direction` → :mod:`~vector_builder.search` (answers through
:mod:`~vector_builder.runner`, scored by :mod:`~vector_builder.scoring`) → :mod:`~vector_builder.report`,
tied together stage by stage by :mod:`~vector_builder.pipeline`. :mod:`~vector_builder.settings` is
what a build is asked to do (and what it records), one part per stage; :mod:`~vector_builder.cli` is
``lm-eval-steer build``. A new build method is a module under ``methods/``, registered in
:mod:`vector_builder.methods`.
"""

from lm_eval_steer.runtime.compatibility import ModelMismatchError, check_compatible
from vector_builder.pipeline import BuildResult, Validation, build
from vector_builder.settings import BuildSettings

__all__ = ["BuildResult", "BuildSettings", "ModelMismatchError", "Validation", "build", "check_compatible"]
