"""The project's own regression gate: a small deterministic steered run of the packaged SmolLM2 with
its recommended vector file (``vectors=smollm2-135m-instruct``, by name), checked by
``lm-eval-steer check`` against the committed baseline ``tests/baselines/smollm2-gate.json`` (any
drop fails: greedy CPU decoding is deterministic).

Eight documents, chosen so that steering is exercised: two routed to learned format vectors
(``punctuation:no_comma``, ``change_case:english_lowercase``) and one format document the file has no
vector for (``multiple_sections``), two routed to the ``number_sentences`` length vector and one
unrouted length document (``number_words``), and two keyword-inclusion documents routed to token
vectors with a ``stop_after`` rule. The indices are sorted: lm-eval 0.4.13 labels logged samples by their position in
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

BASELINE = REPO_ROOT / "tests" / "baselines" / "smollm2-gate.json"
VECTORS = "smollm2-135m-instruct"
SAMPLES = {"ifeval_format_noinst": [0, 1, 9], "ifeval_length_noinst": [0, 8, 10], "ifeval_keywords_include_noinst": [0, 1]}
UNROUTED = {"ifeval_format_noinst": 9, "ifeval_length_noinst": 0}


def test_the_gate_documents_are_routed_as_described() -> None:
    from lm_eval_steer.core.ifeval import subset_docs
    from lm_eval_steer.core.paths import packaged_vector_files
    from lm_eval_steer.runtime.routing import entries_for_document
    from lm_eval_steer.runtime.vectorfile import load_vector_file

    vector_file = load_vector_file(packaged_vector_files()[VECTORS])
    for task, indices in SAMPLES.items():
        docs = subset_docs(task.removeprefix("ifeval_").removesuffix("_noinst"), noinst=True)
        routed = {index: bool(entries_for_document(docs[index], [vector_file], "auto")) for index in indices}
        assert routed == {index: index != UNROUTED.get(task) for index in indices}, task


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    environment = {**{k: v for k, v in os.environ.items() if k != "LM_EVAL_STEER_DATA"}, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # cwd outside the checkout: the installed package must be what runs, not the source folder
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900, cwd=cwd)


@pytest.mark.slow
def test_steered_smollm2_does_not_regress_against_the_committed_baseline(tmp_path):
    output = tmp_path / "gate"
    lm_eval = [sys.executable, "-m", "lm_eval_steer"]
    completed = _run(
        [
            *lm_eval,
            "--model", "steered-hf",
            "--model_args", f"pretrained={smollm2_dir()},gguf_file={SMOL_GGUF},vectors={VECTORS}",
            "--device", "cpu",
            "--tasks", ",".join(SAMPLES),
            "--samples", json.dumps(SAMPLES),
            "--apply_chat_template",
            "--gen_kwargs", "max_gen_toks=96",
            "--batch_size", "8",
            "--output_path", str(output),
        ],
        tmp_path,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    (results,) = output.rglob("results_*.json")
    if os.environ.get("LM_EVAL_STEER_UPDATE_BASELINE") == "1":
        BASELINE.parent.mkdir(exist_ok=True)
        shutil.copyfile(results, BASELINE)
        pytest.skip(f"baseline refreshed: {BASELINE}")
    steering = json.loads(results.read_text())["config"]["steering"]
    assert [Path(f["path"]).name for f in steering["vector_files"]] == [f"{VECTORS}.safetensors"]
    gate = _run([*lm_eval, "check", str(results), "--baseline", str(BASELINE), "--tolerance", "0"], tmp_path)
    assert gate.returncode == 0, f"instruction following regressed against {BASELINE.name}:\n{gate.stdout}{gate.stderr[-2000:]}"
