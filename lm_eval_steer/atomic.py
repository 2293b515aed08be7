"""Atomic file writes: readers (and interrupted runs) see the old file or the new one, never half of one.

Every file the package writes (vector files, build reports and checkpoints, leaderboards, quality
reports, benchmark results) goes through here. It imports nothing from the package, so the lowest
layer (the vector file format) can use it too.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


def atomic_write(path: PathLike, write: Callable[[str], Any]) -> None:
    """Calls ``write(temp_path)`` then renames the temp file over ``path`` (parents are created)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    try:
        write(temp_name)
        # mkstemp creates the file 0600; give it the permissions a plain open() would have
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> None:
    """Writes ``text`` as UTF-8, atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda temp: Path(temp).write_bytes(data))


def write_json(path: PathLike, payload: Any, *, indent: int | None = 2) -> None:
    """Writes ``payload`` as JSON (UTF-8, non-ASCII kept as is) plus a final newline, atomically."""
    write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False) + "\n")
