"""Build outputs besides the vector file: checkpoints (for ``--resume``), the JSON report, the plot.

Everything is written atomically (temp file + rename), so an interrupted build leaves either the old
file or the new one, never half of one.

Checkpoint layout under ``<report>/checkpoint/``:

- ``settings.json``: the settings the checkpoint was made with; ``--resume`` refuses it, in one line,
  when another builder version wrote it (its settings are recorded in another layout) or when they
  differ in anything but the choice-only guard thresholds (:data:`CHOICE_ONLY_SETTINGS`);
- ``sums.safetensors``: the activation running sums of every direction (float64, counts in its metadata);
- ``targets/<name>.json``: one finished target's candidate results and choice (made again on resume);
- ``learned/<direction>.safetensors``: one learned direction's vectors per layer, with its targets'
  sources and training curves in the metadata.

A checkpoint file that cannot be read under ``--resume`` is a :class:`CheckpointError` naming it;
the temporary files of writes that a killed build left behind are removed when a build starts.
``report.json`` is strict JSON: non-finite numbers (a diverged loss, say) are written as ``null``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lm_eval_steer.core.atomic import atomic_write, remove_leftovers, write_json
from lm_eval_steer.core.errors import UserError, one_line
from vector_builder.activations import RunningSum
from vector_builder.methods.learned.stage import LearnedDirection
from vector_builder.methods.learned.training import TrainedVector
from vector_builder.search import CandidateResult, TargetResult, window_words

REPORT_NAME = "report.json"
PLOT_NAME = "scores.png"
TRAINING_PLOT_NAME = "training.png"


T = TypeVar("T")


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be resumed from (other settings, or unreadable); names the file."""


def _read(path: Path, reader: Callable[[Path], T]) -> T:
    """``reader(path)``, with any sign of a damaged file turned into a CheckpointError naming it."""
    try:
        return reader(path)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, SafetensorError) as error:
        raise CheckpointError(
            f"{path}: damaged checkpoint file ({one_line(f'{type(error).__name__}: {error}', 120)}); "
            "delete it to recompute that part, or rerun without --resume"
        ) from None


def finite_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None, so that it serialises as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: finite_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(item) for item in value]
    return value


#: Settings (part, field) that only decide which validated candidate wins, never what is computed or
#: generated: a checkpoint stays valid when they change, and the resumed search chooses again under
#: the new values.
CHOICE_ONLY_SETTINGS = (("search", "allowed_degenerate"), ("search", "min_length_ratio"), ("search", "degeneracy_guard"), ("search", "objective"))
#: Settings added after builder version 2 was first recorded, with the value that builds as before:
#: a checkpoint that lacks one was made with that value, so it stays resumable.
ADDED_SETTINGS = {
    ("search", "start_after_tokens"): [],
    ("search", "stop_after_first_token"): False,
    ("search", "stop_once_followed"): False,
    ("targets", "max_repetition"): None,
    ("learned", "fluency"): 0.0,
}


#: Settings (part, field) that only decide which candidates are validated, never what is trained or
#: collected: when they change, a resumed build keeps the checkpoint's trained vectors and activation
#: sums and validates again, since its stored validation answers belong to the other candidates.
CANDIDATE_GRID_SETTINGS = (("search", "multipliers"), ("search", "token_multipliers"), ("learned", "multipliers"))


def fingerprint(settings: Mapping[str, Any], ignored: Sequence[tuple[str, str]] = CHOICE_ONLY_SETTINGS) -> str:
    """The hash a checkpoint is valid for: every setting except the ``ignored`` ones (by default
    :data:`CHOICE_ONLY_SETTINGS`), with each missing :data:`ADDED_SETTINGS` read as its as-before value."""
    kept = {
        part: {name: item for name, item in value.items() if (part, name) not in ignored} if isinstance(value, Mapping) else value
        for part, value in settings.items()
    }
    for (part, name), as_before in ADDED_SETTINGS.items():
        if isinstance(kept.get(part), dict):
            kept[part].setdefault(name, as_before)
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def _check_resumable(path: Path, stored: Mapping[str, Any], settings: Mapping[str, Any]) -> bool:
    """Refuses, in one line, a checkpoint written by another builder version or with other settings;
    True when only :data:`CANDIDATE_GRID_SETTINGS` differ (its validation results are then stale)."""
    if stored.get("builder_version") != settings.get("builder_version"):
        raise CheckpointError(
            f"{path}: written by builder version {stored.get('builder_version', '?')}, whose settings have another layout; this builder "
            f"(version {settings.get('builder_version', '?')}) cannot resume it: rebuild without --resume (or with a fresh --report directory)"
        )
    if fingerprint(stored) == fingerprint(settings):
        return False
    grid_free = (*CHOICE_ONLY_SETTINGS, *CANDIDATE_GRID_SETTINGS)
    if fingerprint(stored, grid_free) != fingerprint(settings, grid_free):
        raise CheckpointError(
            f"{path}: the checkpoint was made with other settings or data; rerun without --resume (or with a fresh --report directory)"
        )
    return True


def _safe_name(name: str) -> str:
    # Entry names hold ':' and arbitrary keywords; keep them readable but filesystem-safe and unique.
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


class Checkpoint:
    """Per-build resumable state in ``<report>/checkpoint``."""

    def __init__(self, report_dir: str | Path, settings: Mapping[str, Any], resume: bool) -> None:
        self.root = Path(report_dir) / "checkpoint"
        self.settings_path = self.root / "settings.json"
        self.sums_path = self.root / "sums.safetensors"
        self.targets_dir = self.root / "targets"
        self.learned_dir = self.root / "learned"
        for directory in (Path(report_dir), self.root, self.targets_dir, self.learned_dir):
            remove_leftovers(directory)  # temp files of writes a killed build left behind
        if resume and self.settings_path.is_file():
            # The fingerprint is recomputed from the stored settings, so that checkpoints written with
            # other values of a choice-only setting stay valid.
            stored = _read(self.settings_path, lambda path: dict(json.loads(path.read_text())["settings"]))
            if _check_resumable(self.settings_path, stored, settings):
                # Other multipliers: the trained vectors and sums still hold; the validation answers do not.
                for stale in self.targets_dir.glob("*.json"):
                    stale.unlink()
        elif not resume:
            # A fresh build must not pick up stale results.
            for stale in [self.sums_path, *self.targets_dir.glob("*.json"), *self.learned_dir.glob("*.safetensors")]:
                stale.unlink(missing_ok=True)
        write_json(self.settings_path, {"settings": dict(settings)})

    def load_sums(self) -> dict[str, tuple[RunningSum, RunningSum]] | None:
        return _read(self.sums_path, _read_sums) if self.sums_path.is_file() else None

    def save_sums(self, sums: Mapping[str, tuple[RunningSum, RunningSum]]) -> None:
        tensors = {}
        for key, (with_sum, without_sum) in sums.items():
            tensors[f"{key}/with"] = with_sum.total.contiguous()
            tensors[f"{key}/without"] = without_sum.total.contiguous()
        counts = json.dumps({key: [w.count, o.count] for key, (w, o) in sums.items()})
        atomic_write(self.sums_path, lambda temp: save_file(tensors, temp, metadata={"counts": counts}))

    def load_targets(self) -> dict[str, TargetResult]:
        results = {}
        for path in sorted(self.targets_dir.glob("*.json")):
            result = _read(path, lambda item: TargetResult.from_json(json.loads(item.read_text())))
            results[result.name] = result
        return results

    def save_target(self, result: TargetResult) -> None:
        write_json(self.targets_dir / f"{_safe_name(result.name)}.json", result.to_json())

    def load_learned(self) -> dict[str, LearnedDirection]:
        """Learned directions finished before an interruption, keyed by direction key (their
        ``direction`` is rebuilt by the caller from ``trained``)."""
        found = {}
        for path in sorted(self.learned_dir.glob("*.safetensors")):
            key, learned = _read(path, _read_learned)
            found[key] = learned
        return found

    def save_learned(self, key: str, learned: LearnedDirection) -> None:
        tensors = {str(layer): item.vector.contiguous() for layer, item in learned.trained.items()}
        meta = {
            "key": key,
            "targets": learned.sources,
            "targets_seconds": learned.targets_seconds,
            "looping_refused": learned.looping_refused,
            "layers": {
                str(layer): {"train_loss": item.train_loss, "heldout_loss": item.heldout_loss, "best_step": item.best_step, "seconds": item.seconds}
                for layer, item in learned.trained.items()
            },
        }
        path = self.learned_dir / f"{_safe_name(key)}.safetensors"
        atomic_write(path, lambda temp: save_file(tensors, temp, metadata={"learned": json.dumps(meta)}))


def _read_sums(path: Path) -> dict[str, tuple[RunningSum, RunningSum]]:
    with safe_open(str(path), framework="pt") as handle:
        counts = json.loads(handle.metadata()["counts"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return {
        key: (RunningSum(tensors[f"{key}/with"], count[0]), RunningSum(tensors[f"{key}/without"], count[1]))
        for key, count in counts.items()
    }


def _read_learned(path: Path) -> tuple[str, LearnedDirection]:
    """One learned direction's checkpoint: its key and the direction (``direction`` rebuilt by the caller)."""
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["learned"])
        vectors = {int(key): handle.get_tensor(key) for key in handle.keys()}
    trained = {
        layer: TrainedVector(layer, vectors[layer], curves["train_loss"], [tuple(p) for p in curves["heldout_loss"]], curves["best_step"], curves["seconds"])
        for layer, curves in ((int(k), v) for k, v in meta["layers"].items())
    }
    return meta["key"], LearnedDirection(None, meta["targets"], trained, meta["targets_seconds"], meta.get("looping_refused", 0))


def _part_scores(follows: Sequence[bool], n_without: int | None) -> dict[str, float]:
    """With ``--val-with-instruction`` the first ``n_without`` prompts hide the instruction, the rest
    show it (``None``: no split, as for pooled results, which interleave their targets' prompts)."""
    if n_without is None or len(follows) <= n_without:
        return {}
    shown = follows[n_without:]
    return {"score_without_instruction": sum(follows[:n_without]) / n_without, "score_with_instruction": sum(shown) / len(shown)}


def target_summary(result: TargetResult, note: str | None, n_without: int | None) -> dict[str, Any]:
    """Report row for one target: its candidates' scores and the choice (without the raw responses)."""
    chosen = result.candidate(result.chosen) if result.chosen else None
    return {
        "name": result.name,
        "chosen": result.chosen or "none",
        "layer": None if chosen is None else chosen.layer,
        "joint_layers": None if chosen is None else chosen.joint_layers,
        "strength": None if chosen is None else chosen.strength,
        "strength_rule": result.rule_points or None,
        "note": note,
        "candidates": [
            {
                "candidate": item.label,
                "layer": item.layer,
                "joint_layers": item.joint_layers,
                "multiplier": item.multiplier,
                "strength": item.strength,
                "stop_after_tokens": item.stop_after_tokens,
                "start_after_tokens": item.start_after_tokens,
                "score": item.score,
                "fluent_score": item.fluent_score,
                **_part_scores(item.follows, n_without),
                "n": len(item.follows),
                "degenerate": item.n_degenerate,
                "new_looping": item.new_looping,
                "cured_looping": item.cured_looping,
                "mean_tokens": item.mean_length,
                "disqualified": item.disqualified,
                "chosen": item.label == (result.chosen or "none"),
            }
            for item in result.candidates
        ],
    }


def write_report(report_dir: str | Path, payload: Mapping[str, Any]) -> Path:
    path = Path(report_dir) / REPORT_NAME
    write_json(path, finite_json(payload))
    return path


def _panels(count: int) -> tuple[Any, list[Any]]:
    """A figure with ``count`` panels, 4 to a row (unused cells blank), and its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(4, max(1, count))
    rows = max(1, math.ceil(count / columns))  # an empty figure still gets one (blank) panel
    figure, axes = plt.subplots(rows, columns, figsize=(4 * columns, 3 * rows), squeeze=False)
    for axis in list(axes.flat)[count:]:
        axis.axis("off")
    return figure, list(axes.flat)


def _save(figure: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=80))
    plt.close(figure)
    return path


def _line_of(item: CandidateResult) -> tuple[float, int, int]:
    """The plot line a candidate is drawn on: its multiplier and answer window (0: no such rule)."""
    return item.multiplier, item.stop_after_tokens or 0, item.start_after_tokens or 0


def write_plot(report_dir: str | Path, results: Sequence[TargetResult], objective: str = "follows") -> Path:
    """One panel per target: the validation score the choice maximised (``objective``) vs layer, a line per multiplier (and answer window), dashed = no steering,
    star = chosen, x = disqualified by the degeneracy or length guard; beside each point that changes
    looping, ``+new/-cured`` looping answers against the unsteered ones."""
    figure, axes = _panels(len(results))
    for axis, result in zip(axes, results):
        baseline = result.candidates[0]
        axis.axhline(baseline.objective(objective), color="grey", linestyle="--", label="no steering")
        for multiplier, stop, start in sorted({_line_of(item) for item in result.candidates[1:]}):
            points = [item for item in result.candidates[1:] if _line_of(item) == (multiplier, stop, start)]
            label = f"×{multiplier:g}" + window_words(start or None, stop or None)
            axis.plot([p.layer for p in points], [p.objective(objective) for p in points], marker="o", label=label)
            bad = [p for p in points if p.disqualified]
            axis.scatter([p.layer for p in bad], [p.objective(objective) for p in bad], marker="x", color="red", zorder=3)
            for point in points:
                if point.new_looping or point.cured_looping:
                    axis.annotate(f"+{point.new_looping}/-{point.cured_looping}", (point.layer, point.objective(objective)), fontsize=5, xytext=(2, 2), textcoords="offset points")
        if result.chosen:
            chosen = result.candidate(result.chosen)
            axis.scatter([chosen.layer], [chosen.objective(objective)], marker="*", s=200, color="gold", edgecolor="black", zorder=4)
        axis.set_title(result.name, fontsize=8)
        axis.set_xlabel("layer")
        axis.set_ylabel("fluent pass rate (val)" if objective == "fluent" else "loose accuracy (val)")
        axis.set_ylim(-0.05, 1.05)
    if results:
        axes[0].legend(fontsize=7)
    else:
        axes[0].text(0.5, 0.5, "nothing was validated (see report.json)", ha="center", va="center", transform=axes[0].transAxes)
    return _save(figure, Path(report_dir) / PLOT_NAME)


def write_training_plot(report_dir: str | Path, learned: Mapping[str, LearnedDirection], fluency: float = 0.0) -> Path | None:
    """One panel per learned direction: training loss per step (thin) and held-out loss (markers)
    per layer (one pair of lines for a jointly trained set, labelled with all its layers), star = the
    kept step; with a ``fluency`` weight μ the loss is the cross-entropy plus μ times the fluency term.
    Drawn next to ``scores.png``; None when nothing was trained."""
    trained = {key: item for key, item in learned.items() if item.trained}
    if not trained:
        return None
    figure, axes = _panels(len(trained))
    for axis, (key, item) in zip(axes, trained.items()):
        runs: dict[tuple, list[int]] = {}  # layers trained jointly share their curves: one line per training run
        for layer, curves in sorted(item.trained.items()):
            runs.setdefault((tuple(curves.train_loss), tuple(curves.heldout_loss)), []).append(layer)
        for layers in runs.values():
            curves, name = item.trained[layers[0]], "L" + "+".join(map(str, layers))
            line = axis.plot(range(1, len(curves.train_loss) + 1), curves.train_loss, linewidth=0.8, alpha=0.6, label=f"{name} train")[0]
            steps, losses = zip(*curves.heldout_loss)
            axis.plot(steps, losses, marker="o", color=line.get_color(), label=f"{name} held-out")
            best = dict(curves.heldout_loss).get(curves.best_step)
            axis.scatter([curves.best_step], [best], marker="*", s=150, color="gold", edgecolor="black", zorder=4)
        axis.set_title(f"{key} ({sum(item.sources.values())} targets)", fontsize=8)
        axis.set_xlabel("step")
        axis.set_ylabel(f"response cross-entropy + {fluency:g} KL_U" if fluency else "response cross-entropy")
        axis.legend(fontsize=6)
    return _save(figure, Path(report_dir) / TRAINING_PLOT_NAME)
