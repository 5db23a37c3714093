"""Running an optimizer on a task and recording how training goes.

The measurements every comparison in ``selfopt`` is built on: the same task, initial parameters
and minibatches for every optimizer under test (learned or hand-designed), so that differences in
the loss curves come from the optimizers alone.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfopt.tasks.base import Task


@functools.partial(jax.jit, static_argnames=("optimizer", "num_steps"))
def _train_losses(task: Task, optimizer: optax.GradientTransformation, key: jax.Array,
                  num_steps: int) -> jax.Array:
    init_key, data_key = jax.random.split(key)
    params = task.init(init_key)

    def step(carry, t):
        params, state = carry
        batch = task.sample_batch(jax.random.fold_in(data_key, t))
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        extra = {"loss": loss} if isinstance(optimizer, optax.GradientTransformationExtraArgs) else {}
        updates, state = optimizer.update(grads, state, params, **extra)
        return (optax.apply_updates(params, updates), state), loss

    return jax.lax.scan(step, (params, optimizer.init(params)), jnp.arange(num_steps))[1]


def train_losses(task: Task, optimizer: optax.GradientTransformation, key: jax.Array,
                 num_steps: int) -> np.ndarray:
    """The training loss before each of ``num_steps`` updates of ``optimizer`` on ``task``.

    One jitted ``lax.scan``, compiled once per (task shape, optimizer, num_steps). Initial
    parameters come from ``key``, and so does the batch of step ``t``
    (``fold_in(data_key, t)``): two optimizers given the same key see the same problem.

    Args:
      task: the task (passed as an argument: its arrays are not baked into the program).
      optimizer: any optax optimizer (a static argument: reuse the same object to reuse the
        compiled code); a ``GradientTransformationExtraArgs``, such as a learned optimizer,
        also receives ``loss=``.
      key: PRNG key for the initial parameters and the batches.
      num_steps: number of updates.

    Returns:
      ``(num_steps,)`` float array of losses.
    """
    return np.asarray(_train_losses(task, optimizer, key, num_steps))
