"""The per-parameter MLP with a learned schedule of its step length over a run (method.md
section 2; the simplest form of issue 32's step-length control).

The MLP of :mod:`selfopt.lopt.mlp_lopt` chooses every step from scale-free features and a
step-count embedding; it cannot lengthen or shorten its steps as a run of known length goes
on. Here ``K`` weights ``a_1..a_K`` of theta (zero at initialisation: no schedule) set a log
step multiplier that is piecewise linear in the fraction of training done ``f = t / T``:

    delta = exp(s(f)) * delta^MLP,   s(f) = interp(f; knots 0, 1/(K-1), ..., 1; a_1..a_K)

with ``s = 0`` where the horizon ``T`` is unknown (``num_steps=None``: the members' own
updates in self-training). K weights against the 2,000 of the MLP: an ES estimate of them
is cheap in variance, unlike a recurrent cell's.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import optax

from selfopt.checks import check_int
from selfopt.lopt.base import Theta
from selfopt.lopt.mlp_lopt import MLPLOpt


class ScheduledLOptState(NamedTuple):
    """Accumulators of :class:`ScheduledLOpt`: the MLP's and the run's horizon."""

    momenta: Any
    rms: Any
    step: jax.Array
    horizon: jax.Array  # float32: the run's number of updates, 0 when unknown


@dataclasses.dataclass(frozen=True)
class ScheduledLOpt(MLPLOpt):
    """Per-parameter MLP whose step is multiplied by a learned function of the fraction of
    training done (module docstring).

    Attributes (besides :class:`MLPLOpt`'s):
      schedule_knots: ``K``, equally spaced knots of the piecewise-linear log multiplier.
    """

    kind: ClassVar[str] = "scheduled"

    schedule_knots: int = 5

    def __post_init__(self):
        super().__post_init__()
        check_int(self, "schedule_knots", 2, 64)

    def init(self, key: jax.Array) -> Theta:
        """The MLP's random weights and a zero schedule (a fresh optimizer takes the MLP's
        steps)."""
        return {**super().init(key), "schedule": jnp.zeros(self.schedule_knots)}

    def log_multiplier(self, theta: Theta, step: jax.Array, horizon: jax.Array) -> jax.Array:
        """``s(t / T)``, or 0 where ``T`` is unknown (0)."""
        fraction = jnp.clip(step / jnp.maximum(horizon, 1.0), 0.0, 1.0)
        knots = jnp.linspace(0.0, 1.0, self.schedule_knots)
        return jnp.where(horizon > 0, jnp.interp(fraction, knots, theta["schedule"]), 0.0)

    def optimizer(self, theta: Theta, num_steps: int | jax.Array | None = None
                  ) -> optax.GradientTransformationExtraArgs:
        """The optax optimizer of these weights; ``num_steps``: the run's number of updates
        (``None``: unknown, no schedule)."""
        def init_fn(params):
            return ScheduledLOptState(*self.init_accumulators(params), horizon=jnp.asarray(
                0 if num_steps is None else num_steps, jnp.float32))

        def update_fn(grads, state, params=None, **extra_args):
            del extra_args
            step = state.step + 1
            treedef, p_leaves, steps, (new_m, new_v, _) = self.leaf_steps(theta, grads, state,
                                                                         params, step)
            scale = jnp.exp(self.log_multiplier(theta, step.astype(jnp.float32), state.horizon))
            updates = [(u * scale).astype(jnp.result_type(p)) for u, p in zip(steps, p_leaves)]
            new_state = ScheduledLOptState(
                momenta=jax.tree_util.tree_unflatten(treedef, new_m),
                rms=jax.tree_util.tree_unflatten(treedef, new_v), step=step,
                horizon=state.horizon)
            return jax.tree_util.tree_unflatten(treedef, updates), new_state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
