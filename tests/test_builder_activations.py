"""vector_builder.activations: left padding, and the last-token states of every layer from one pass,
summed per group of prompts (on a tiny random Llama)."""

from __future__ import annotations

import pytest
import torch

from vector_builder.activations import collect, last_token_states, left_pad, positions_from_mask


pytestmark = pytest.mark.usefixtures("one_thread")


def test_left_pad_and_positions():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert positions_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


def test_one_pass_all_layers_equals_per_layer_collection(tiny):
    model, tokenizer = tiny
    sequences = [tokenizer.encode(text) for text in ("a short one", "a rather longer prompt than the first", "mid size prompt")]
    ids, mask = left_pad(sequences, tokenizer.pad_token_id)
    all_layers = last_token_states(model, ids, mask)
    assert all_layers.shape == (3, 4, 64)
    for layer in range(4):
        torch.testing.assert_close(all_layers[:, layer], last_token_states(model, ids, mask, layers=[layer])[:, 0])
    with torch.no_grad():  # the harness's own per-layer hidden states agree (before the final norm)
        hidden = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), output_hidden_states=True).hidden_states
    for layer in range(3):
        torch.testing.assert_close(all_layers[:, layer], hidden[layer + 1][:, -1], atol=1e-4, rtol=1e-4)
    for row, seq in enumerate(sequences):  # left padding does not change a row's states
        alone = last_token_states(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
        torch.testing.assert_close(all_layers[row], alone[0], atol=1e-4, rtol=1e-4)


def test_collect_shares_prompts_and_matches_stacking(tiny):
    model, tokenizer = tiny
    a, b, c = ([tokenizer.encode(t)] for t in ("one", "two words", "three more words"))
    sums = collect(model, {"x": a + b, "y": b + c}, batch_size=2, pad_id=tokenizer.pad_token_id)
    assert sums["x"].count == 2 and sums["y"].count == 2
    stacked = torch.cat([last_token_states(model, *left_pad(s, tokenizer.pad_token_id)) for s in (a, b)])
    torch.testing.assert_close(sums["x"].total, stacked.double().sum(0), atol=1e-4, rtol=1e-4)
