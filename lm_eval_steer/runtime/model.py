"""``steered-hf``: the harness's ``HFLM`` with per-document activation steering.

Each request is routed (:mod:`lm_eval_steer.runtime.routing`) to the entries its document needs. The
harness's own batching is kept: batches are full whatever the mix of instructions, and every row
carries its own vectors (:mod:`lm_eval_steer.runtime.hooks`). The rows of a batch are found by the strings
(generation) or token sequences (loglikelihood) the harness hands to the model: the per-row state
is :class:`~lm_eval_steer.runtime.rows.RequestRows`, and what it relies on in the harness is listed
in :mod:`lm_eval_steer.runtime.harness`.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from lm_eval_steer.core.errors import brief
from lm_eval_steer.runtime.compatibility import ModelShape, check_compatible
from lm_eval_steer.runtime.entrysets import joint_sets
from lm_eval_steer.runtime.harness import generation_group
from lm_eval_steer.runtime.hooks import steering, text_config
from lm_eval_steer.runtime.modelargs import check_layer_override, check_local_model, check_near_misses, config_before_loading, parse_steering_args
from lm_eval_steer.runtime.reuse import Reuse, weights_identity
from lm_eval_steer.runtime.routing import entries_for_document, route_key, route_signature
from lm_eval_steer.runtime.rows import Entries, RequestRows
from lm_eval_steer.runtime.vectorfile import check_applicable, load_vector_file

logger = logging.getLogger(__name__)

#: Model arguments ``HFLM`` takes itself: never refused as near misses of a steering argument.
HFLM_ARGS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def prompt_passes(requests: Sequence[Instance], label: Callable[[Instance], Hashable]) -> list[list[int]]:
    """Request indices split into passes, first fit, so that within a pass every prompt
    (``request.args[0]``) has one ``label``; each pass keeps request order."""
    passes: list[tuple[list[int], dict[Any, Hashable]]] = []
    for index, request in enumerate(requests):
        prompt, wanted = request.args[0], label(request)
        for indices, label_of in passes:
            if label_of.setdefault(prompt, wanted) == wanted:
                indices.append(index)
                break
        else:
            passes.append(([index], {prompt: wanted}))
    return [indices for indices, _ in passes]


class SteeredHFLM(HFLM):
    """HFLM plus ``vectors``, ``layer``, ``scale``, ``mode``, ``positions``, ``stop_rules``, ``route``,
    ``skip_first_token``, ``unsteered_from`` and ``steered_from`` model args (see the README; the
    steering arguments are parsed by :mod:`lm_eval_steer.runtime.modelargs`).

    Every steering argument, vector file and reused baseline is checked before the
    model weights load: against the model config, read first (only the loaded dtype is compared
    after loading)."""

    def __init__(
        self,
        pretrained: Any,
        vectors: str | Sequence[str] | None = None,
        layer: int | str | None = None,
        scale: float | str = 1.0,
        mode: str | None = None,
        positions: str | None = None,
        stop_rules: bool | int | str = True,
        route: str | None = "auto",
        skip_first_token: bool | int | str = True,
        unsteered_from: str | None = None,
        steered_from: str | None = None,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        args = parse_steering_args(vectors, layer, scale, mode, positions, route, skip_first_token, stop_rules)
        check_local_model(pretrained)
        self.route, self.overrides, self.skip_first_token = args.route, args.overrides, args.skip_first_token
        early = config_before_loading(pretrained, kwargs)
        # Config attributes are legitimate overrides (from_pretrained passes them on to the config).
        check_near_misses(kwargs, HFLM_ARGS | {name for name in kwargs if early is not None and hasattr(early, name)})
        self.vector_files = [load_vector_file(path) for path in args.vector_paths]
        for vector_file in self.vector_files:
            check_applicable(vector_file, self.overrides.mode, self.overrides.scale, self.overrides.positions)
        self._warn_sets_moved()
        shape = ModelShape.of_config(early) if early is not None else None
        if shape is not None:  # before any weights load
            self._check_fits(shape)
        self.weights = weights_identity(pretrained, kwargs.get("gguf_file"))
        # steered_from= answers the documents steered as that run steered them, then unsteered_from=
        # the unsteered ones, each from its run's logged samples.
        reused = {"steered_from": steered_from, "unsteered_from": unsteered_from}
        self._reuses = [Reuse.load(str(spec), {"pretrained": pretrained, **kwargs}, self.weights, argument) for argument, spec in reused.items() if spec]
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, device=device, **kwargs)

        for reuse in self._reuses:
            reuse.check_dtype(self.model.dtype)  # the dtype is known only once loaded
        config = text_config(self.model)
        # A GGUF load is named after its folder; its file name carries the model's name.
        model_name = " ".join(
            str(part) for part in (getattr(config, "_name_or_path", "") or (pretrained if isinstance(pretrained, str) else ""), kwargs.get("gguf_file") or "") if part
        )
        # Again on the loaded model: its shape when the config was not readable before, and the name.
        self._check_fits(ModelShape(model_name, config.hidden_size, config.num_hidden_layers))
        if self.route != "none" and not self.vector_files:
            logger.warning("steered-hf: no vectors= given, so nothing is steered")
        self._rows = RequestRows()

    def _warn_sets_moved(self) -> None:
        """``layer=`` puts every entry at one layer; a jointly trained set was trained to steer at its
        own layers together, so moving it is most likely not what the user meant: say so."""
        if self.overrides.layer is None:
            return
        sets = joint_sets(entry for vector_file in self.vector_files for entry in vector_file.entries)
        if sets:
            shown = [f"{brief(name, 80)} (layers {', '.join(map(str, layers))})" for name, layers in list(sets.items())[:3]]
            more = f" and {len(sets) - 3} more" if len(sets) > 3 else ""
            logger.warning(
                "steered-hf: layer=%s moves every entry to that layer, also the vectors of sets trained jointly at several layers: %s%s",
                self.overrides.layer,
                "; ".join(shown),
                more,
            )

    def _check_fits(self, model: ModelShape) -> None:
        """Every vector file and ``layer=`` against the model's decoder shape."""
        for vector_file in self.vector_files:
            check_compatible(vector_file, model)
        check_layer_override(self.overrides.layer, model.num_layers)

    # ------------------------------------------------------------------------------ configuration

    def steering_config(self) -> dict[str, Any]:
        """What the results JSON records, and what namespaces the ``--use_cache`` database."""
        return {
            "route": self.route,
            "overrides": self.overrides.given(),
            "skip_first_token": self.skip_first_token,
            "vector_files": [
                {
                    "path": vector_file.path,
                    "sha256": vector_file.sha256,
                    "model": vector_file.model,
                    "entries": [entry.to_json() for entry in vector_file.entries],
                }
                for vector_file in self.vector_files
            ],
        }

    def steering_fingerprint(self) -> str:
        config = self.steering_config()
        for vector_file in config["vector_files"]:
            vector_file.pop("path")  # the same file moved elsewhere steers the same way
        return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]

    def get_model_info(self) -> dict[str, Any]:
        # The reuse record is not part of steering_config: the --use_cache key space must not change
        # with how many answers a run reused.
        reuse = {reuse.argument: reuse.record() for reuse in self._reuses}
        weights = {"weights": self.weights} if self.weights else {}
        return {**super().get_model_info(), "steering": {**self.steering_config(), **weights, **reuse}}

    def route_signature(self, request: Instance) -> tuple[Any, ...]:
        """How this run steers the request's document, as reuse compares it with a baseline's."""
        return route_signature(self.rows_for(request), self.skip_first_token)

    def _reusing(self, requests: list[Instance], run: Callable[[list[Instance]], list[Any]]) -> list[Any]:
        """``run(requests)``, except for the requests a reused baseline answers (``steered_from=``
        first, then ``unsteered_from=``; each passes what it cannot answer on)."""
        for reuse in reversed(self._reuses):
            run = functools.partial(reuse.answer, route=self.route_signature, run=run)
        return run(requests)

    def set_cache_hook(self, cache_hook: Any) -> None:
        # lm-eval's --use_cache keys answers by request only; give steered runs their own key space
        # so that a steered run never reads an unsteered run's answers (or another configuration's).
        from lm_eval_steer.runtime.cache import namespace_cache

        if getattr(cache_hook, "dbdict", None) is not None:
            namespace_cache(cache_hook.dbdict, f"steer:{self.steering_fingerprint()}")
        super().set_cache_hook(cache_hook)

    def rows_for(self, request: Instance) -> Entries:
        return entries_for_document(request.doc, self.vector_files, self.route, self.overrides)

    # ------------------------------------------------------------------------------- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return self._reusing(requests, lambda remaining: self._generate_routed(remaining, disable_tqdm))

    def _generate_routed(self, requests: list[Instance], disable_tqdm: bool) -> list[str]:
        # The harness hands us only prompt strings, but it encodes the requests of one gen_kwargs group
        # that share a prompt in request order (harness assumption 2), so one pass serves every route:
        # a prompt routed several ways (IFEval's keyword documents share a question but not the word)
        # takes its entries in request order. Only a prompt asked under two gen_kwargs groups, which
        # the harness batches apart anyway, needs a second pass.
        answers: list[str] = [""] * len(requests)
        for indices in prompt_passes(requests, lambda request: generation_group(request.args[1])):
            for index, answer in zip(indices, self._generate_with([requests[i] for i in indices], disable_tqdm)):
                answers[index] = answer
        return answers

    def _generate_with(self, requests: list[Instance], disable_tqdm: bool) -> list[str]:
        """One pass of the harness's ``generate_until``: a prompt's requests share one gen_kwargs group."""
        with self._rows.generations([(request.args[0], self.rows_for(request)) for request in requests]):
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def tok_batch_encode(self, strings: list[str], *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._rows.encode_batch(strings)  # generate_until generates this batch next
        return super().tok_batch_encode(strings, *args, **kwargs)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        rows = self._rows.take_batch(context.shape[0])
        with steering(self.model, rows, skip_first_token=self.skip_first_token, decode=self.tok_decode):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    # ---------------------------------------------------------------------------- loglikelihood

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return self._reusing(requests, lambda remaining: self._loglikelihood_routed(remaining, disable_tqdm))

    def _loglikelihood_routed(self, requests: list[Instance], disable_tqdm: bool) -> list[tuple[float, bool]]:
        with self._rows.requests({tuple(request.args): self.rows_for(request) for request in requests}):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        return self._reusing(requests, lambda remaining: self._rolling_routed(remaining, disable_tqdm))

    def _rolling_routed(self, requests: list[Instance], disable_tqdm: bool) -> list[float]:
        # Rolling windows reach the model without their request, so each route gets its own pass.
        rows = [self.rows_for(request) for request in requests]
        groups: dict[Any, list[int]] = {}
        for index, entries in enumerate(rows):
            groups.setdefault(route_key(entries), []).append(index)
        answers: list[float] = [0.0] * len(requests)
        for indices in groups.values():
            with self._rows.requests(every_row=rows[indices[0]]):
                scores = super().loglikelihood_rolling([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            for index, score in zip(indices, scores):
                answers[index] = score
        return answers

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, override_bs: int | None = None) -> list[tuple[float, bool]]:
        with self._rows.model_inputs(requests, self.max_length):
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        found = self._rows.lookup_inputs(inps.tolist())
        if found is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        rows, prompt_lengths = found
        with steering(self.model, rows, skip_first_token=self.skip_first_token, prompt_lengths=prompt_lengths, decode=self.tok_decode):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
