"""The data shipped inside the package: every file listed in PROVENANCE.md with its sha256, licences present."""

from __future__ import annotations

import hashlib
import re

from lm_eval_steer.core.paths import PACKAGED_DATA

ROW = re.compile(r"^\| `(?P<file>[^`]+)` \| (?P<size>[\d,]+) \| `(?P<sha>[0-9a-f]{64})` \|$")


def listed() -> dict[str, tuple[int, str]]:
    rows = (ROW.match(line) for line in (PACKAGED_DATA / "PROVENANCE.md").read_text().splitlines())
    return {row["file"]: (int(row["size"].replace(",", "")), row["sha"]) for row in rows if row}


def test_every_packaged_data_file_matches_its_provenance_entry_and_none_is_unlisted() -> None:
    on_disk = {path.relative_to(PACKAGED_DATA).as_posix(): path for path in PACKAGED_DATA.rglob("*") if path.is_file() and path.name != "PROVENANCE.md"}
    table = listed()
    assert set(on_disk) == set(table)
    for name, path in on_disk.items():
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == table[name], name


def test_each_source_carries_its_licence() -> None:
    assert "MIT License" in (PACKAGED_DATA / "seed" / "LICENSE.txt").read_text()
    for folder in ("ifeval", "nltk"):
        assert "Apache License" in (PACKAGED_DATA / folder / "LICENSE.txt").read_text()
    assert {"ifeval/input_data.jsonl", "seed/ifeval_wo_instructions.jsonl", "nltk/tokenizers/punkt_tab/english/ortho_context.tab"} <= set(listed())


def test_nothing_in_the_product_or_its_tests_reads_a_data_folder_beside_the_checkout() -> None:
    from conftest import REPO_ROOT

    sources = [path for folder in ("lm_eval_steer", "vector_builder", "tasks", "tests", "benchmarks") for path in (REPO_ROOT / folder).rglob("*.py")]
    assert sources
    offenders = [str(path.relative_to(REPO_ROOT)) for path in sources if path.name != "test_data.py" and "shared/data" in path.read_text(encoding="utf-8")]
    assert offenders == []
