"""Sets of entries trained together, and the naming that ties them.

A set of vectors trained jointly at several layers (``lm-eval-steer build --learned-joint``) is
stored as ordinary entries, one per layer, all routed to the same documents: the set's first layer's
entry carries the set's name and each further layer's entry is named ``<name>@L<layer>``
(:func:`member_name`). Each vector alone was not trained to steer, the set was, so tools that
replace entries by name (``merge``) replace a set as one unit (:func:`set_name`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lm_eval_steer.runtime.vectorfile import SteeringEntry

_MEMBER = re.compile(r"(?P<set>.+)@L(?P<layer>[0-9]+)")


def member_name(name: str, layer: int) -> str:
    """The name of set ``name``'s entry at a further layer: ``<name>@L<layer>``."""
    return f"{name}@L{layer}"


def set_name(entry_name: str) -> str:
    """The set an entry belongs to: ``<name>`` for ``<name>@L<layer>``, else the entry's own name."""
    match = _MEMBER.fullmatch(entry_name)
    return match["set"] if match else entry_name


def joint_sets(entries: Iterable[SteeringEntry]) -> dict[str, list[int]]:
    """Set name -> its layers, for every set of two or more entries among ``entries``."""
    layers: dict[str, list[int]] = {}
    for entry in entries:
        layers.setdefault(set_name(entry.name), []).append(entry.layer)
    return {name: sorted(found) for name, found in layers.items() if len(found) > 1}
