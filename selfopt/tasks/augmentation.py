"""Task augmentation: the same problem in a rescaled parametrisation.

:class:`Reparametrized` wraps a task so that the optimizer sees parameters ``phi`` with
``params = s * phi``, one positive scale ``s`` per tensor. The problem is unchanged (the same
losses along the same trajectories in ``params``), but every tensor's gradient is ``s`` times
larger and its parameters ``1 / s`` times smaller, so the step size that suits it changes by
``1 / s`` tensor by tensor: Adam's best learning rate on the wrapped task is ``1 / s`` of the
original's. A learned optimizer trained on such tasks cannot get by with one global step size;
it has to read each tensor's scale from its features. This is the weight reparametrisation of
learned_optimization's task augmentations and VeLO's training distribution, per tensor.

The scales are leaves, so tasks that differ only in their scales share compiled code: the
augmentation adds no task shapes. A configuration asks for it with ``reparam_scale`` (see
:func:`selfopt.tasks.make_task`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.tasks.base import Task, task_dataclass


def check_reparam_scale(value: Any) -> float:
    """``reparam_scale`` is a finite number >= 1 (1: no augmentation); returns it as a float."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not math.isfinite(value) or value < 1):
        raise ValueError(f"reparam_scale must be a finite number >= 1 (1: off), got {value!r}")
    return float(value)


@task_dataclass
class Reparametrized(Task):
    """``task`` optimised in ``phi``, where its parameters are ``exp(log_scales) * phi``.

    ``log_scales`` has the structure of ``task``'s parameters with one scalar per tensor.
    Family, batches and normalisation are ``task``'s; the initial ``phi`` is ``task``'s
    initial parameters divided by the scales, so training starts from the same point.
    """

    task: Task
    log_scales: Any

    @classmethod
    def create(cls, task: Task, reparam_scale: float, seed: int) -> Reparametrized:
        """Draws one scale per tensor of ``task``, log-uniform in ``[1/reparam_scale,
        reparam_scale]``, from ``seed`` (equal seeds give equal scales)."""
        reparam_scale = check_reparam_scale(reparam_scale)
        shapes = jax.eval_shape(task.init, jax.random.key(0))
        leaves, treedef = jax.tree_util.tree_flatten(shapes)
        half_width = np.log(reparam_scale)
        rng = np.random.default_rng([seed, 0x5CA1E])
        log_scales = rng.uniform(-half_width, half_width, len(leaves)).astype(np.float32)
        return cls(task=task, log_scales=jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(x) for x in log_scales]))

    @classmethod
    def identity(cls, task: Task) -> Reparametrized:
        """``task`` itself (every scale 1) in this wrapper: the same losses and gradients
        exactly, with the structure of an augmented task."""
        shapes = jax.eval_shape(task.init, jax.random.key(0))
        return cls(task=task, log_scales=jax.tree_util.tree_map(
            lambda _: jnp.zeros([], jnp.float32), shapes))

    @property
    def family(self) -> str:  # type: ignore[override]
        return self.task.family

    def scale(self, phi):
        """The wrapped task's parameters of ``phi``."""
        return jax.tree_util.tree_map(lambda x, ls: x * jnp.exp(ls).astype(x.dtype),
                                      phi, self.log_scales)

    def init(self, key: jax.Array):
        return jax.tree_util.tree_map(lambda p, ls: p * jnp.exp(-ls).astype(p.dtype),
                                      self.task.init(key), self.log_scales)

    def sample_batch(self, key: jax.Array, split: str = "train"):
        return self.task.sample_batch(key, split)

    def loss(self, params, batch) -> jax.Array:
        return self.task.loss(self.scale(params), batch)

    def normalize(self, loss: jax.Array, init_loss: jax.Array) -> jax.Array:
        return self.task.normalize(loss, init_loss)
