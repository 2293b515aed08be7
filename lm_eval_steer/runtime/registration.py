"""Registers ``steered-hf`` and the IFEval subset tasks with lm-eval (idempotent)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

MODEL_NAME = "steered-hf"
MODEL_TARGET = "lm_eval_steer.runtime.model:SteeredHFLM"
TASKS_PACKAGE = "lm_eval_steer.tasks"


def tasks_dir() -> Path:
    """Directory of our task YAMLs: the installed package ``lm_eval_steer.tasks`` (``tasks/`` in the source tree)."""
    spec = importlib.util.find_spec(TASKS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{TASKS_PACKAGE} is not installed: install the package (pip install .), or pass --include_path tasks")
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def register_model() -> None:
    """Registers ``steered-hf`` lazily: the model module is imported only when the model is used."""
    # The harness registers its built-in models only if the registry is still empty when a model is
    # first looked up, so they must be in before ours (lm_eval.models registers them lazily, ~20 ms).
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def register_tasks() -> None:
    """Makes every ``TaskManager`` index our task directory too, so ``--include_path`` is not needed.

    The directory goes first so that a user's own ``--include_path`` can still override our tasks.
    """
    from lm_eval.tasks import manager

    original_init = manager.TaskManager.__init__
    if getattr(original_init, "_lm_eval_steer", False):
        return

    @functools.wraps(original_init)
    def init_with_our_tasks(self, verbosity=None, include_path=None, *args, **kwargs):  # type: ignore[no-untyped-def]
        ours = str(tasks_dir())
        if include_path is None:
            include_path = [ours]
        else:
            given = list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
            include_path = [ours, *(path for path in given if str(path) != ours)]
        original_init(self, verbosity, include_path, *args, **kwargs)

    init_with_our_tasks._lm_eval_steer = True  # type: ignore[attr-defined]
    manager.TaskManager.__init__ = init_with_our_tasks  # type: ignore[method-assign]


def register() -> None:
    register_model()
    register_tasks()
