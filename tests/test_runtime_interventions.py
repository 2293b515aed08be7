"""The pure tensor math: add, project, ablate and position masks."""

from __future__ import annotations

import torch

from lm_eval_steer.runtime import interventions


def test_add_only_touches_masked_positions_of_each_row():
    x = torch.randn(2, 3, 4)
    vector = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    mask = torch.tensor([[True, False, True], [True, True, True]])
    out = interventions.add(x, vector, torch.tensor([2.0, 5.0]), mask)
    expected = x.clone()
    expected[0, [0, 2], 0] += 2.0
    assert torch.equal(out, expected)


def test_project_sets_component_to_strength_and_keeps_orthogonal_part():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16) * 100
    u = interventions.unit(torch.randn(2, 16))
    mask = torch.ones(2, 5, dtype=torch.bool)
    out = interventions.project(x, u, torch.tensor([3.0, -7.0]), mask)
    component = (out * u[:, None, :]).sum(-1)
    assert torch.allclose(component, torch.tensor([[3.0] * 5, [-7.0] * 5]), atol=1e-3)
    orthogonal_before = x - (x * u[:, None]).sum(-1, keepdim=True) * u[:, None]
    orthogonal_after = out - component[..., None] * u[:, None]
    assert torch.allclose(orthogonal_before, orthogonal_after, atol=1e-3)


def test_project_in_bfloat16_keeps_dtype_and_hits_strength():
    x = (torch.randn(1, 4, 32) * 10).to(torch.bfloat16)
    u = interventions.unit(torch.randn(1, 32))
    out = interventions.project(x, u, torch.tensor([2.0]), torch.ones(1, 4, dtype=torch.bool))
    assert out.dtype == torch.bfloat16
    assert torch.allclose((out.float() * u[:, None]).sum(-1), torch.full((1, 4), 2.0), atol=0.25)


def test_ablate_removes_component_and_zero_direction_is_identity():
    x = torch.randn(2, 3, 8)
    u = torch.stack([interventions.unit(torch.randn(8)), torch.zeros(8)])
    out = interventions.ablate(x, u, torch.ones(2, 3, dtype=torch.bool))
    assert torch.allclose((out[0] * u[0]).sum(-1), torch.zeros(3), atol=1e-5)
    assert torch.equal(out[1], x[1])


def test_unit_normalises_and_keeps_zero():
    out = interventions.unit(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[0.6, 0.8], [0.0, 0.0]]))


def test_position_mask_prompt_generated_padding_and_first_token():
    # row 0: two pads, then 3 prompt tokens, then 2 generated; row 1: 5 prompt tokens, then 2 generated
    attention = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    prompt_length = torch.tensor([5, 5])
    all_positions = interventions.position_mask(attention, prompt_length, 7, "all", skip_first_token=False)
    assert all_positions.tolist() == [[False, False, True, True, True, True, True], [True] * 7]
    no_sink = interventions.position_mask(attention, prompt_length, 7, "all", skip_first_token=True)
    assert no_sink.tolist() == [[False, False, False, True, True, True, True], [False] + [True] * 6]
    prompt = interventions.position_mask(attention, prompt_length, 7, "prompt", skip_first_token=False)
    assert prompt.tolist() == [[False, False, True, True, True, False, False], [True] * 5 + [False] * 2]
    # a decoding step only sees its last column
    generated_step = interventions.position_mask(attention, prompt_length, 1, "generated", skip_first_token=True)
    assert generated_step.tolist() == [[True], [True]]
