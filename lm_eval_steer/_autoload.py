"""Start-up hook (imported by ``lm_eval_steer.pth``): registers the plugin when lm-eval loads.

lm-eval 0.4.x's CLI reads no plugin entry points, so plain ``lm_eval --model steered-hf`` only
works if something registers the model before the CLI looks it up. Importing lm-eval in every
Python process would cost ~50 ms to ~1 s, so this module imports nothing heavy: it puts a finder on
``sys.meta_path`` that waits for the harness's own modules and runs our registration right after
each of them has executed. Any failure here is swallowed: a start-up hook must never break Python.

It also installs an excepthook limited to the project's own input errors
(:class:`lm_eval_steer.core.errors.UserError`): when one reaches the top of a program (a bad vector file
or model argument under ``lm_eval --model steered-hf``), it is printed as one line and the process
exits with status 2. Every other exception, and every exception a caller catches, is untouched.
"""

from __future__ import annotations

import atexit
import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType, TracebackType

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


def _user_error_hook(previous):  # type: ignore[no-untyped-def]
    """An excepthook that prints project input errors as one line (exit 2) and leaves the rest to ``previous``."""

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        try:
            from lm_eval_steer.core.errors import UserError, one_line
        except Exception:  # noqa: BLE001 - a broken install: fall back to the usual traceback
            UserError = None  # noqa: N806
        if UserError is None or not isinstance(error, UserError):
            previous(kind, error, traceback)
            return
        program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
        print(one_line(f"{program}: error: {error}"), file=sys.stderr)
        # An excepthook cannot choose the exit status (Python exits 1 after it); run the exit
        # handlers and flush as a normal exit would, then leave with 2, the usage/input error status.
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed stream must not hide the exit status
                pass
        os._exit(2)

    hook._lm_eval_steer = True  # type: ignore[attr-defined]
    return hook


def _install() -> None:
    if not getattr(sys.excepthook, "_lm_eval_steer", False):
        sys.excepthook = _user_error_hook(sys.excepthook)
    for module_name, function_name in _AFTER_IMPORT.items():
        if module_name in sys.modules:
            _run(function_name)
    if not any(isinstance(finder, _HarnessWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _HarnessWatcher())


_install()
