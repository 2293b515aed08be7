"""The learned method's optimisation: additive vectors trained with the model frozen.

Difference-of-means directions describe where the *prompt* representation moves when an instruction
is added; on small models that direction often does not carry the behaviour. Learned vectors are
optimised for the behaviour itself (context distillation into a vector, cf. BiPO and ReFT): given
examples ``(p, r)`` of a prompt *without* the instruction and a response ``r`` that follows it, and a
set of layers ``S`` (one layer, or several trained jointly),

    L(v) = − (1 / Σ|r|) Σ_(p, r) Σ_t log P(r_t | p, r_<t ; h_L ← h_L + v_L for every L in S)  +  λ Σ_L ‖v_L‖²

where ``h_L ← h_L + v_L`` is exactly the runtime's ``add`` intervention (:func:`lm_eval_steer.runtime.hooks.steering`:
the output of decoder layer ``L``, every real position but, with ``skip_first_token``, each row's
first one). Only the ``v_L`` receive gradients; the model's parameters are frozen for the duration and
keep no gradient buffers. Training stops early when the loss on held-out examples stops improving,
and the vectors of the best held-out step are kept. Vectors trained jointly share their optimisation
(one loss, one early stop): each alone is not meant to steer, the set is.

With a fluency weight ``μ > 0`` the objective adds ``μ · KL_U`` (:func:`unconstrained_kl`): the
divergence of the steered from the unsteered next-token distribution at the response tokens the
unsteered model would have written itself. Those tokens are not what the instruction changes, so the
term asks the vector to leave the model's distribution alone there and to change only what the target
adds (a comma left out, a bullet, the end phrase), rather than also how the model writes the rest.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from lm_eval_steer.runtime.hooks import steering, text_config
from lm_eval_steer.runtime.vectorfile import SteeringEntry
from vector_builder.activations import forward_for_hooks, left_pad, model_device
from vector_builder.methods.learned import LearnedSettings
from vector_builder.runner import Runner

IGNORE = -100  # label of positions that are not scored (prompt and padding)


@dataclass(frozen=True)
class Example:
    """Token ids of a chat prompt (generation prompt included) and of the response to learn (stop token included)."""

    prompt: tuple[int, ...]
    response: tuple[int, ...]


@dataclass
class TrainedVector:
    """The kept vector at one layer (best held-out step) and the curves that led to it (a jointly
    trained set's vectors each carry the set's curves)."""

    layer: int
    vector: torch.Tensor  # [hidden] float32
    train_loss: list[float] = field(default_factory=list)  # per step
    heldout_loss: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    best_step: int = 0
    seconds: float = 0.0

    @property
    def norm(self) -> float:
        return float(self.vector.norm())


def batch_tensors(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """``(input_ids, attention_mask, labels, scored)`` for left-padded ``prompt + response`` rows.

    ``labels`` hold the response ids at the response positions and ``IGNORE`` elsewhere; ``scored`` is
    the longest response, so only the last ``scored + 1`` positions' logits are needed."""
    sequences = [list(example.prompt) + list(example.response) for example in examples]
    ids, mask = left_pad(sequences, pad_id)
    labels = torch.full_like(ids, IGNORE)
    for row, example in enumerate(examples):
        labels[row, ids.shape[1] - len(example.response) :] = torch.tensor(example.response, dtype=torch.long)
    return ids, mask, labels, max(len(example.response) for example in examples)


def unconstrained_kl(unsteered_logits: torch.Tensor, steered_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean divergence of the steered from the unsteered next-token distribution where the target
    agrees with the unsteered model::

        KL_U = (1 / |U|) Σ_(t ∈ U) Σ_w P_0(w | t) · (log P_0(w | t) − log P_v(w | t))
        U    = {t : labels_t ≠ IGNORE and argmax_w P_0(w | t) = labels_t}

    ``P_0`` / ``P_v`` are the softmax of ``unsteered_logits`` / ``steered_logits`` (``[..., vocab]``,
    aligned with ``labels``). An empty ``U`` gives 0 (still part of the steered logits' graph)."""
    free = (labels != IGNORE) & (unsteered_logits.argmax(dim=-1) == labels)
    if not bool(free.any()):
        return steered_logits.sum() * 0.0
    reference = nn.functional.log_softmax(unsteered_logits[free].float(), dim=-1)
    steered = nn.functional.log_softmax(steered_logits[free].float(), dim=-1)
    return nn.functional.kl_div(steered, reference, log_target=True, reduction="batchmean")


def response_loss(
    model: nn.Module,
    examples: Sequence[Example],
    vectors: torch.Tensor,
    layers: Sequence[int],
    pad_id: int,
    skip_first_token: bool,
    fluency: float = 0.0,
) -> torch.Tensor:
    """Mean token cross-entropy of the responses given their prompts, with ``vectors[i]`` added at
    ``layers[i]`` exactly as ``steered-hf`` adds ``add``-mode entries of strength 1; with ``fluency``
    μ > 0, plus ``μ ·`` :func:`unconstrained_kl` against the same forward pass unsteered (no gradient)."""
    ids, mask, labels, scored = batch_tensors(examples, pad_id)
    # Under left padding every response ends the row, so the logits of the last scored + 1
    # positions cover all of them; the LM head over the prompt would be wasted work.
    entries = [SteeringEntry(name=f"learned L{layer}", vector=vector, layer=layer, mode="add", strength=1.0, positions="all") for vector, layer in zip(vectors, layers, strict=True)]
    with steering(model, [entries] * len(examples), skip_first_token=skip_first_token):
        predicted = forward_for_hooks(model, ids, mask, logits_to_keep=scored + 1)[:, :-1].float()
    wanted = labels[:, -scored:].to(model_device(model))
    loss = nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), wanted.reshape(-1), ignore_index=IGNORE)
    if not fluency:
        return loss
    with torch.no_grad():
        unsteered = forward_for_hooks(model, ids, mask, logits_to_keep=scored + 1)[:, :-1]
    return loss + fluency * unconstrained_kl(unsteered, predicted, wanted)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring gradients (no gradient buffers are ever allocated for them)."""
    previous = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in previous:
            parameter.requires_grad_(flag)


def _heldout_loss(runner: Runner, examples: Sequence[Example], vectors: torch.Tensor, layers: Sequence[int], batch_size: int, fluency: float) -> float:
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            count = sum(len(example.response) for example in chunk)
            total += float(response_loss(runner.model, chunk, vectors, layers, runner.pad_id, runner.settings.skip_first_token, fluency)) * count
            tokens += count
    return total / tokens


def train_vectors(
    runner: Runner, train: Sequence[Example], heldout: Sequence[Example], layers: Sequence[int], settings: LearnedSettings, *, desc: str = "train vectors"
) -> dict[int, TrainedVector]:
    """Adam on the vectors at ``layers`` (one layer, or a set trained jointly; initialised at zero) over
    mini-batches of ``train`` shuffled with the build's seed; held-out loss every ``eval_every`` steps
    (and at the end) decides early stopping and which step's vectors are kept. ``runner`` gives the
    model, its pad id and whether the first token is steered."""
    if not train or not heldout:
        raise ValueError(f"{desc}: training needs examples to train on and held-out examples (got {len(train)} and {len(heldout)})")
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"{desc}: training needs distinct layers, got {list(layers)}")
    started = time.perf_counter()
    model, pad_id, skip_first_token = runner.model, runner.pad_id, runner.settings.skip_first_token
    vectors = torch.zeros(len(layers), int(text_config(model).hidden_size), device=model_device(model), requires_grad=True)
    optimizer = torch.optim.Adam([vectors], lr=settings.lr)
    kept, best_step = vectors.detach().clone().cpu(), 0
    best = _heldout_loss(runner, heldout, vectors.detach(), layers, settings.batch_size, settings.fluency)
    train_loss: list[float] = []
    heldout_loss = [(0, best)]
    order: list[int] = []
    shuffler = random.Random(runner.settings.seed)
    stale = 0
    with frozen(model), tqdm(total=settings.steps, desc=desc, unit="step", leave=False) as bar:
        for step in range(1, settings.steps + 1):
            if len(order) < settings.batch_size:
                order += shuffler.sample(range(len(train)), len(train))
            batch = [train[index] for index in order[: settings.batch_size]]
            del order[: settings.batch_size]
            loss = response_loss(model, batch, vectors, layers, pad_id, skip_first_token, settings.fluency) + settings.l2 * vectors.pow(2).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_loss.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss[-1]:.3f}")
            if step % settings.eval_every and step != settings.steps:
                continue
            current = _heldout_loss(runner, heldout, vectors.detach(), layers, settings.batch_size, settings.fluency)
            heldout_loss.append((step, current))
            if current < best:
                best, stale = current, 0
                kept, best_step = vectors.detach().clone().cpu(), step
            else:
                stale += 1
                if stale >= settings.patience:
                    break
    seconds = time.perf_counter() - started
    return {
        layer: TrainedVector(layer=layer, vector=kept[index].clone(), train_loss=list(train_loss), heldout_loss=list(heldout_loss), best_step=best_step, seconds=seconds)
        for index, layer in enumerate(layers)
    }
