"""Teacher-forced passes over (prompt, answer) pairs: residual states at the answer's tokens, and the
answer's log-likelihood under the model.

Every batch is left-padded, so each row's answer fills its last ``len(answer)`` columns; positions
are computed as ``generate`` computes them (:func:`~vector_builder.activations.forward_for_hooks`),
so a row sees what it would see alone. Nothing is steered here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from lm_eval_steer.runtime.hooks import text_config
from vector_builder.activations import RunningSum, forward_for_hooks, last_columns_states, left_pad

#: ``groups[i][j]``: the group whose sum answer ``i``'s token ``j`` is added to, or None to leave it out.
TokenGroups = Sequence[Sequence[str | None]]


def _batches(count: int, batch_size: int, desc: str) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of each batch, with a progress bar counting answers."""
    with tqdm(total=count, desc=desc, unit="answer") as bar:
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            yield start, stop
            bar.update(stop - start)


@torch.no_grad()
def answer_state_sums(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    groups: TokenGroups,
    layers: Sequence[int],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "answer states",
) -> dict[str, RunningSum]:
    """Per group ``g``: ``total[k] = Σ h_{layers[k]}`` over the answer tokens ``groups`` assigns to
    ``g``, where ``h_L`` is decoder layer ``L``'s output at the token's position (the state after
    reading it, as a steering hook at ``L`` sees it).

    Running sums in float64, so memory depends on ``len(layers) × hidden`` and the batch, never on
    how many tokens are summed."""
    hidden_size = int(text_config(model).hidden_size)
    names = sorted({group for row in groups for group in row if group is not None})
    sums = {name: RunningSum.zeros(len(layers), hidden_size) for name in names}
    for start, stop in _batches(len(answers), batch_size, desc):
        chunk = answers[start:stop]
        tail = max(1, max(len(answer) for answer in chunk))
        ids, mask = left_pad([list(p) + list(a) for p, a in zip(prompts[start:stop], chunk)], pad_id)
        states = last_columns_states(model, ids, mask, layers, columns=tail)  # [batch, tail, layers, hidden]
        for row, answer in enumerate(chunk):
            row_groups = groups[start + row]
            if len(row_groups) != len(answer):
                raise ValueError(f"answer {start + row}: {len(row_groups)} token groups for {len(answer)} tokens")
            for name in names:
                picked = [tail - len(answer) + j for j, group in enumerate(row_groups) if group == name]
                if picked:
                    sums[name].add(states[row, picked])
    return sums


@torch.no_grad()
def answer_logprobs(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    batch_size: int,
    pad_id: int,
    desc: str = "likelihood",
) -> list[tuple[float, int]]:
    """Per answer: ``(Σ_j log p(a_j | prompt, a_<j), len(answer))`` under ``model`` (``(0.0, 0)`` for
    an empty answer), the pair :func:`lm_eval_steer.analysis.quality.perplexity` turns into a
    perplexity. Only the last ``max len(answer) + 1`` positions get logits, which every answer token's
    prediction lies within under left padding."""
    scored: list[tuple[float, int]] = []
    for start, stop in _batches(len(answers), batch_size, desc):
        chunk = answers[start:stop]
        tail = max(len(answer) for answer in chunk) + 1
        ids, mask = left_pad([list(p) + list(a) for p, a in zip(prompts[start:stop], chunk)], pad_id)
        logits = forward_for_hooks(model, ids, mask, logits_to_keep=tail)
        for row, answer in enumerate(chunk):
            if not answer:
                scored.append((0.0, 0))
                continue
            # the prediction of answer token j sits one column before it
            predictions = logits[row, tail - len(answer) - 1 : tail - 1].float().log_softmax(-1)
            targets = torch.tensor(list(answer), device=predictions.device)[:, None]
            scored.append((float(predictions.gather(-1, targets).sum()), len(answer)))
    return scored

