"""Residual hooks on tiny random models: layer discovery, exact projection, KV cache, padding, positions."""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import build_tiny_llama

from lm_eval_steer.runtime.hooks import SteeringError, find_decoder_layers, steering
from lm_eval_steer.runtime.interventions import unit
from lm_eval_steer.runtime.vectorfile import SteeringEntry

VOCAB = 300
HIDDEN = 64


@pytest.fixture(scope="module")
def model():
    return build_tiny_llama(VOCAB, num_layers=4, seed=0)


def entry(layer: int, mode: str = "project", strength: float = 4.0, positions: str = "all", seed: int = 1) -> SteeringEntry:
    generator = torch.Generator().manual_seed(seed)
    return SteeringEntry(f"e{seed}", torch.randn(HIDDEN, generator=generator), layer, mode, strength, positions)


def layer_inputs(model, layer: int, run) -> list[torch.Tensor]:
    """Hidden states entering ``layer`` (= the output of ``layer - 1`` after steering), one per forward."""
    seen: list[torch.Tensor] = []
    layers = find_decoder_layers(model)
    handle = layers[layer].register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return seen


def greedy(model, ids, mask, rows, new_tokens=12, use_cache=True, **options):
    with steering(model, rows, **options):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[:, ids.shape[1] :]


def tiny_config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=4, intermediate_size=128)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=3, n_head=4, n_positions=128)
    if kind == "gemma3":
        return transformers.Gemma3TextConfig(**common, num_hidden_layers=3, num_key_value_heads=2, head_dim=16)
    config_class = {
        "qwen2": transformers.Qwen2Config,
        "gemma2": transformers.Gemma2Config,
        "mistral": transformers.MistralConfig,
        "phi3": transformers.Phi3Config,
    }[kind]
    extra = {"head_dim": 16} if kind == "gemma2" else {}
    return config_class(**common, num_hidden_layers=3, num_key_value_heads=2, pad_token_id=0, **extra)


@pytest.mark.parametrize("kind", ["gpt2", "qwen2", "gemma2", "gemma3", "mistral", "phi3"])
def test_discovery_and_steering_work_across_architectures(kind):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(kind)).eval()
    layers = find_decoder_layers(model)
    assert len(layers) == 3
    ids = torch.randint(1, VOCAB, (2, 6))
    steer = entry(layer=1, strength=5.0)
    with torch.no_grad():
        plain = model(ids).logits
        with steering(model, [[steer], []], skip_first_token=False):
            steered = model(ids).logits
        inputs = layer_inputs(model, 2, lambda: _steered_forward(model, ids, steer))
    assert not torch.allclose(plain[0], steered[0]), "row 0 should be steered"
    assert torch.allclose(plain[1], steered[1], atol=1e-5), "row 1 has no entries and must not change"
    u = unit(steer.vector)
    assert torch.allclose(inputs[0][0] @ u, torch.full((6,), 5.0), atol=1e-3)


def _steered_forward(model, ids, steer):
    with torch.no_grad(), steering(model, [[steer], []], skip_first_token=False):
        model(ids)


def test_project_sets_component_exactly_and_nothing_changes_before_the_layer(model):
    ids = torch.randint(1, VOCAB, (1, 9))
    steer = entry(layer=2, strength=-3.0)
    run_plain = lambda: model(ids)  # noqa: E731
    with torch.no_grad():
        before_plain = layer_inputs(model, 2, run_plain)[0]
        after_plain = layer_inputs(model, 3, run_plain)[0]
        with steering(model, [[steer]], skip_first_token=True):
            before = layer_inputs(model, 2, lambda: model(ids))[0]
        with steering(model, [[steer]], skip_first_token=True):
            after = layer_inputs(model, 3, lambda: model(ids))[0]
    u = unit(steer.vector)
    assert torch.equal(before, before_plain), "layers before the steered one must be untouched"
    assert torch.allclose(after[0, 1:] @ u, torch.full((8,), -3.0), atol=1e-4)
    assert torch.equal(after[0, 0], after_plain[0, 0]), "the first (sink) token is left alone by default"


def test_greedy_with_cache_equals_without_cache_under_steering(model):
    ids = torch.randint(1, VOCAB, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    rows = [[entry(1, strength=6.0)], [entry(2, "add", 3.0, seed=2)], [entry(1, "ablate", 0.0, seed=3), entry(3, "add", 2.0, seed=4)]]
    with_cache = greedy(model, ids, mask, rows, use_cache=True)
    without_cache = greedy(model, ids, mask, rows, use_cache=False)
    assert torch.equal(with_cache, without_cache)
    assert not torch.equal(with_cache, greedy(model, ids, mask, [[], [], []])), "steering should change something"


@pytest.mark.parametrize("positions", ["all", "prompt", "generated"])
def test_unpadded_greedy_with_cache_equals_without_cache(model, positions):
    # generate() passes no attention mask when nothing is padded; a call without the KV cache then
    # re-reads the whole sequence, which the hooks must tell from a one-column cached step
    ids = torch.randint(1, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    rows = [[entry(1, "add", 5.0, positions)]]
    with_cache = greedy(model, ids, torch.ones_like(ids), rows, use_cache=True)
    assert torch.equal(with_cache, greedy(model, ids, torch.ones_like(ids), rows, use_cache=False))
    assert not torch.equal(with_cache, greedy(model, ids, torch.ones_like(ids), [[]]))


def test_padded_batch_equals_each_row_alone(model):
    torch.manual_seed(5)
    prompts = [torch.randint(1, VOCAB, (n,)) for n in (4, 9, 6)]
    rows = [[entry(1, strength=6.0)], [], [entry(2, "add", 4.0, seed=2)]]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = prompt
        mask[i, width - len(prompt) :] = 1
    batched = greedy(model, ids, mask, rows)
    for i, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], torch.ones(1, len(prompt), dtype=torch.long), [rows[i]])
        assert torch.equal(batched[i], alone[0]), f"row {i} differs from its single run"


def test_positions_generated_leaves_prompt_alone_and_prompt_leaves_generation_alone(model):
    ids = torch.randint(1, VOCAB, (1, 8))
    full = torch.cat([ids, torch.randint(1, VOCAB, (1, 4))], dim=1)
    with torch.no_grad():
        plain = layer_inputs(model, 2, lambda: model(full))[0]
        for positions, changed in (("generated", slice(8, 12)), ("prompt", slice(1, 8))):
            steer = entry(1, "add", 5.0, positions)
            with steering(model, [[steer]], prompt_lengths=[8]):
                steered = layer_inputs(model, 2, lambda: model(full))[0]
            moved = (steered - plain).norm(dim=-1)[0] > 1e-4
            expected = torch.zeros(12, dtype=torch.bool)
            expected[changed] = True
            assert moved.tolist() == expected.tolist(), positions
    # generation: with positions=generated the first new token comes from an unsteered prompt
    mask = torch.ones_like(ids)
    plain_tokens = greedy(model, ids, mask, [[]])
    generated_only = greedy(model, ids, mask, [[entry(1, "add", 40.0, "generated")]])
    assert generated_only[0, 0] == plain_tokens[0, 0]
    assert not torch.equal(generated_only, plain_tokens)


def test_composition_same_layer_adds_and_layers_compose(model):
    ids = torch.randint(1, VOCAB, (1, 6))
    a, b = entry(1, "add", 2.0, seed=1), entry(1, "add", 3.0, seed=2)
    summed = SteeringEntry("sum", 2.0 * a.vector + 3.0 * b.vector, 1, "add", 1.0)
    with torch.no_grad():
        with steering(model, [[a, b]]):
            both = model(ids).logits
        with steering(model, [[summed]]):
            single = model(ids).logits
        with steering(model, [[a, entry(3, "project", 1.0, seed=3)]]):
            two_layers = model(ids).logits
    assert torch.allclose(both, single, atol=1e-5)
    assert not torch.allclose(both, two_layers)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_are_steered_in_their_dtype(dtype):
    model = build_tiny_llama(VOCAB, num_layers=3, seed=1).to(dtype)
    ids = torch.randint(1, VOCAB, (2, 5))
    steer = entry(1, strength=4.0)
    with torch.no_grad():
        inputs = layer_inputs(model, 2, lambda: _steered_forward(model, ids, steer))
    assert inputs[0].dtype == dtype
    assert torch.allclose((inputs[0][0].float() @ unit(steer.vector)), torch.full((5,), 4.0), atol=0.1)


def test_bad_configurations_raise_clear_errors(model):
    ids = torch.randint(1, VOCAB, (2, 4))
    with pytest.raises(SteeringError, match="layer 7 is out of range: the model has 4 layers"):
        with steering(model, [[entry(7)], []]):
            pass
    with pytest.raises(SteeringError, match="set up for 3 rows but the model got a batch of 2"):
        with steering(model, [[entry(1)], [], []]):
            model(ids)
    wrong = SteeringEntry("w", torch.ones(HIDDEN + 1), 1, "add", 1.0)
    with pytest.raises(SteeringError, match="hidden size is 64"):
        with steering(model, [[wrong], []]):
            pass


def test_hooks_are_removed_after_the_block(model):
    ids = torch.randint(1, VOCAB, (1, 5))
    with torch.no_grad():
        before = model(ids).logits
        with steering(model, [[entry(1, "add", 50.0)]]):
            pass
        after = model(ids).logits
    assert torch.equal(before, after)
    assert not any(layer._forward_hooks for layer in find_decoder_layers(model))
