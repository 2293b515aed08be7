"""Build steering vectors from paired prompts and choose their layers and strengths on validation data.

    from vector_builder import build
    result = build(model, tokenizer, instructions=["format"], out="fmt.safetensors",
                   report_dir="build/", model_name="HuggingFaceTB/SmolLM2-135M-Instruct")

Data flow: :mod:`~vector_builder.prompts` → :mod:`~vector_builder.activations` →
:mod:`~vector_builder.directions` → :mod:`~vector_builder.search` → :mod:`~vector_builder.report`,
tied together by :mod:`~vector_builder.pipeline`; :mod:`~vector_builder.cli` is ``lm-eval-steer build``.
"""

from vector_builder.pipeline import BuildResult, ModelMismatchError, build, check_compatible

__all__ = ["BuildResult", "ModelMismatchError", "build", "check_compatible"]
