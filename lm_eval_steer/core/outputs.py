"""Where lm-eval writes a run's files, and reading them: shared by the runtime and ``analysis/``.

lm-eval's ``--output_path DIR`` writes ``DIR/<model_name_sanitized>/results_<date>.json`` and, with
``--log_samples``, ``samples_<task>_<date>.jsonl`` next to it (same ``<date>``). ``--output_path
x.json`` writes ``x_<date>.json`` instead. A samples file may also be kept gzip-compressed as
``samples_<task>_<date>.jsonl.gz`` (committed baselines are). This module only locates and parses those files; what
their contents mean is up to the caller (``analysis/results.py`` for comparing runs,
``runtime/reuse.py`` for reusing a baseline's answers). It imports nothing from the package but the error types.
"""

from __future__ import annotations

import gzip
import json
import re
import stat
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from lm_eval_steer.core.errors import UserError, brief

_RESULTS_NAME = re.compile(r"^results_(?P<date>.+)\.json$")
#: Suffixes of a samples file, in order of preference: a plain file wins over its compressed copy
#: (the one a user may just have decompressed to inspect or fix).
SAMPLES_SUFFIXES = (".jsonl", ".jsonl.gz")


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
    if not path.is_dir():
        require_regular_file(path)
        return [path]
    candidates = sorted(path.glob("results_*.json")) + sorted(path.glob("*/results_*.json"))
    newest: dict[Path, Path] = {}
    for candidate in candidates:
        current = newest.get(candidate.parent)
        if current is None or candidate.name > current.name:
            newest[candidate.parent] = candidate
    if not newest:
        raise OutputError(f"{path}: no results_*.json in it or in its subdirectories")
    return sorted(newest.values())


def require_regular_file(path: Path) -> None:
    """Refuses ``path`` unless it is a regular file (or a link to one), before anything opens it:
    opening a FIFO for reading waits for a writer, so it must be told apart from a missing file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise OutputError(f"{path}: no such file or directory") from None
    except OSError as error:
        raise OutputError(f"{path}: cannot be read ({error.strerror or error})") from None
    if not stat.S_ISREG(mode):
        raise OutputError(f"{path}: is not a regular file")


def find_sample_files(results_file: Path, tasks: Iterable[str]) -> dict[str, Path]:
    """``samples_<task>_<date>.jsonl`` (or ``.jsonl.gz``) written by the same run as ``results_file``, per task."""
    stamp = date_id(results_file)
    if stamp is None:
        return {}
    found = {}
    for task in tasks:
        candidates = (results_file.parent / f"samples_{task}_{stamp}{suffix}" for suffix in SAMPLES_SUFFIXES)
        path = next((candidate for candidate in candidates if candidate.is_file()), None)
        if path is not None:
            found[task] = path
    return found


def read_results_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or an OutputError naming the file and the reason."""
    require_regular_file(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise OutputError(f"{path}: not a readable results JSON ({brief(str(error), 120)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise OutputError(f"{path}: not an lm-eval results file (no 'results' object)")
    return data


def _open_text(path: Path) -> IO[str]:
    """``path`` opened as UTF-8 text, decompressed on the fly when its name ends in ``.gz``."""
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else path.open(encoding="utf-8")


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of one ``samples_*.jsonl`` (or ``.jsonl.gz``) file, one per non-blank line."""
    require_regular_file(path)
    rows: list[dict[str, Any]] = []
    number = 0
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    rows.append(json.loads(line))
                    if not isinstance(rows[-1], dict):
                        raise ValueError(f"a JSON {type(rows[-1]).__name__}, not an object")
    # EOFError and zlib.error: a truncated or damaged .gz (a bad gzip header is an OSError).
    except (OSError, EOFError, zlib.error, UnicodeDecodeError, ValueError, RecursionError) as error:
        where = f" line {number}" if number else ""
        raise OutputError(f"{path}{where}: not a readable samples file ({brief(str(error), 120)})") from None
    return rows
