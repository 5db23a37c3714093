"""selfopt: learned optimizers that train themselves.

``selfopt.pretrained()`` and ``selfopt.load(FILE)`` return the optax optimizer of a
self-trained learned optimizer (:mod:`selfopt.export`); JAX is imported on the first call, not
with the package, so ``selfopt.torch`` runs without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def pretrained(num_steps: int | None = None) -> Any:
    """The optax optimizer of the self-trained optimizer shipped with selfopt
    (docs/pretrained.md is its card)."""
    from selfopt.export import pretrained as _pretrained
    return _pretrained(num_steps)


def load(path: str | Path, num_steps: int | None = None) -> Any:
    """The optax optimizer of a file written by ``selfopt export``; ``num_steps`` is the number
    of updates the run will take (read by architectures that know the time left)."""
    from selfopt.export import load as _load
    return _load(Path(path), num_steps)
