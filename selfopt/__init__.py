"""selfopt: learned optimizers that train themselves.

``selfopt.pretrained(num_steps=None)`` and ``selfopt.load(FILE, num_steps=None)`` return the
optax optimizer of a self-trained learned optimizer (:mod:`selfopt.export`). They are loaded
on first use, not with the package, so ``selfopt.torch`` runs without JAX.
"""

_LAZY = ("load", "pretrained")


def __getattr__(name: str):
    if name in _LAZY:
        from selfopt import export
        return getattr(export, name)
    raise AttributeError(f"module 'selfopt' has no attribute {name!r}")
