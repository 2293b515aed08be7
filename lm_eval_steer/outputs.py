"""Where lm-eval writes a run's files, and reading them: shared by the runtime and ``analysis/``.

lm-eval's ``--output_path DIR`` writes ``DIR/<model_name_sanitized>/results_<date>.json`` and, with
``--log_samples``, ``samples_<task>_<date>.jsonl`` next to it (same ``<date>``). ``--output_path
x.json`` writes ``x_<date>.json`` instead. This module only locates and parses those files; what
their contents mean is up to the caller (``analysis/results.py`` for comparing runs,
``runtime/reuse.py`` for reusing a baseline's answers). It imports nothing from the package but the error types.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lm_eval_steer.errors import UserError, brief

_RESULTS_NAME = re.compile(r"^results_(?P<date>.+)\.json$")


class OutputError(UserError):
    """An lm-eval output that cannot be read or used; the message names the file at fault."""


def date_id(results_file: Path) -> str | None:
    """The ``<date>`` part of ``results_<date>.json`` (shared with its samples files)."""
    match = _RESULTS_NAME.match(results_file.name)
    return match.group("date") if match else None


def find_results_files(path: Path) -> list[Path]:
    """The results file(s) that ``path`` stands for.

    A file is taken as is. A directory is an ``--output_path``: every directory holding
    ``results_*.json`` (the directory itself or its model subdirectories) contributes its newest
    file. Newest by name, because lm-eval's ``<date>`` is an ISO timestamp that sorts in time order,
    and file mtimes do not survive copies and CI artifact downloads.
    """
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise OutputError(f"{path}: no such file or directory")
    candidates = sorted(path.glob("results_*.json")) + sorted(path.glob("*/results_*.json"))
    newest: dict[Path, Path] = {}
    for candidate in candidates:
        current = newest.get(candidate.parent)
        if current is None or candidate.name > current.name:
            newest[candidate.parent] = candidate
    if not newest:
        raise OutputError(f"{path}: no results_*.json in it or in its subdirectories")
    return sorted(newest.values())


def find_sample_files(results_file: Path, tasks: Iterable[str]) -> dict[str, Path]:
    """``samples_<task>_<date>.jsonl`` written by the same run as ``results_file``, per task."""
    stamp = date_id(results_file)
    if stamp is None:
        return {}
    found = {}
    for task in tasks:
        candidate = results_file.parent / f"samples_{task}_{stamp}.jsonl"
        if candidate.is_file():
            found[task] = candidate
    return found


def read_results_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or an OutputError naming the file and the reason."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise OutputError(f"{path}: not a readable results JSON ({brief(str(error), 120)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise OutputError(f"{path}: not an lm-eval results file (no 'results' object)")
    return data


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of one ``samples_*.jsonl`` file."""
    try:
        with path.open(encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise OutputError(f"{path}: not a readable samples file ({brief(str(error), 120)})") from None
