"""Content hashes of files: how runs record exactly which vector file or results file they used."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

BLOCK = 1 << 20


def file_sha256(path: str | os.PathLike[str], progress: Callable[[int], object] | None = None) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks so that large files (models) stay out of
    memory; ``progress`` (e.g. a tqdm bar's ``update``) is called with each block's size."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)
            if progress is not None:
                progress(len(block))
    return digest.hexdigest()
