"""Atomic file writes: readers (and interrupted runs) see the old file or the new one, never half of one.

Every file the package writes (vector files, build reports and checkpoints, leaderboards, quality
reports, benchmark results) goes through here. A write that fails (disk full, no permission) raises
:class:`WriteError` naming the target, never the temporary file, and leaves no temporary file
behind; :func:`remove_leftovers` clears those of a process that was killed mid-write. It imports
nothing from the package but :mod:`lm_eval_steer.core.errors`, so the lowest layer (the vector file
format) can use it too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from lm_eval_steer.core.errors import UserError, one_line

PathLike = str | os.PathLike[str]


class WriteError(UserError, OSError):
    """A file could not be written; the message names the target file and the reason."""


def _write_error(target: Path, error: BaseException, temp_name: str | None = None) -> WriteError:
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    if temp_name is not None:
        reason = reason.replace(temp_name, str(target))
    return WriteError(f"{target}: cannot be written ({one_line(reason, 160)})")


def _temp_file(target: Path) -> str:
    """A new empty temporary file next to ``target`` (its parents created)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except (FileExistsError, NotADirectoryError):
        raise WriteError(f"{target}: cannot be written (a parent path is a file, not a directory)") from None
    except OSError as error:
        raise _write_error(target, error) from None
    os.close(handle)
    return temp_name


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> None:
    """Calls ``write(temp_path)`` then renames the temp file over ``path`` (parents are created)."""
    target = Path(path)
    if target.is_dir():
        raise WriteError(f"{target}: is a directory, not a file to write")
    temp_name = _temp_file(target)
    try:
        write(temp_name)
        # mkstemp creates the file 0600; give it the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        os.replace(temp_name, target)
    except BaseException as error:
        Path(temp_name).unlink(missing_ok=True)
        if isinstance(error, (OSError, SafetensorError)) and not isinstance(error, UserError):
            raise _write_error(target, error, temp_name) from None
        raise


def check_writable(path: PathLike) -> None:
    """Raises :class:`WriteError` unless :func:`atomic_write` can write ``path`` (checked by creating
    and removing a temporary file next to it), so a long job can fail before it starts."""
    target = Path(path)
    if target.is_dir():
        raise WriteError(f"{target}: is a directory, not a file to write")
    Path(_temp_file(target)).unlink()


def remove_leftovers(directory: PathLike, name: str = "*") -> list[Path]:
    """Removes the temporary files that killed writes of ``directory/name`` (a glob: ``*`` for every
    file) left behind; returns them."""
    found = sorted(Path(directory).glob(f".{name}.*.tmp")) if Path(directory).is_dir() else []
    for leftover in found:
        leftover.unlink(missing_ok=True)
    return found


def write_text(path: PathLike, text: str) -> None:
    """Writes ``text`` as UTF-8, atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda temp: Path(temp).write_bytes(data))


def write_json(path: PathLike, payload: Any, *, indent: int | None = 2) -> None:
    """Writes ``payload`` as JSON (UTF-8, non-ASCII kept as is) plus a final newline, atomically."""
    write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")
