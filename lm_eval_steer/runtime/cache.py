"""Separate key spaces in lm-eval's ``--use_cache`` database for different steering configurations.

lm-eval's ``CachingLM`` keys an answer by the request alone, so a steered run would read the
answers of an unsteered run that used the same cache path. ``CachingLM`` and its cache hook share
one ``SqliteDict``; switching that object's class to a subclass that prefixes every key gives the
steered model its own key space without touching the harness.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.cache
def _namespaced_class(base: type) -> type:
    # A direct subclass with no extra slots keeps the instance layout, so __class__ can be switched.
    class Namespaced(base):  # type: ignore[valid-type,misc]
        def _namespaced(self, key: Any) -> str:
            return f"{self._steer_namespace}/{key}"

        def __getitem__(self, key: Any) -> Any:
            return super().__getitem__(self._namespaced(key))

        def __setitem__(self, key: Any, value: Any) -> None:
            super().__setitem__(self._namespaced(key), value)

        def __delitem__(self, key: Any) -> None:
            super().__delitem__(self._namespaced(key))

        def __contains__(self, key: Any) -> bool:
            return super().__contains__(self._namespaced(key))

    Namespaced.__name__ = Namespaced.__qualname__ = f"Namespaced{base.__name__}"
    return Namespaced


def namespace_cache(cache: Any, namespace: str) -> None:
    """Makes ``cache`` (a ``SqliteDict`` or another dict-like object) store every key ``k`` as
    ``"<namespace>/<k>"``; calling it again replaces the namespace."""
    base = getattr(cache, "_steer_base", type(cache))
    cache.__class__ = _namespaced_class(base)
    cache._steer_base = base
    cache._steer_namespace = namespace
