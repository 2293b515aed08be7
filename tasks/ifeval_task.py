"""The task class and metric functions the YAMLs in this folder name (``!function ifeval_task.…``).

Only harness glue lives here; the subsets, data loading and scoring are :mod:`lm_eval_steer.core.ifeval`.
The harness loads this file by its path next to the YAMLs, so it is never imported as a package
module.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from lm_eval_steer.core.ifeval import agg_inst_level_acc, load_subset, per_instruction_metric, prepare_scorer, process_results, subset_instruction_ids

__all__ = ["IFEvalSubsetTask", "agg_inst_level_acc", "process_results"]


class IFEvalSubsetTask(ConfigurableTask):
    """A ``ConfigurableTask`` over one subset, with early checks and per-instruction metrics.

    ``dataset_kwargs`` in the YAML (``subset``, ``noinst``) select the documents.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        # "class" is how the YAML names this class; TaskConfig has no such field.
        config = {key: value for key, value in config.items() if key != "class"}
        prepare_scorer()  # fail now, before any generation, if scoring cannot work
        super().__init__(config=config)
        for instruction_id in sorted(subset_instruction_ids(self.config.dataset_kwargs["subset"])):
            name = per_instruction_metric(instruction_id)
            self._aggregation_list[name] = mean
            self._higher_is_better[name] = True

    def download(self, dataset_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """Loads the subset locally or from the hub (see :func:`lm_eval_steer.core.ifeval.load_subset`)."""
        self.dataset = load_subset(**(self.config.dataset_kwargs or {}))
