"""The project's own regression gate: a small deterministic steered run of the packaged SmolLM2 with
the shipped vectors, checked by ``lm-eval-steer check`` against the committed baseline
``tests/baselines/smollm2-gate.json`` (any drop fails: greedy CPU decoding is deterministic).

Six documents, chosen so that steering is exercised: two routed to learned format vectors
(``punctuation:no_comma``, ``change_case:english_lowercase``) and one unrouted format document
(``number_bullet_lists``), two routed to the ``number_sentences`` length vector and one unrouted
length document. The indices are sorted: lm-eval 0.4.13 labels logged samples by their position in
the ``--samples`` list, so unsorted indices would mislabel them. After an intended change of behaviour, refresh the baseline with

    LM_EVAL_STEER_UPDATE_BASELINE=1 pytest tests/test_ci_gate.py

and commit the new file with the change that explains it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, SMOL_GGUF, smollm2_dir

pytestmark = pytest.mark.slow

BASELINE = REPO_ROOT / "tests" / "baselines" / "smollm2-gate.json"
VECTORS = [REPO_ROOT / "vectors" / "smollm2-format-learned.safetensors", REPO_ROOT / "vectors" / "smollm2-length.safetensors"]
SAMPLES = {"ifeval_format_noinst": [0, 1, 2], "ifeval_length_noinst": [0, 8, 10]}


def _run(command: list[str], cwd: Path, data: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "LM_EVAL_STEER_DATA": str(data), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # cwd outside the checkout: the installed package must be what runs, not the source folder
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900, cwd=cwd)


def test_steered_smollm2_does_not_regress_against_the_committed_baseline(tmp_path, shared_data):
    output = tmp_path / "gate"
    lm_eval = [sys.executable, "-m", "lm_eval_steer"]
    completed = _run(
        [
            *lm_eval,
            "--model", "steered-hf",
            "--model_args", f"pretrained={smollm2_dir()},gguf_file={SMOL_GGUF},vectors={'+'.join(map(str, VECTORS))}",
            "--device", "cpu",
            "--tasks", ",".join(SAMPLES),
            "--samples", json.dumps(SAMPLES),
            "--apply_chat_template",
            "--gen_kwargs", "max_gen_toks=96",
            "--batch_size", "6",
            "--output_path", str(output),
        ],
        tmp_path,
        shared_data,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (results,) = output.rglob("results_*.json")
    if os.environ.get("LM_EVAL_STEER_UPDATE_BASELINE") == "1":
        BASELINE.parent.mkdir(exist_ok=True)
        shutil.copyfile(results, BASELINE)
        pytest.skip(f"baseline refreshed: {BASELINE}")
    steering = json.loads(results.read_text())["config"]["steering"]
    assert [Path(f["path"]).name for f in steering["vector_files"]] == [v.name for v in VECTORS]
    gate = _run([*lm_eval, "check", str(results), "--baseline", str(BASELINE), "--tolerance", "0"], tmp_path, shared_data)
    assert gate.returncode == 0, f"instruction following regressed against {BASELINE.name}:\n{gate.stdout}{gate.stderr[-2000:]}"
