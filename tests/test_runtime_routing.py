"""Routing rules on hand-made documents: ``applies_to`` with a kwargs filter and ``not_with``."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from lm_eval_steer.runtime.routing import entries_for_document, excluded, routes_to
from lm_eval_steer.runtime.vectorfile import AppliesTo, SteeringEntry, VectorFile

WORD, COMMA, LOWER, TITLE = "keywords:existence", "punctuation:no_comma", "change_case:english_lowercase", "detectable_format:title"
IDS = (WORD, COMMA, LOWER, TITLE)


def file_of(*entries: SteeringEntry) -> VectorFile:
    return VectorFile(model="tiny", hidden_size=4, num_layers=2, entries=entries)


def entry(name: str, applies_to: AppliesTo | None) -> SteeringEntry:
    return SteeringEntry(name, torch.ones(4), 1, "add", 2.0, "generated", applies_to)


def doc(*ids: str) -> dict:
    return {"instruction_id_list": list(ids), "kwargs": [{} for _ in ids]}


def test_an_entry_stays_off_documents_that_carry_a_not_with_instruction():
    prose = entry("prose", AppliesTo(WORD, not_with=(COMMA,)))
    vectors = [file_of(prose)]
    assert [e.name for e in entries_for_document(doc(WORD), vectors, "auto")] == ["prose"]
    assert [e.name for e in entries_for_document(doc(WORD, LOWER), vectors, "auto")] == ["prose"]
    assert entries_for_document(doc(WORD, COMMA), vectors, "auto") == ()
    assert entries_for_document(doc(COMMA, WORD), vectors, "auto") == ()  # order does not matter
    # route=all ignores applies_to altogether, exclusions included; route=none steers nothing
    assert [e.name for e in entries_for_document(doc(WORD, COMMA), vectors, "all")] == ["prose"]
    assert entries_for_document(doc(WORD), vectors, "none") == ()


def test_not_with_takes_globs_and_never_matches_the_entry_s_own_instruction():
    alone = [file_of(entry("alone", AppliesTo(WORD, not_with=("*",))))]
    assert [e.name for e in entries_for_document(doc(WORD), alone, "auto")] == ["alone"]
    assert entries_for_document(doc(WORD, TITLE), alone, "auto") == ()
    punctuation = [file_of(entry("p", AppliesTo(WORD, not_with=("punctuation:*",))))]
    assert entries_for_document(doc(WORD, COMMA), punctuation, "auto") == ()
    assert [e.name for e in entries_for_document(doc(WORD, LOWER), punctuation, "auto")] == ["p"]
    # "keywords:*" matches the entry's own id, which never counts
    assert [e.name for e in entries_for_document(doc(WORD), [file_of(entry("k", AppliesTo(WORD, not_with=("keywords:*",))))], "auto")] == ["k"]


def test_other_entries_of_an_excluded_document_still_steer_it():
    vectors = [file_of(entry("prose", AppliesTo(WORD, not_with=(COMMA,))), entry("comma", AppliesTo(COMMA)), entry("all", None))]
    assert [e.name for e in entries_for_document(doc(WORD, COMMA), vectors, "auto")] == ["comma", "all"]


@given(st.lists(st.sampled_from(IDS), max_size=4, unique=True), st.lists(st.sampled_from(IDS[1:]), min_size=1, max_size=3, unique=True))
# IDS[0] is the entry's own instruction: never listed (the file format refuses it)
def test_not_with_removes_exactly_the_documents_that_carry_one_of_its_ids(document_ids, not_with):
    """Served with the list ⟺ served without it and no listed id in the document."""
    plain, narrowed = AppliesTo(WORD), AppliesTo(WORD, not_with=tuple(not_with))
    document = doc(*document_ids)
    served_plain = bool(entries_for_document(document, [file_of(entry("e", plain))], "auto"))
    served_narrowed = bool(entries_for_document(document, [file_of(entry("e", narrowed))], "auto"))
    assert excluded(narrowed, document) == any(i in not_with for i in document_ids)
    assert served_narrowed == (served_plain and not any(i in not_with for i in document_ids))
    assert not excluded(plain, document)


@given(st.lists(st.sampled_from(IDS), max_size=4, unique=True), st.sampled_from(["auto", "all", "none"]), st.booleans())
def test_routes_to_is_the_rule_entries_for_document_applies(document_ids, route, alone):
    """The one routing predicate, which the unserved-instructions table shares, picks the same entries."""
    entries = (entry("for-all", None), entry("word", AppliesTo(WORD, not_with=("*",) if alone else None)), entry("comma", AppliesTo(COMMA)))
    chosen = [e.name for e in entries_for_document(doc(*document_ids), [file_of(*entries)], route)]
    assert chosen == [e.name for e in entries if routes_to(e.applies_to, doc(*document_ids), route)]
    if route == "auto":
        assert ("word" in chosen) == (WORD in document_ids and not (alone and len(document_ids) > 1))
