"""Vector file format v1: read, validate and atomically write sets of named steering vectors.

A vector file is a safetensors file. Each entry is a 1-D float tensor of length ``hidden_size``
stored under the entry's name; the safetensors ``__metadata__`` (string to string) holds:

- ``format``: ``lm-eval-steer/1``
- ``model``, ``hidden_size``, ``num_layers``: the model the vectors were built on
- ``entries``: a JSON list, one object per tensor, with the keys of :data:`ENTRY_KEYS` (all but
  :data:`OPTIONAL_ENTRY_KEYS` required)
- anything else (builder settings, scores, data hash ...): kept as is and written back unchanged

Files are untrusted input: safetensors never executes code, and :func:`load_vector_file` checks
every field, raising :class:`VectorFileError` with a one-line message that names the file, the
entry and the problem. It accepts only what it can apply: the header is read only up to
:data:`MAX_HEADER_BYTES` and JSON only :data:`MAX_JSON_DEPTH` levels deep (bounded memory), numbers
and vectors must be finite in float32 (the dtype steering computes in), and a ``project``/``ablate``
direction must have a finite, non-zero float32 norm. Bad values are quoted cut short.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lm_eval_steer.core.atomic import atomic_write
from lm_eval_steer.core.digest import file_sha256
from lm_eval_steer.core.errors import UserError, brief, one_line

FORMAT_VERSION = "lm-eval-steer/1"
MODES = ("add", "project", "ablate")
POSITIONS = ("all", "prompt", "generated")
FILE_KEYS = frozenset({"format", "model", "hidden_size", "num_layers", "entries"})
ENTRY_KEYS = frozenset({"name", "layer", "mode", "strength", "positions", "applies_to", "stop_after", "stop_after_tokens", "start_after_tokens"})
OPTIONAL_ENTRY_KEYS = frozenset({"applies_to", "stop_after", "stop_after_tokens", "start_after_tokens"})
APPLIES_TO_KEYS = frozenset({"instruction_id", "kwargs", "strength_rule", "not_with"})
STRENGTH_RULE_KEYS = frozenset({"kwarg", "points"})
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Largest safetensors header (metadata + tensor index) read: the shipped 195-entry keywords file
#: has 72 KB; the cap bounds the memory a hostile file can make the JSON parser use.
MAX_HEADER_BYTES = 8 << 20
#: Deepest JSON nesting accepted in ``entries`` (a real file nests 5 levels: list, entry,
#: applies_to, kwargs, a keyword list).
MAX_JSON_DEPTH = 16
#: Largest finite float32: strengths, rule points and vector elements must stay below it.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: Bounds on an entry's ``applies_to.not_with`` list: how many instruction ids, and how long each may be.
MAX_NOT_WITH, MAX_INSTRUCTION_ID_LENGTH = 64, 200
#: Bounds on an entry's ``stop_after`` list: how many strings, and how long each may be.
MAX_STOP_STRINGS, MAX_STOP_LENGTH = 16, 200
#: Largest ``stop_after_tokens`` and ``start_after_tokens``: longer than any answer a harness task asks for.
MAX_STOP_TOKENS = 1 << 20
#: Bounds on the model shape a file may claim (a hostile ``hidden_size`` must not size anything).
MAX_HIDDEN_SIZE, MAX_LAYERS = 1 << 20, 1 << 16

Mode = Literal["add", "project", "ablate"]
Positions = Literal["all", "prompt", "generated"]


class VectorFileError(UserError, ValueError):
    """A vector file (or one of its entries) is malformed; the message names file, entry and problem."""


class ScaleError(UserError, ValueError):
    """A ``*SCALE`` suffix that is not a finite number above 0."""


@dataclass(frozen=True)
class StrengthRule:
    """Strength as a function of one numeric kwarg of the document (e.g. the requested sentence count).

    ``strength(v) = piecewise-linear interpolation of points [(x0, s0), (x1, s1), ...] at v``,
    clamped to s0 below x0 and to the last s above the last x.
    """

    kwarg: str
    points: tuple[tuple[float, float], ...]

    def strength_for(self, value: float) -> float:
        xs = [x for x, _ in self.points]
        ss = [s for _, s in self.points]
        if value <= xs[0]:
            return ss[0]
        for (x0, s0), (x1, s1) in zip(self.points, self.points[1:]):
            if value <= x1:
                return s0 + (s1 - s0) * (value - x0) / (x1 - x0)
        return ss[-1]

    def to_json(self) -> dict[str, Any]:
        return {"kwarg": self.kwarg, "points": [list(point) for point in self.points]}

    def scaled(self, factor: float) -> StrengthRule:
        """Every point's strength times ``factor``: ``(x, s) → (x, factor·s)``."""
        return StrengthRule(self.kwarg, tuple((x, factor * s) for x, s in self.points))


@dataclass(frozen=True)
class AppliesTo:
    """Which documents an entry serves: an IFEval instruction id plus an optional kwargs filter.

    A document matches when ``instruction_id`` is in its ``instruction_id_list`` and, for that
    instruction, its kwargs contain every key/value of ``kwargs`` (strings compared case-insensitively,
    lists compared as sets), and none of its other instruction ids matches a pattern of ``not_with``
    (fnmatch globs: an exact id, ``punctuation:*``, or ``*`` for any other instruction). An entry that
    would cost a second instruction of the same prompt stays off such prompts; ``("*",)`` keeps an
    entry validated on one-instruction questions to one-instruction prompts.
    """

    instruction_id: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    strength_rule: StrengthRule | None = None
    not_with: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"instruction_id": self.instruction_id}
        if self.kwargs:
            out["kwargs"] = dict(self.kwargs)
        if self.strength_rule is not None:
            out["strength_rule"] = self.strength_rule.to_json()
        if self.not_with:  # optional: files without it read (and write) as before
            out["not_with"] = list(self.not_with)
        return out


@dataclass(frozen=True)
class SteeringEntry:
    """One steering vector and how to apply it (see :mod:`lm_eval_steer.runtime.interventions` for the math)."""

    name: str
    vector: torch.Tensor
    layer: int
    mode: Mode = "add"
    strength: float = 1.0
    positions: Positions = "all"
    applies_to: AppliesTo | None = None
    stop_after: tuple[str, ...] = ()  # a row stops being steered once its generated text contains one of these
    stop_after_tokens: int | None = None  # ... or once this many answer tokens were generated under it
    start_after_tokens: int | None = None  # steering starts only once the answer's first this many tokens were written unsteered

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "layer": self.layer,
            "mode": self.mode,
            "strength": self.strength,
            "positions": self.positions,
            "applies_to": None if self.applies_to is None else self.applies_to.to_json(),
        }
        if self.stop_after:  # optional keys: files without them read (and write) as before
            out["stop_after"] = list(self.stop_after)
        if self.stop_after_tokens is not None:
            out["stop_after_tokens"] = self.stop_after_tokens
        if self.start_after_tokens is not None:
            out["start_after_tokens"] = self.start_after_tokens
        return out

    def scaled(self, factor: float) -> SteeringEntry:
        """This entry with ``factor`` times its strength: ``s → factor·s``, and a strength rule's
        points ``(x, s) → (x, factor·s)``; it steers at ``scale=1`` as this entry does at the runtime's
        ``scale=factor``."""
        applies_to = self.applies_to
        if applies_to is not None and applies_to.strength_rule is not None:
            applies_to = replace(applies_to, strength_rule=applies_to.strength_rule.scaled(factor))
        return replace(self, strength=factor * self.strength, applies_to=applies_to)

    @property
    def can_stop(self) -> bool:
        """Whether a stop rule (``stop_after`` strings or ``stop_after_tokens``) may end its steering early."""
        return bool(self.stop_after) or self.stop_after_tokens is not None

    @property
    def has_window(self) -> bool:
        """Whether a rule (a stop rule or ``start_after_tokens``) steers only part of the answer, so
        that the entry cannot share a summed add op with entries steered throughout."""
        return self.can_stop or self.start_after_tokens is not None


@dataclass(frozen=True)
class VectorFile:
    """A loaded (validated) vector file."""

    model: str
    hidden_size: int
    num_layers: int
    entries: tuple[SteeringEntry, ...]
    extra_metadata: Mapping[str, str] = field(default_factory=dict)
    path: str | None = None
    sha256: str | None = None

    def entry(self, name: str) -> SteeringEntry:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(f"{self.path or '<vector file>'}: no entry named {name!r}")


def split_scale(text: str) -> tuple[str, float | None]:
    """``SOURCE*M`` → ``(SOURCE, M)`` when the text after the last ``*`` is a number, else ``(text, None)``.

    ``M`` must be finite and above 0 (:class:`ScaleError` otherwise), so a glob that merely ends in
    ``*`` (``keywords:*``) is left whole.
    """
    source, star, suffix = text.rpartition("*")
    if not star:
        return text, None
    try:
        factor = float(suffix)
    except ValueError:
        return text, None
    if not (math.isfinite(factor) and factor > 0):
        raise ScaleError(f"scale {suffix!r}: expected a finite number above 0")
    return source, factor


# ----------------------------------------------------------------------------------------- reading


class _Checker:
    """Raises VectorFileError messages of the form ``<file>: entry '<name>': <problem>``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, problem: str, entry: str | None = None) -> VectorFileError:
        where = f"{self.path}: entry {brief(entry)}: " if entry is not None else f"{self.path}: "
        return VectorFileError(one_line(where + problem, limit=2 * len(where) + 400))

    def integer(self, value: Any, what: str, entry: str | None = None, upper: int = MAX_LAYERS) -> int:
        """An int (or a string of one) in ``[-upper, upper]``; never a bool or a float."""
        number = None
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, str) and len(value) <= 20:
            try:
                number = int(value.strip())
            except ValueError:
                number = None
        if number is None or abs(number) > upper:
            raise self.fail(f"{what} must be an integer up to {upper}, got {brief(value)}", entry)
        return number

    def number(self, value: Any, what: str, entry: str | None = None) -> float:
        """A number that is finite in float32 (steering computes in float32)."""
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int of hundreds of digits
                number = None
        if number is None or not math.isfinite(number) or abs(number) > FLOAT32_MAX:
            raise self.fail(f"{what} must be a finite number in float32 (|x| <= {FLOAT32_MAX:.4g}), got {brief(value)}", entry)
        return number

    def keys(self, given: Mapping[str, Any], allowed: frozenset[str], required: frozenset[str], what: str, entry: str | None) -> None:
        unknown = sorted(set(given) - allowed)
        missing = sorted(required - set(given))
        if unknown:
            raise self.fail(f"unknown {what} key(s) {brief(unknown, 120)} (allowed: {sorted(allowed)})", entry)
        if missing:
            raise self.fail(f"missing {what} key(s) {missing}", entry)


def _parse_strength_rule(raw: Any, check: _Checker, name: str) -> StrengthRule | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise check.fail(f"applies_to.strength_rule must be an object, got {brief(raw)}", name)
    check.keys(raw, STRENGTH_RULE_KEYS, STRENGTH_RULE_KEYS, "strength_rule", name)
    if not isinstance(raw["kwarg"], str) or not raw["kwarg"]:
        raise check.fail("strength_rule.kwarg must be a non-empty string", name)
    points = raw["points"]
    if not isinstance(points, list) or not points or not all(isinstance(p, list) and len(p) == 2 for p in points):
        raise check.fail("strength_rule.points must be a non-empty list of [value, strength] pairs", name)
    parsed = tuple((check.number(x, "strength_rule x", name), check.number(s, "strength_rule strength", name)) for x, s in points)
    if any(b[0] <= a[0] for a, b in zip(parsed, parsed[1:])):
        raise check.fail("strength_rule.points must have strictly increasing values", name)
    return StrengthRule(kwarg=raw["kwarg"], points=parsed)


def _parse_applies_to(raw: Any, check: _Checker, name: str) -> AppliesTo | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise check.fail(f"applies_to must be an object or null, got {brief(raw)}", name)
    check.keys(raw, APPLIES_TO_KEYS, frozenset({"instruction_id"}), "applies_to", name)
    if not isinstance(raw["instruction_id"], str) or not raw["instruction_id"]:
        raise check.fail("applies_to.instruction_id must be a non-empty string", name)
    # Only null (or no key) means "no kwargs filter": "", 0, false or [] is a mistake, not an empty filter.
    kwargs = raw.get("kwargs")
    if kwargs is None:
        kwargs = {}
    elif not isinstance(kwargs, dict):
        raise check.fail(f"applies_to.kwargs must be a JSON object or null, got {brief(kwargs)}", name)
    return AppliesTo(
        instruction_id=raw["instruction_id"],
        kwargs=kwargs,
        strength_rule=_parse_strength_rule(raw.get("strength_rule"), check, name),
        not_with=_parse_not_with(raw.get("not_with"), raw["instruction_id"], check, name),
    )


def _parse_not_with(raw: Any, instruction_id: str, check: _Checker, name: str) -> tuple[str, ...]:
    """``applies_to.not_with``: null (or no key) or a list of up to :data:`MAX_NOT_WITH` distinct
    instruction ids or globs, without the entry's own id (listing it would look like routing it
    nowhere, though only the document's *other* instructions are ever matched)."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw or len(raw) > MAX_NOT_WITH:
        raise check.fail(f"applies_to.not_with must be null or a list of 1 to {MAX_NOT_WITH} instruction ids, got {brief(raw)}", name)
    for item in raw:
        if not isinstance(item, str) or not item or len(item) > MAX_INSTRUCTION_ID_LENGTH:
            raise check.fail(f"applies_to.not_with items must be non-empty strings of at most {MAX_INSTRUCTION_ID_LENGTH} characters, got {brief(item)}", name)
    if len(set(raw)) < len(raw):
        raise check.fail(f"applies_to.not_with lists an instruction id twice: {brief(raw)}", name)
    if instruction_id in raw:
        raise check.fail(f"applies_to.not_with lists the entry's own instruction {brief(instruction_id)}: it would serve no document", name)
    return tuple(raw)


def parse_applies_to(raw: Any, source: str, entry: str) -> AppliesTo | None:
    """An entry's ``applies_to`` JSON (as a vector file holds it, or as a results file records it) under
    the file format's rules; a :class:`VectorFileError` naming ``source`` and ``entry`` otherwise."""
    return _parse_applies_to(raw, _Checker(source), entry)


def _parse_stop_after(raw: Any, check: _Checker, name: str) -> tuple[str, ...]:
    """``stop_after``: a list of up to :data:`MAX_STOP_STRINGS` non-blank strings (case is ignored)."""
    if not isinstance(raw, list) or len(raw) > MAX_STOP_STRINGS:
        raise check.fail(f"stop_after must be a list of at most {MAX_STOP_STRINGS} strings, got {brief(raw)}", name)
    for item in raw:
        if not isinstance(item, str) or not item.strip() or len(item) > MAX_STOP_LENGTH:
            raise check.fail(f"stop_after items must be non-blank strings of at most {MAX_STOP_LENGTH} characters, got {brief(item)}", name)
    return tuple(raw)


def _strengths(strength: float, applies_to: AppliesTo | None) -> list[float]:
    """Every strength an entry can have: its own and its strength rule's."""
    rule = applies_to.strength_rule if applies_to is not None else None
    return [strength, *(s for _, s in (rule.points if rule else ()))]


def _checked_vector(tensor: torch.Tensor, mode: str, strengths: Iterable[float], check: _Checker, name: str) -> torch.Tensor:
    """The entry's tensor (shape checked on reading) as float32, checked to be applicable: finite, and
    for ``add`` finite after scaling by every strength the entry can have; for ``project``/``ablate``
    a finite non-zero norm."""
    if tensor.dtype not in FLOAT_DTYPES:
        raise check.fail(f"tensor dtype {tensor.dtype} is not a float type", name)
    vector = tensor.to(torch.float32)  # float64 values beyond float32's range become inf here
    if not torch.isfinite(vector).all():
        raise check.fail("tensor contains NaN or infinite values (in float32)", name)
    if mode == "add":
        largest = float(vector.abs().max()) * max(abs(s) for s in strengths)
        if not largest <= FLOAT32_MAX:
            raise check.fail("strength x vector overflows float32", name)
    else:
        norm = float(vector.norm())  # what the hooks divide by (lm_eval_steer.runtime.interventions.unit)
        if norm == 0.0:
            raise check.fail(f"zero vector has no direction (its float32 norm is 0), which '{mode}' mode needs", name)
        if not math.isfinite(norm):
            raise check.fail(f"the vector's float32 norm overflows to {norm}: '{mode}' mode needs a finite, non-zero norm", name)
    return vector


def _parse_entry(raw: Any, tensor: torch.Tensor | None, hidden_size: int, num_layers: int, check: _Checker) -> SteeringEntry:
    if not isinstance(raw, dict):
        raise check.fail(f"each item of 'entries' must be an object, got {brief(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise check.fail(f"entry without a valid 'name' (a non-empty string): {brief(raw)}")
    check.keys(raw, ENTRY_KEYS, ENTRY_KEYS - OPTIONAL_ENTRY_KEYS, "entry", name)
    if tensor is None:
        raise check.fail("listed in metadata but no tensor of that name is stored", name)
    layer = check.integer(raw["layer"], "layer", name)
    if not 0 <= layer < num_layers:
        raise check.fail(f"layer {layer} is out of range for a {num_layers}-layer model (0..{num_layers - 1})", name)
    mode = raw["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        raise check.fail(f"unknown mode {brief(mode)} (expected one of {', '.join(MODES)})", name)
    positions = raw["positions"]
    if not isinstance(positions, str) or positions not in POSITIONS:
        raise check.fail(f"unknown positions {brief(positions)} (expected one of {', '.join(POSITIONS)})", name)
    strength = check.number(raw["strength"], "strength", name)
    applies_to = _parse_applies_to(raw.get("applies_to"), check, name)
    stop_after = _parse_stop_after(raw.get("stop_after", []), check, name)
    stop_after_tokens = _token_count(raw, "stop_after_tokens", check, name)
    start_after_tokens = _token_count(raw, "start_after_tokens", check, name)
    if start_after_tokens is not None and positions == "prompt":
        raise check.fail("start_after_tokens needs positions 'all' or 'generated': a prompt-only entry never reaches the answer", name)
    if start_after_tokens is not None and stop_after_tokens is not None and stop_after_tokens <= start_after_tokens:
        raise check.fail(f"stop_after_tokens ({stop_after_tokens}) must be larger than start_after_tokens ({start_after_tokens}), or nothing is steered", name)
    vector = _checked_vector(tensor, mode, _strengths(strength, applies_to), check, name)
    return SteeringEntry(
        name=name,
        vector=vector,
        layer=layer,
        mode=mode,
        strength=strength,
        positions=positions,
        applies_to=applies_to,
        stop_after=stop_after,
        stop_after_tokens=stop_after_tokens,
        start_after_tokens=start_after_tokens,
    )


def _token_count(raw: Mapping[str, Any], key: str, check: _Checker, name: str) -> int | None:
    """The entry's optional answer-token count ``key`` (absent or null: None), at least 1."""
    if raw.get(key) is None:
        return None
    count = check.integer(raw[key], key, name, upper=MAX_STOP_TOKENS)
    if count < 1:
        raise check.fail(f"{key} must be at least 1, got {count}", name)
    return count


def _file_shape(metadata: Mapping[str, str], check: _Checker) -> tuple[int, int]:
    """The file's ``(hidden_size, num_layers)`` after checking the format."""
    if metadata.get("format") != FORMAT_VERSION:
        raise check.fail(f"metadata 'format' is {brief(metadata.get('format'))}, expected {FORMAT_VERSION!r} (is this an lm-eval-steer vector file?)")
    missing = sorted(FILE_KEYS - set(metadata))
    if missing:
        raise check.fail(f"missing metadata key(s) {missing}")
    file_hidden = check.integer(metadata["hidden_size"], "hidden_size", upper=MAX_HIDDEN_SIZE)
    file_layers = check.integer(metadata["num_layers"], "num_layers")
    if file_hidden <= 0 or file_layers <= 0:
        raise check.fail(f"hidden_size and num_layers must be positive, got {file_hidden} and {file_layers}")
    return file_hidden, file_layers


def check_applicable(vector_file: VectorFile, mode: str | None = None, scale: float = 1.0, positions: str | None = None) -> None:
    """Raises VectorFileError unless every entry can still be applied under run-wide overrides: every
    strength times ``scale`` finite in float32, the vector fit for ``mode`` (e.g. an ``add`` vector
    of zeros has no direction for ``mode=project``), and no ``start_after_tokens`` entry forced to
    ``positions=prompt`` (it would steer nothing: its window lies in the answer)."""
    check = _Checker(vector_file.path or "<vector file>")
    for entry in vector_file.entries:
        if positions == "prompt" and entry.start_after_tokens is not None:
            raise check.fail(
                f"positions=prompt would steer nothing here: the entry starts after {entry.start_after_tokens} answer tokens "
                "(start_after_tokens); leave positions= out or use 'all' or 'generated'",
                entry.name,
            )
        strengths = [check.number(scale * strength, "strength x scale", entry.name) for strength in _strengths(entry.strength, entry.applies_to)]
        _checked_vector(entry.vector, mode or entry.mode, strengths, check, entry.name)


def _too_deep(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests more than ``limit`` levels (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


def _entries_json(metadata: Mapping[str, str], check: _Checker) -> list[Any]:
    """``metadata['entries']`` parsed: a non-empty list, nested at most :data:`MAX_JSON_DEPTH` levels."""
    try:
        raw_entries = json.loads(metadata["entries"])
    except RecursionError:
        raise check.fail(f"metadata 'entries' is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as error:  # JSONDecodeError, and integers beyond Python's digit limit
        raise check.fail(f"metadata 'entries' is not valid JSON ({brief(str(error), 120)})") from None
    if _too_deep(raw_entries, MAX_JSON_DEPTH):
        raise check.fail(f"metadata 'entries' is nested more than {MAX_JSON_DEPTH} levels deep")
    if not isinstance(raw_entries, list) or not raw_entries:
        raise check.fail("metadata 'entries' must be a non-empty JSON list")
    return raw_entries


def _parse_entries(metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor], hidden_size: int, num_layers: int, check: _Checker) -> list[SteeringEntry]:
    """Every entry listed in the metadata, each checked against its tensor; every tensor listed once."""
    entries: list[SteeringEntry] = []
    seen: set[str] = set()
    for raw in _entries_json(metadata, check):
        name = raw.get("name") if isinstance(raw, dict) else None
        if isinstance(name, str) and name in seen:
            raise check.fail("duplicate entry name", name)
        entry = _parse_entry(raw, tensors.get(name) if isinstance(name, str) else None, hidden_size, num_layers, check)
        seen.add(entry.name)
        entries.append(entry)
    unlisted = sorted(set(tensors) - seen)
    if unlisted:
        raise check.fail(f"tensor(s) {brief(unlisted, 120)} are stored but not listed in metadata 'entries'")
    return entries


def _check_header(path: str, check: _Checker) -> None:
    """A regular file whose safetensors header fits :data:`MAX_HEADER_BYTES` (read before parsing)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        raise check.fail("no such file") from None
    except OSError as error:
        raise check.fail(f"cannot be read ({error.strerror or error})") from None
    mode = status.st_mode
    if not stat.S_ISREG(mode):
        kinds = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
        kind = next((name for test, name in kinds.items() if test(mode)), "something else")
        raise check.fail(f"is {kind}, not a regular file")
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(8)
    except OSError as error:
        raise check.fail(f"cannot be read ({error.strerror or error})") from None
    if len(prefix) < 8:
        raise check.fail("not a readable safetensors file (shorter than its 8-byte header length)")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > status.st_size - 8:
        raise check.fail(f"not a readable safetensors file (its header length {header_bytes} exceeds the file size)")
    if header_bytes > MAX_HEADER_BYTES:
        raise check.fail(f"safetensors header of {header_bytes} bytes exceeds the {MAX_HEADER_BYTES >> 20} MiB limit for vector files")


def _read_tensor(handle: Any, key: str, hidden_size: int, check: _Checker) -> torch.Tensor:
    """One stored tensor, its shape checked before it is read (a huge tensor is never loaded)."""
    shape = tuple(handle.get_slice(key).get_shape())
    if shape != (hidden_size,):
        raise check.fail(f"tensor shape {shape} does not match hidden_size {hidden_size} (expected ({hidden_size},))", key)
    return handle.get_tensor(key)


def metadata_json(metadata: Mapping[str, str], key: str) -> Any:
    """A JSON-valued free-form metadata field (``merged_from``, ``builder``, ``rerouted``, …), or None
    when it is absent or not JSON: these fields describe a file's history, and reading them must never
    fail on a file whose entries load."""
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except ValueError:
        return None


def load_vector_file(path: str | os.PathLike[str]) -> VectorFile:
    """Reads and validates a vector file. Whether it fits a model is
    :func:`lm_eval_steer.runtime.compatibility.check_compatible`'s question."""
    path_str = str(path)
    check = _Checker(path_str)
    _check_header(path_str, check)
    try:
        with safe_open(path_str, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            file_hidden, file_layers = _file_shape(metadata, check)
            tensors = {key: _read_tensor(handle, key, file_hidden, check) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        if isinstance(error, VectorFileError):
            raise
        raise check.fail(f"not a readable safetensors file ({brief(str(error), 120) if str(error) else type(error).__name__})") from None

    entries = _parse_entries(metadata, tensors, file_hidden, file_layers, check)

    vector_file = VectorFile(
        model=metadata["model"],
        hidden_size=file_hidden,
        num_layers=file_layers,
        entries=tuple(entries),
        extra_metadata={k: v for k, v in metadata.items() if k not in FILE_KEYS},
        path=path_str,
        sha256=file_sha256(path_str),
    )
    return vector_file


# ----------------------------------------------------------------------------------------- writing


def save_vector_file(
    path: str | os.PathLike[str],
    entries: Iterable[SteeringEntry],
    *,
    model: str,
    hidden_size: int,
    num_layers: int,
    extra_metadata: Mapping[str, str] | None = None,
) -> VectorFile:
    """Validates and atomically writes a vector file; returns it as loaded back from disk."""
    entries = list(entries)
    extra = {str(k): str(v) for k, v in (extra_metadata or {}).items()}
    clashing = sorted(set(extra) & FILE_KEYS)
    if clashing:
        raise VectorFileError(f"{path}: extra metadata may not override {clashing}")
    metadata = {
        **extra,
        "format": FORMAT_VERSION,
        "model": model,
        "hidden_size": str(hidden_size),
        "num_layers": str(num_layers),
        "entries": json.dumps([entry.to_json() for entry in entries]),
    }
    names = [entry.name for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise VectorFileError(f"{path}: duplicate entry name(s) {duplicates}")
    # clone(): entries may share one tensor, which safetensors refuses to store twice.
    tensors = {entry.name: entry.vector.detach().to("cpu", torch.float32).clone().contiguous() for entry in entries}

    def write(temp_path: str) -> None:
        save_file(tensors, temp_path, metadata=metadata)
        # Validate what was written before it replaces anything the user has; name the target.
        try:
            load_vector_file(temp_path)
        except VectorFileError as error:
            raise VectorFileError(str(error).replace(temp_path, str(path))) from None

    atomic_write(path, write)  # a failed write (disk full, no permission) names the target
    return load_vector_file(path)
