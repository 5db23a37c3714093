"""The starting point of self-training: a randomly initialised learned optimizer against Adam.

Trains one task twice from the same initial parameters and minibatches, once with a learned
optimizer whose weights are random (where every member of a self-training population starts)
and once with optax Adam, and reports both loss curves. ``selfopt train`` (the population) is
what turns the first into something that beats the second.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np
import optax

from selfopt.evaluate import train_losses
from selfopt.lopt import MLPLOpt, as_optax
from selfopt.tasks import make_task


class Curve(NamedTuple):
    """Training losses of one optimizer on one task."""

    name: str
    losses: np.ndarray  # (steps,) loss before each update


def run_demo(family: str = "mlp", steps: int = 300, seed: int = 0,
             adam_lr: float = 1e-3) -> list[Curve]:
    """Curves of a random MLP learned optimizer and of Adam on ``family``'s default task."""
    task = make_task({"family": family, "seed": seed})
    lopt = MLPLOpt()
    key = jax.random.key(seed)
    random_lo = as_optax(lopt, lopt.init(jax.random.fold_in(key, 1)), num_steps=steps)
    return [
        Curve("random learned optimizer", train_losses(task, random_lo, key, steps)),
        Curve(f"Adam (lr={adam_lr:g})", train_losses(task, optax.adam(adam_lr), key, steps)),
    ]
