"""Entries with ``stop_after`` stop steering a row once its generated text contains a stop string;
entries with ``stop_after_tokens`` once that many answer tokens were computed under them; entries
with ``start_after_tokens`` start only after that many answer tokens were written unsteered."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import build_tiny_llama

from lm_eval_steer.runtime import interventions
from lm_eval_steer.runtime.hooks import SteeringError, find_decoder_layers, steering
from lm_eval_steer.runtime.stopping import StopTracker
from lm_eval_steer.runtime.vectorfile import SteeringEntry

VOCAB = 300
HIDDEN = 64


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(VOCAB, num_layers=4, seed=0)


def kick(positions: str = "all", stop_after: tuple[str, ...] = (), strength: float = 30.0) -> SteeringEntry:
    vector = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(7))
    return SteeringEntry("kw", vector, 1, "add", strength, positions, stop_after=stop_after)


def as_text(ids: list[int]) -> str:
    """A decode whose text is the ids themselves: ``<5><17>...``, so a test can stop on any token."""
    return "".join(f"<{token}>" for token in ids)


def greedy(model, ids, rows, *, use_cache=True, decode=as_text, new_tokens=10):
    with steering(model, rows, decode=decode):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_positions_from_the_stop_token_on_are_not_steered():
    # 8 prompt columns, then generated tokens 11, 12, 13, 14: "<12>" is complete at column 9
    tracker = StopTracker(as_text)
    tokens = torch.tensor([[1] * 8 + [11, 12, 13, 14]])
    tracker.observe(tokens, torch.ones_like(tokens), torch.tensor([8]))
    assert tracker.steered([("<12>",)], 12).tolist() == [[True] * 9 + [False] * 3]
    assert tracker.steered([("<99>",)], 12).tolist() == [[True] * 12], "a string never written never stops"
    assert tracker.steered([()], 12).tolist() == [[True] * 12], "no stop strings: steered throughout"
    assert tracker.steered([("<1>",)], 12).tolist() == [[True] * 12], "the prompt's own text never stops steering"


def test_stop_strings_match_case_insensitively_and_across_tokens():
    pieces = {1: "The ", 2: "Mo", 3: "ther", 4: " said"}
    tracker = StopTracker(lambda ids: "".join(pieces[i] for i in ids))
    tokens = torch.tensor([[9, 1, 2, 3, 4]])
    tracker.observe(tokens, torch.ones_like(tokens), torch.tensor([1]))
    assert tracker.steered([("mother",)], 5).tolist() == [[True, True, True, False, False]]


def test_a_string_written_late_in_a_long_answer_is_found_where_it_ends():
    pieces = {1: "la ", 2: "Mo", 3: "ther", 4: "."}
    answer = [1] * 300 + [2, 3] + [4] * 5
    tracker = StopTracker(lambda ids: "".join(pieces[i] for i in ids))
    tokens = torch.tensor([[9] + answer])
    tracker.observe(tokens, torch.ones_like(tokens), torch.tensor([1]))
    keep = tracker.steered([("mother",)], tokens.shape[1])[0]
    assert keep.tolist() == [True] * 302 + [False] * 6  # column 302 reads "ther", completing the word


def test_cache_and_one_token_chunks_give_the_same_masks_as_one_full_pass():
    tokens = torch.tensor([[1, 2, 3, 11, 12, 13, 14], [0, 4, 5, 12, 16, 17, 18]])
    mask = torch.tensor([[1] * 7, [0] + [1] * 6])
    stops = [("<13>",), ("<12>",)]
    full = StopTracker(as_text)
    full.observe(tokens, mask, torch.tensor([3, 3]))
    expected = full.steered(stops, 7)
    stepwise = StopTracker(as_text)
    stepwise.observe(tokens[:, :3], mask[:, :3], torch.tensor([3, 3]))
    chunks = [stepwise.steered(stops, 3)]
    for column in range(3, 7):
        stepwise.observe(tokens[:, column : column + 1], mask[:, : column + 1], torch.tensor([3, 3]))
        chunks.append(stepwise.steered(stops, 1))
    assert torch.equal(torch.cat(chunks, dim=1), expected)
    assert expected.tolist() == [[True] * 5 + [False] * 2, [True] * 3 + [False] * 4]


def test_layer_is_steered_up_to_the_column_that_reads_the_stop_token(model):
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    stop = f"<{int(ids[0, 9])}>"  # the second generated column's input token (assumed not in columns 8)
    assert f"<{int(ids[0, 8])}>" != stop
    seen: list[torch.Tensor] = []
    layer = find_decoder_layers(model)[2]
    handle = layer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
            with steering(model, [[kick(stop_after=(stop,))]], prompt_lengths=[8], decode=as_text):
                model(ids)
    finally:
        handle.remove()
    moved = ((seen[1] - seen[0]).norm(dim=-1)[0] > 1e-4).tolist()
    assert moved == [False] + [True] * 8 + [False] * 3  # first token skipped; columns 9.. stopped


def test_generation_stops_steering_once_the_string_is_written(model):
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    always = greedy(model, ids, [[kick()]])
    prompt_only = greedy(model, ids, [[kick("prompt")]])
    assert always != prompt_only, "the kick must change generation for this test to mean anything"
    # a stop string written by the first generated token: every generated position is left alone
    assert greedy(model, ids, [[kick(stop_after=(f"<{always[0]}>",))]]) == prompt_only
    # a string never written: steered to the end, as without stop_after
    assert greedy(model, ids, [[kick(stop_after=("never",))]]) == always
    # stopping mid-answer: with and without the KV cache alike
    middle = (f"<{always[3]}>",)
    with_cache = greedy(model, ids, [[kick(stop_after=middle)]])
    assert with_cache == greedy(model, ids, [[kick(stop_after=middle)]], use_cache=False)
    assert with_cache[:4] == always[:4]


def test_stop_entries_share_a_batch_with_plain_and_other_stop_rows(model):
    generator = torch.Generator().manual_seed(5)
    prompts = torch.randint(1, VOCAB, (3, 6), generator=generator)
    alone = [greedy(model, prompts[i : i + 1], [rows]) for i, rows in enumerate([[kick()], [], [kick()]])]
    rows = [[kick(stop_after=(f"<{alone[0][2]}>",))], [], [kick(stop_after=(f"<{alone[2][5]}>",)), kick(strength=5.0)]]
    with steering(model, rows, decode=as_text):
        batched = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i in range(3):
        assert batched[i, 6:].tolist() == greedy(model, prompts[i : i + 1], [rows[i]]), f"row {i} differs from its single run"


def test_stop_after_needs_decode_and_token_ids(model):
    ids = torch.randint(1, VOCAB, (1, 5))
    with pytest.raises(SteeringError, match="entry 'kw' has stop_after, which needs the tokenizer's decode"):
        with steering(model, [[kick(stop_after=("x",))]]):
            pass
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(SteeringError, match="needs the model's input_ids"):
        with steering(model, [[kick(stop_after=("x",))]], decode=as_text), torch.no_grad():
            model(inputs_embeds=embeds)


# --------------------------------------------------------------------------- stop_after_tokens


def counted_kick(stop_after_tokens: int, positions: str = "all", strength: float = 30.0) -> SteeringEntry:
    return dataclasses.replace(kick(positions, strength=strength), stop_after_tokens=stop_after_tokens)


def test_the_answer_window_counts_from_the_prompt_end_in_whole_passes_and_chunks():
    attention = torch.tensor([[1] * 7, [0] + [1] * 6])  # row 1 is left-padded: its prompt still ends at column 3
    prompt = torch.tensor([3, 3])
    no_start = torch.zeros(2, dtype=torch.long)
    full = interventions.answer_window_mask(attention, prompt, 7, no_start, torch.tensor([2, 1]))
    assert full.tolist() == [[True] * 4 + [False] * 3, [True] * 3 + [False] * 4]  # t < 3 + n - 1
    stepwise = torch.cat([interventions.answer_window_mask(attention[:, : column + 1], prompt, 1, no_start, torch.tensor([2, 1])) for column in range(7)], dim=1)
    assert torch.equal(stepwise, full), "one column at a time (the KV cache) gives the same window"
    assert interventions.answer_window_mask(attention, prompt, 2, no_start, torch.tensor([2, 10])).tolist() == [[False, False], [True, True]]


def test_a_delayed_start_leaves_the_prompt_and_the_first_k_answer_tokens_alone():
    attention = torch.ones(2, 8, dtype=torch.long)
    prompt = torch.tensor([3, 3])
    starts, stops = torch.tensor([1, 2]), torch.tensor([1 << 40, 4])
    full = interventions.answer_window_mask(attention, prompt, 8, starts, stops)
    # row 0: 3 + 1 - 1 <= t (the pass reading token 0 on); row 1: 3 + 2 - 1 <= t < 3 + 4 - 1
    assert full.tolist() == [[False] * 3 + [True] * 5, [False] * 4 + [True] * 2 + [False] * 2]
    stepwise = torch.cat([interventions.answer_window_mask(attention[:, : column + 1], prompt, 1, starts, stops) for column in range(8)], dim=1)
    assert torch.equal(stepwise, full), "one column at a time (the KV cache) gives the same window"


def test_generation_steers_exactly_the_first_n_answer_tokens(model):
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    always = greedy(model, ids, [[kick()]])
    prompt_only = greedy(model, ids, [[kick("prompt")]])
    assert always != prompt_only, "the kick must change generation for this test to mean anything"
    assert greedy(model, ids, [[counted_kick(1)]]) == prompt_only  # only the prompt's last column computes token 0
    assert greedy(model, ids, [[counted_kick(100)]]) == always
    compared = 0
    for n in (2, 4):
        with_cache = greedy(model, ids, [[counted_kick(n)]])
        assert with_cache == greedy(model, ids, [[counted_kick(n)]], use_cache=False)
        assert with_cache[:n] == always[:n]
        if always[n - 1] not in always[: n - 1]:  # then the string rule on token n-1 stops at the same column
            assert with_cache == greedy(model, ids, [[kick(stop_after=(f"<{always[n - 1]}>",))]])
            compared += 1
    assert compared, "no n had a first-time token to compare the two rules on"
    assert greedy(model, ids, [[counted_kick(2)]]) != always, "steering must really end"


def test_token_limited_rows_share_a_batch_with_plain_and_string_stopped_rows(model):
    prompts = torch.randint(1, VOCAB, (4, 6), generator=torch.Generator().manual_seed(6))
    rows = [[counted_kick(3)], [], [counted_kick(5), kick(strength=5.0)], [kick(stop_after=("never",)), counted_kick(2, strength=-20.0)]]
    with steering(model, rows, decode=as_text):
        batched = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i in range(4):
        assert batched[i, 6:].tolist() == greedy(model, prompts[i : i + 1], [rows[i]]), f"row {i} differs from its single run"


def started_kick(start_after_tokens: int, stop_after_tokens: int | None = None, strength: float = 30.0) -> SteeringEntry:
    return dataclasses.replace(kick(strength=strength), start_after_tokens=start_after_tokens, stop_after_tokens=stop_after_tokens)


def test_generation_with_a_delayed_start_writes_the_first_k_tokens_unsteered(model):
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    unsteered, always = greedy(model, ids, [[]]), greedy(model, ids, [[kick()]])
    assert unsteered[0] != always[0], "the kick must change the first token for this test to mean anything"
    # start 1: the pass that reads answer token 0 is the first steered one, exactly positions=generated
    assert greedy(model, ids, [[started_kick(1)]]) == greedy(model, ids, [[kick("generated")]])
    changed = 0
    for k in (2, 4):
        with_cache = greedy(model, ids, [[started_kick(k)]])
        assert with_cache == greedy(model, ids, [[started_kick(k)]], use_cache=False)
        assert with_cache[:k] == unsteered[:k]
        changed += with_cache != unsteered
    assert changed, "steering must really start"
    window = greedy(model, ids, [[started_kick(2, 4)]])
    assert window[:2] == unsteered[:2] and window == greedy(model, ids, [[started_kick(2, 4)]], use_cache=False)


def test_delayed_rows_share_a_batch_with_plain_and_token_limited_rows(model):
    prompts = torch.randint(1, VOCAB, (4, 6), generator=torch.Generator().manual_seed(8))
    rows = [[started_kick(2)], [kick(strength=5.0)], [started_kick(3, 6), kick(strength=5.0)], [counted_kick(2), started_kick(1, strength=-20.0)]]
    with steering(model, rows, decode=as_text):
        batched = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i in range(4):
        assert batched[i, 6:].tolist() == greedy(model, prompts[i : i + 1], [rows[i]]), f"row {i} differs from its single run"


def test_stop_rules_off_drops_both_rules_and_the_rules_key_the_route():
    from lm_eval_steer.runtime.routing import Overrides, apply_overrides, route_key

    entry = dataclasses.replace(kick(stop_after=("mom",)), stop_after_tokens=8)
    off = apply_overrides(entry, Overrides(stop_rules=False))
    assert (off.stop_after, off.stop_after_tokens, off.can_stop) == ((), None, False)
    on = apply_overrides(entry, Overrides())
    assert (on.stop_after, on.stop_after_tokens) == (("mom",), 8)
    assert route_key([on]) != route_key([dataclasses.replace(on, stop_after_tokens=9)])
    assert route_key([on]) != route_key([dataclasses.replace(on, start_after_tokens=2)])
    delayed = apply_overrides(dataclasses.replace(entry, start_after_tokens=2), Overrides(stop_rules=False))
    assert delayed.start_after_tokens == 2, "a delayed start is not a stop rule: stop_rules=off keeps it"
