"""The shared helpers every part uses: where the data is, and the one-line CLI error."""

from __future__ import annotations

from pathlib import Path

import pytest

from lm_eval_steer.core import paths
from lm_eval_steer.core.console import fail


def test_the_packaged_data_is_used_unless_the_environment_names_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    assert paths.data_dir() == paths.PACKAGED_DATA
    assert paths.data_file("ifeval/input_data.jsonl") == paths.PACKAGED_DATA / "ifeval" / "input_data.jsonl"
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(paths.DATA_ENV, "mine")
    assert paths.data_dir() == tmp_path / "mine"  # absolute: subprocesses may run elsewhere
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path / "absent"))
    with pytest.raises(paths.DataMissingError, match="is not a directory"):
        paths.data_dir()


def test_no_data_is_guessed_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shared" / "data" / "ifeval").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "shared")
    monkeypatch.delenv(paths.DATA_ENV, raising=False)
    assert paths.data_dir() == paths.PACKAGED_DATA


def test_a_missing_data_file_is_named_with_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(paths.DATA_ENV, str(tmp_path))
    with pytest.raises(paths.DataMissingError, match=r"seed/x\.jsonl: not found \(LM_EVAL_STEER_DATA=.*unset it"):
        paths.data_file("seed/x.jsonl")
    monkeypatch.delenv(paths.DATA_ENV)
    monkeypatch.setattr(paths, "PACKAGED_DATA", tmp_path / "broken")
    with pytest.raises(paths.DataMissingError, match=r"broken/seed/x\.jsonl: packaged data file missing; .*reinstall"):
        paths.data_file("seed/x.jsonl")


def test_cli_errors_are_one_line_on_stderr_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert fail("gguf", KeyError("fmt.safetensors: no entry named 'x'")) == 2
    assert fail("check", ValueError("first line\n  second line")) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "lm-eval-steer gguf: error: fmt.safetensors: no entry named 'x'",
        "lm-eval-steer check: error: first line; second line",
    ]
