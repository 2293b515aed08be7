"""Start-up hook (imported by ``lm_eval_steer.pth``): registers the plugin when lm-eval loads.

lm-eval 0.4.x's CLI reads no plugin entry points, so plain ``lm_eval --model steered-hf`` only
works if something registers the model before the CLI looks it up. Importing lm-eval in every
Python process would cost ~50 ms to ~1 s, so this module imports nothing heavy: it puts a finder on
``sys.meta_path`` that waits for the harness's own modules and runs our registration right after
each of them has executed. Any failure here is swallowed: a start-up hook must never break Python.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

# module the harness imports  ->  function in lm_eval_steer.runtime.registration to run after it loads
_AFTER_IMPORT = {
    "lm_eval.api.registry": "register_model",
    "lm_eval.tasks.manager": "register_tasks",
}


def _run(function_name: str) -> None:
    try:
        from lm_eval_steer.runtime import registration

        getattr(registration, function_name)()
    except Exception as error:  # noqa: BLE001 - never break the interpreter start-up
        print(f"lm-eval-steer: registration skipped ({error})", file=sys.stderr)


class _LoaderThenRegister(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, function_name: str) -> None:
        self._inner = inner
        self._function_name = function_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _run(self._function_name)


class _HarnessWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path=None, target=None):  # type: ignore[no-untyped-def]
        function_name = _AFTER_IMPORT.get(fullname)
        if function_name is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _LoaderThenRegister(spec.loader, function_name)
                return spec
        return None


def _install() -> None:
    for module_name, function_name in _AFTER_IMPORT.items():
        if module_name in sys.modules:
            _run(function_name)
    if not any(isinstance(finder, _HarnessWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HarnessWatcher())


_install()
