"""Registration: plain ``lm_eval``, ``lm-eval-steer`` and ``python -m lm_eval_steer`` all run ``steered-hf``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, save_vector_file

TASK_YAML = """\
task: tiny_instructions
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: ""
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory) -> Path:
    """A local generate_until task whose documents carry IFEval-style instruction ids."""
    directory = tmp_path_factory.mktemp("task")
    rows = [
        {"prompt": "Write a haiku about rain.", "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{}]},
        {"prompt": "Name three rivers.", "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{}]},
    ]
    data = directory / "data.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (directory / "tiny_instructions.yaml").write_text(TASK_YAML.format(data=data))
    return directory


@pytest.fixture(scope="module")
def vector_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vectors") / "fmt.safetensors"
    generator = torch.Generator().manual_seed(0)
    entry = SteeringEntry("lower", torch.randn(64, generator=generator), 2, "project", 5.0, "all", AppliesTo("change_case:english_lowercase"))
    save_vector_file(path, [entry], model="tiny-llama", hidden_size=64, num_layers=4)
    return path


def run_cli(command: list[str], output: Path) -> dict:
    # cwd outside the checkout: the installed package must be what runs, not the source folder
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300, cwd=output.parent)
    assert completed.returncode == 0, completed.stderr[-3000:]
    (results_file,) = output.rglob("results_*.json")
    return json.loads(results_file.read_text())


def harness_args(tiny_model_dir: Path, vector_file: Path, tiny_task: Path, output: Path) -> list[str]:
    return [
        "--model", "steered-hf",
        "--model_args", f"pretrained={tiny_model_dir},vectors={vector_file}",
        "--batch_size", "2",
        "--tasks", "tiny_instructions",
        "--include_path", str(tiny_task),
        "--output_path", str(output),
        "--log_samples",
    ]  # fmt: skip


def generations(output: Path) -> list[str]:
    (samples,) = output.rglob("samples_tiny_instructions_*.jsonl")
    return [json.loads(line)["resps"][0][0] for line in samples.read_text().splitlines()]


@pytest.mark.skipif(shutil.which("lm_eval") is None, reason="lm_eval console script not on PATH")
def test_plain_lm_eval_cli_finds_steered_hf_and_records_steering(tmp_path, tiny_model_dir, vector_file, tiny_task):
    output = tmp_path / "plain"
    results = run_cli(["lm_eval", *harness_args(tiny_model_dir, vector_file, tiny_task, output)], output)
    steering = results["config"]["steering"]
    assert steering["vector_files"][0]["sha256"] and steering["route"] == "auto"
    assert len(generations(output)) == 2

    # the same run through our own entry points gives the same generations
    module_output = tmp_path / "module"
    run_cli([sys.executable, "-m", "lm_eval_steer", *harness_args(tiny_model_dir, vector_file, tiny_task, module_output)], module_output)
    assert generations(module_output) == generations(output)


@pytest.mark.skipif(shutil.which("lm-eval-steer") is None, reason="lm-eval-steer console script not on PATH")
def test_lm_eval_steer_console_script_runs_the_harness(tmp_path, tiny_model_dir, vector_file, tiny_task):
    output = tmp_path / "console"
    results = run_cli(["lm-eval-steer", "run", *harness_args(tiny_model_dir, vector_file, tiny_task, output)], output)
    assert results["config"]["model"] == "steered-hf"


def test_start_up_hook_registers_lazily_and_cheaply():
    # The .pth hook must not import lm-eval (or torch) by itself ...
    code = "import sys, lm_eval_steer._autoload; print('lm_eval' in sys.modules, 'torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["False", "False"]
    # ... and registers the model as soon as the harness's registry is imported.
    # The harness's own models stay available beside ours.
    code = "import lm_eval_steer._autoload, lm_eval.api.registry as r; print('steered-hf' in r.model_registry, r.get_model('hf').__name__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split() == ["True", "HFLM"]
