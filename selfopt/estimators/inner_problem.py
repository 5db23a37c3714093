"""Inner problems and truncated unrolls: the work both ES and PES are made of.

An inner problem is a task's parameters being trained by a learned optimizer, together with
everything needed to continue it later (optimizer state, step, sampled length, data key, and the
loss at initialisation used to normalise). Inner problems persist across truncations and restart
with fresh parameters once their sampled length is reached, or when they diverge.

Restarts happen only at truncation boundaries **(ours)**: a sampled length is effectively rounded
up to a whole number of truncations, so one truncation never spans two problems and a PES
accumulator resets exactly when its problem does.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfopt.estimators.truncation import LengthSchedule
from selfopt.lopt.base import LearnedOptimizer, Theta
from selfopt.tasks.base import Task

NORMALIZATIONS = ("ratio", "log")
#: What a score averages over an unroll's normalised losses: every step
#: (``mean``) or the last 10% of the steps, at least one (``final``, as evaluation's final loss).
LOSS_AVERAGES = ("mean", "final")


def tail_steps(num_steps: int, average: str) -> int | None:
    """The ``tail`` of :func:`unroll` that gives ``average`` over ``num_steps`` steps."""
    if average not in LOSS_AVERAGES:
        raise ValueError(f"unknown loss average {average!r}; choose one of {LOSS_AVERAGES}")
    return max(1, num_steps // 10) if average == "final" else None


class InnerState(NamedTuple):
    """One inner problem in flight."""

    params: Any  # the task's parameters
    opt_state: Any  # the learned optimizer's state for those parameters
    step: jax.Array  # int32: steps taken in this problem
    length: jax.Array  # int32: steps after which the problem restarts
    init_loss: jax.Array  # float32: loss at initialisation, the normaliser's reference
    data_key: jax.Array  # PRNG key: the batch of step t is drawn from fold_in(data_key, t)
    diverged: jax.Array  # bool: a non-finite loss was seen; restart at the next boundary


def new_inner_state(lopt: LearnedOptimizer, theta: Theta, task: Task, key: jax.Array,
                    schedule: LengthSchedule) -> InnerState:
    """A freshly initialised inner problem with its length drawn from ``schedule``."""
    init_key, data_key, length_key = jax.random.split(key, 3)
    params = task.init(init_key)
    init_loss = task.loss(params, task.sample_batch(jax.random.fold_in(data_key, 0)))
    length = schedule.sample(length_key)
    return InnerState(
        params=params,
        # the problem's length is its horizon: the learned-optimizer protocol passes it (and the
        # loss) for an architecture that reads them; MLPLOpt does not
        opt_state=lopt.optimizer(theta, num_steps=length).init(params),
        step=jnp.zeros([], jnp.int32),
        length=length,
        init_loss=jnp.asarray(init_loss, jnp.float32),
        data_key=data_key,
        diverged=jnp.zeros([], bool),
    )


def staggered_inner_state(lopt: LearnedOptimizer, theta: Theta, task: Task, key: jax.Array,
                          schedule: LengthSchedule, truncation_length: int) -> InnerState:
    """A fresh inner problem whose *first* life is cut short by a random number of truncations.

    Started all at once, a batch of problems would also restart all at once, and every meta-
    gradient would see the same phase of training; staggering spreads them out from the start.
    """
    state_key, offset_key = jax.random.split(key)
    state = new_inner_state(lopt, theta, task, state_key, schedule)
    num_truncations = jnp.maximum(state.length // truncation_length, 1)
    offset = jax.random.randint(offset_key, [], 0, num_truncations) * truncation_length
    return state._replace(step=offset.astype(jnp.int32))


def is_done(state: InnerState) -> jax.Array:
    """Whether the problem must restart before its next truncation."""
    return (state.step >= state.length) | state.diverged


def replace_where(done: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``done`` else ``old``, leaf by leaf (both pytrees of one structure)."""
    return jax.tree.map(lambda a, b: jnp.where(done, a, b), new, old)


def restart_if_done(lopt: LearnedOptimizer, theta: Theta, task: Task, state: InnerState,
                    key: jax.Array, schedule: LengthSchedule) -> InnerState:
    """Replaces a finished or diverged problem by a fresh one (drawn from ``key``)."""
    fresh = new_inner_state(lopt, theta, task, key, schedule)
    return replace_where(is_done(state), fresh, state)


def normalized_loss(task: Task, loss: jax.Array, init_loss: jax.Array, normalization: str,
                    loss_cap: float, log_floor: float = 1e-6) -> jax.Array:
    """The per-step meta-loss term: the task-normalised loss, capped and NaN-proof.

    ``ratio``: ``task.normalize(loss, init_loss)`` in ``[0, loss_cap]``. ``log``: its log, in
    ``[log(log_floor), log(loss_cap)]``: below ``log_floor`` more precision earns nothing. A
    non-finite loss (a diverged unroll) gives the cap, so a diverging perturbation is
    penalised with a large finite value and never yields NaN.
    """
    ratio = task.normalize(loss, init_loss)
    ratio = jnp.where(jnp.isfinite(ratio), jnp.clip(ratio, 0.0, loss_cap), loss_cap)
    if normalization == "log":
        return jnp.log(jnp.maximum(ratio, log_floor))
    if normalization == "ratio":
        return ratio
    raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")


def ratio_scale(meta_loss, normalization: str):
    """A meta-loss on the ratio scale (1 = no progress), whatever the normalisation: as it is
    for ``ratio``; for ``log``, ``exp`` of the mean log, the geometric mean of the ratios."""
    if normalization == "log":
        return np.exp(meta_loss)
    if normalization == "ratio":
        return meta_loss
    raise ValueError(f"unknown normalization {normalization!r}; choose one of {NORMALIZATIONS}")


def unroll(lopt: LearnedOptimizer, theta: Theta, task: Task, state: InnerState, num_steps: int,
           normalization: str = "ratio", loss_cap: float = 10.0, tail: int | None = None,
           log_floor: float = 1e-6) -> tuple[InnerState, jax.Array]:
    """Trains the inner problem ``num_steps`` steps with the LO of weights ``theta``.

    Args:
      lopt, theta: the learned optimizer and its weights.
      task: the task (a pytree; its arrays are arguments, not constants).
      state: the inner problem to continue.
      num_steps: truncation length (static).
      normalization, loss_cap, log_floor: see :func:`normalized_loss`.
      tail: average only the last ``tail`` steps' losses (static; ``None``: every step).

    Returns:
      The advanced state and the meta-loss of the truncation: the mean over its steps (or its
      last ``tail`` steps) of the normalised training loss before each update.
    """
    opt = lopt.optimizer(theta)
    step = lambda s, _: inner_step(opt, task, s, normalization, loss_cap, log_floor)
    state, losses = jax.lax.scan(step, state, None, length=num_steps)
    return state, jnp.mean(losses if tail is None else losses[num_steps - tail:])


def inner_step(opt: optax.GradientTransformation, task: Task, s: InnerState,
               normalization: str = "ratio", loss_cap: float = 10.0, log_floor: float = 1e-6
               ) -> tuple[InnerState, jax.Array]:
    """One step of an inner problem under the learned optimizer ``opt``: the next state and
    the normalised training loss before the update (:func:`normalized_loss`)."""
    key, params = jax.random.fold_in(s.data_key, s.step), s.params
    batch = task.sample_batch(key)
    loss, grads = jax.value_and_grad(task.loss)(params, batch)
    updates, opt_state = opt.update(grads, s.opt_state, params, loss=loss)
    s = s._replace(
        params=optax.apply_updates(params, updates),
        opt_state=opt_state,
        step=s.step + 1,
        diverged=s.diverged | ~jnp.isfinite(loss),
    )
    return s, normalized_loss(task, loss, s.init_loss, normalization, loss_cap, log_floor)
