"""``lm-eval-steer vectors``: the packaged files, what a file holds, and ``vectors=<name>``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from lm_eval_steer.core import paths
from lm_eval_steer.tools.vectors import catalog, describe, entry_rows
from lm_eval_steer.cli import main
from lm_eval_steer.tools.merge import merge
from lm_eval_steer.runtime.modelargs import parse_vector_paths
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, load_vector_file, save_vector_file

RECOMMENDED = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct", "qwen2.5-coder-0.5b-instruct": "Qwen/Qwen2.5-Coder-0.5B-Instruct"}


def test_each_model_has_one_packaged_file_and_vectors_holds_nothing_else() -> None:
    files = paths.packaged_vector_files()
    assert {name: load_vector_file(path).model for name, path in files.items()} == RECOMMENDED
    assert sorted(p.name for p in (REPO_ROOT / "vectors").iterdir() if p.name != "__pycache__") == sorted([*(f"{n}.safetensors" for n in RECOMMENDED), "README.md", "__init__.py"])


def test_the_committed_catalog_is_what_the_command_generates() -> None:
    assert (REPO_ROOT / "vectors" / "README.md").read_text() == catalog(), "regenerate: lm-eval-steer vectors catalog --out vectors/README.md"


def test_a_packaged_name_stands_for_its_file_and_paths_stay_paths(tmp_path: Path) -> None:
    files = paths.packaged_vector_files()
    assert parse_vector_paths("smollm2-135m-instruct") == [str(files["smollm2-135m-instruct"])]
    both = parse_vector_paths("smollm2-135m-instruct+qwen2.5-coder-0.5b-instruct")
    assert both == [str(files["smollm2-135m-instruct"]), str(files["qwen2.5-coder-0.5b-instruct"])]
    assert parse_vector_paths("missing/fmt.safetensors") == ["missing/fmt.safetensors"]  # the loader names it
    (tmp_path / "smollm2-135m-instruct").write_bytes(b"")  # an existing file wins over the name
    assert paths.resolve_vectors(str(tmp_path / "smollm2-135m-instruct")) == str(tmp_path / "smollm2-135m-instruct")


def test_an_unknown_name_is_refused_in_one_line_listing_the_packaged_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(paths.UnknownVectorName, match=r"vectors='smollm2': no such file, .*\(packaged: qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct\)"):
        parse_vector_paths("smollm2")
    assert main(["vectors", "show", "smollm2"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lm-eval-steer vectors: error: 'smollm2': no such file")  # a file argument, not vectors=
    assert main(["merge", "smollm2", "other.safetensors", "--out", "merged.safetensors"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lm-eval-steer merge: error: 'smollm2': no such file") and "packaged: " in line


def test_show_lists_every_entry_with_its_rule_method_and_source(tmp_path: Path) -> None:
    lower = SteeringEntry("lower", torch.ones(8), 1, "project", 2.5, "generated", AppliesTo("change_case:english_lowercase"))
    pie = SteeringEntry("keywords:existence:pie", torch.ones(8), 3, "add", 0.2, "all", AppliesTo("keywords:existence", {"keywords": ["pie"]}), stop_after=("pie",))
    built = tmp_path / "built.safetensors"
    save_vector_file(built, [lower, pie], model="tiny", hidden_size=8, num_layers=4, extra_metadata={"builder": json.dumps({"builder_version": 1, "method": "diffmean"}), "methods": json.dumps({"keywords:existence:pie": "token"})})
    rows = entry_rows(load_vector_file(built))
    assert rows[0][:9] == ["lower", "change_case:english_lowercase", "1", "project", "2.5", "generated", "—", "diffmean", "this file"]
    assert rows[1][:9] == ["keywords:existence:pie", "keywords:existence keywords=['pie']", "3", "add", "0.2", "all", "pie", "token", "this file"]
    merged, _ = merge([str(built)], str(tmp_path / "merged.safetensors"))
    assert [row[7:9] for row in entry_rows(load_vector_file(tmp_path / "merged.safetensors"))] == [["diffmean", "built.safetensors"], ["token", "built.safetensors"]]
    assert len({row[9] for row in rows}) == 1  # same tensor, same sha256
    # merged again with a rebuilt entry: each entry still names the file it was built in
    rebuilt = tmp_path / "rebuilt.safetensors"
    save_vector_file(rebuilt, [SteeringEntry("lower", torch.full((8,), 2.0), 2, "add", 1.0, "all", AppliesTo("change_case:english_lowercase"))], model="tiny", hidden_size=8, num_layers=4)
    merge([str(tmp_path / "merged.safetensors"), str(rebuilt)], str(tmp_path / "again.safetensors"))
    again = load_vector_file(tmp_path / "again.safetensors")
    assert {row[0]: row[8] for row in entry_rows(again)} == {"keywords:existence:pie": "built.safetensors", "lower": "rebuilt.safetensors"}
    assert "merged from built.safetensors, rebuilt.safetensors" in describe(again)


def test_show_names_the_method_of_an_entry_against_looping_through_a_merge(tmp_path: Path) -> None:
    against = SteeringEntry("title:anti-looping", torch.ones(8), 2, "add", -1.0, "generated", AppliesTo("detectable_format:title"))
    made = tmp_path / "anti-looping.safetensors"
    save_vector_file(made, [against], model="tiny", hidden_size=8, num_layers=4, extra_metadata={"anti_looping": json.dumps({"chosen": "L2 x1"})})
    assert entry_rows(load_vector_file(made))[0][7] == "anti-looping"
    merge([str(made)], str(tmp_path / "merged.safetensors"))
    assert entry_rows(load_vector_file(tmp_path / "merged.safetensors"))[0][7:9] == ["anti-looping", "anti-looping.safetensors"]


def test_show_and_list_print_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["vectors", "list"]) == 0
    listing = capsys.readouterr().out
    assert "smollm2-135m-instruct" in listing and "| 107 " in listing
    assert main(["vectors", "show", "smollm2-135m-instruct"]) == 0
    shown = capsys.readouterr().out
    assert "keywords:existence:Argentinian" in shown and "smollm2-keywords-token-delayed-writing.safetensors" in shown and "from token 16" in shown


def test_an_unknown_name_through_the_lm_eval_cli_is_one_line_exit_2_before_any_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "steered-hf", "--model_args", f"pretrained={tiny_model_dir},vectors=smollm2-135m", "--tasks", "ifeval_format", "--limit", "1"]
    run = subprocess.run(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert "vectors='smollm2-135m': no such file" in last and "packaged: qwen2.5-coder-0.5b-instruct, smollm2-135m-instruct" in last


def test_the_window_rule_column_names_strings_and_token_counts():
    import torch

    from lm_eval_steer.runtime.vectorfile import SteeringEntry
    from lm_eval_steer.tools.vectors import window_rule

    vector = torch.ones(4)
    assert window_rule(SteeringEntry("a", vector, 1)) == "—"
    assert window_rule(SteeringEntry("b", vector, 1, stop_after=("mom", "dad"))) == "mom, dad"
    assert window_rule(SteeringEntry("c", vector, 1, stop_after=("mom",), stop_after_tokens=40)) == "mom; after 40 tokens"
    assert window_rule(SteeringEntry("d", vector, 1, stop_after_tokens=40, start_after_tokens=4)) == "from token 4; after 40 tokens"


def test_a_reader_that_closes_the_pipe_ends_the_command_quietly() -> None:
    # `lm-eval-steer vectors show ... | head`: stdout is a pipe whose reader has gone.
    script = (
        "import os, sys\n"
        "read, write = os.pipe(); os.close(read); os.dup2(write, 1)\n"
        "from lm_eval_steer.cli import main\n"
        "sys.exit(main(['vectors', 'show', 'smollm2-135m-instruct']))\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 1
    assert "Traceback" not in finished.stderr and "BrokenPipeError" not in finished.stderr, finished.stderr


def test_exclude_keeps_the_chosen_entries_off_other_instructions_and_records_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    word = AppliesTo("keywords:existence")
    source = tmp_path / "al.safetensors"
    prose = SteeringEntry("keywords:existence:anti-looping", torch.ones(8), 2, "add", -1.5, "generated", word)
    lower = SteeringEntry("lower", torch.full((8,), 2.0), 1, "add", 1.0, "all", AppliesTo("change_case:english_lowercase"))
    save_vector_file(source, [prose, lower], model="tiny", hidden_size=8, num_layers=4, extra_metadata={"builder": "{}"})
    out = tmp_path / "kept-off.safetensors"
    assert main(["vectors", "exclude", str(source), "--entry", "keywords:*", "--not-with", "punctuation:no_comma, detectable_format:title", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "keywords:existence (not with punctuation:no_comma, detectable_format:title)" in printed and "1 of 2 entries changed" in printed
    written = load_vector_file(out)
    assert written.entry("keywords:existence:anti-looping").applies_to.not_with == ("punctuation:no_comma", "detectable_format:title")
    assert written.entry("lower").applies_to.not_with == ()  # not matched: unchanged
    for name in ("keywords:existence:anti-looping", "lower"):  # everything else kept as it was
        before, after = load_vector_file(source).entry(name), written.entry(name)
        assert torch.equal(before.vector, after.vector) and (before.layer, before.strength, before.positions) == (after.layer, after.strength, after.positions)
    assert written.extra_metadata["builder"] == "{}"
    (record,) = json.loads(written.extra_metadata["rerouted"])
    assert record == {"path": str(source), "sha256": load_vector_file(source).sha256, "entries": ["keywords:existence:anti-looping"], "not_with": ["punctuation:no_comma", "detectable_format:title"]}
    assert entry_rows(written)[0][1] == "keywords:existence (not with punctuation:no_comma, detectable_format:title)"
    # none clears the list again
    cleared = tmp_path / "cleared.safetensors"
    assert main(["vectors", "exclude", str(out), "--entry", "keywords:existence:anti-looping", "--not-with", "none", "--out", str(cleared)]) == 0
    assert load_vector_file(cleared).entry("keywords:existence:anti-looping").applies_to == word
    # '*': only prompts without another instruction
    alone = tmp_path / "alone.safetensors"
    assert main(["vectors", "exclude", str(source), "--entry", "keywords:existence:anti-looping", "--not-with", "*", "--out", str(alone)]) == 0
    assert load_vector_file(alone).entry("keywords:existence:anti-looping").applies_to.not_with == ("*",)
    assert "keywords:existence (not with *)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("entry", "not_with", "out", "message"),
    [
        ("nothing*", "punctuation:no_comma", "new", "no entry name matches 'nothing*'"),
        ("everyone", "punctuation:no_comma", "new", "entry 'everyone' serves every document (no applies_to)"),
        ("lower", "change_case:english_lowercase", "new", "entry 'lower': --not-with change_case:english_lowercase is its own instruction"),
        ("lower", "no_comma", "new", "--not-with 'no_comma': matches no IFEval instruction id"),
        ("lower", " , ", "new", "--not-with: give IFEval instruction ids"),
        ("lower", "punctuation:no_comma", "source", "is the input file"),
    ],
)
def test_exclude_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str], entry: str, not_with: str, out: str, message: str) -> None:
    source = tmp_path / "source.safetensors"
    lower = SteeringEntry("lower", torch.ones(8), 1, "add", 1.0, "all", AppliesTo("change_case:english_lowercase"))
    save_vector_file(source, [lower, SteeringEntry("everyone", torch.ones(8), 1)], model="tiny", hidden_size=8, num_layers=4)
    before = source.read_bytes()
    target = source if out == "source" else tmp_path / "new.safetensors"
    assert main(["vectors", "exclude", str(source), "--entry", entry, "--not-with", not_with, "--out", str(target)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("lm-eval-steer vectors: error: ") and message in line
    assert source.read_bytes() == before and not (tmp_path / "new.safetensors").exists()
