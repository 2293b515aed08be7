"""The shared helpers every part uses: the offline data directory and the one-line CLI error."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm_eval_steer import paths
from lm_eval_steer.console import fail


def test_data_dir_comes_from_the_environment_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.DATA_ENV, "mine")
    assert paths.local_data_dir() == Path("mine")
    assert paths.find_data_dir() == tmp_path / "mine"  # absolute: subprocesses may run elsewhere
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(paths.DataMissingError, match="is not a directory"):
        paths.find_data_dir()


def test_data_dir_defaults_to_shared_data_beside_a_checkout_or_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    checkout, elsewhere = tmp_path / "repo", tmp_path / "deep" / "cwd"
    checkout.mkdir()
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    assert paths.local_data_dir() is None and paths.find_data_dir(checkout) is None
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert paths.find_data_dir(checkout) == tmp_path / "shared" / "data"  # beside the checkout
    monkeypatch.chdir(checkout)
    assert paths.find_data_dir() == tmp_path / "shared" / "data"  # beside the working directory
    assert paths.local_data_dir() is None  # the tasks never guess: unset means the hub


def test_cli_errors_are_one_line_on_stderr_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail("gguf", KeyError("fmt.safetensors: no entry named 'x'")) == 2
    assert fail("check", ValueError("first line\n  second line")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "lm-eval-steer gguf: error: fmt.safetensors: no entry named 'x'",
        "lm-eval-steer check: error: first line; second line",
    ]
