"""Build steering vectors from paired prompts and choose their layers and strengths on validation data.

    from vector_builder import BuildSettings, build
    settings = BuildSettings(model="HuggingFaceTB/SmolLM2-135M-Instruct", instructions=("format",))
    result = build(model, tokenizer, settings, out="fmt.safetensors", report_dir="build/")

Data flow: :mod:`~vector_builder.prompts` → :mod:`~vector_builder.activations` →
:mod:`~vector_builder.directions` → :mod:`~vector_builder.search` → :mod:`~vector_builder.report`,
tied together stage by stage by :mod:`~vector_builder.pipeline`; :mod:`~vector_builder.settings` is
what a build is asked to do (and what it records); :mod:`~vector_builder.cli` is ``lm-eval-steer build``.
"""

from lm_eval_steer.runtime.compatibility import ModelMismatchError, check_compatible
from vector_builder.pipeline import BuildResult, build
from vector_builder.settings import BuildSettings

__all__ = ["BuildResult", "BuildSettings", "ModelMismatchError", "build", "check_compatible"]
