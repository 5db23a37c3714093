"""Meta-training a small learned optimizer: the meta-problem as a task (issue 6).

In self-training, every learned optimizer's own weights are trained by learned optimizers. The
``lopt_training`` family lets the population practise that problem on a small scale, as
learned_optimization's task families of learned-optimizer training do: the *parameters* are
the weights of a small :class:`~selfopt.lopt.MLPLOpt` (one hidden layer of 8 by default: 242
weights), a *batch* is an inner problem (a random diagonal quadratic with noisy gradients and a
random start) and the *loss* is that small optimizer's meta-loss on it: the mean of the inner
loss over an unroll of ``unroll`` steps, relative to the inner loss at the start. A task
training step is therefore one meta-gradient step (``jax.grad`` through the unroll), the
parameter vector has the structure of a learned optimizer's, and the loss has the noise and
curvature of a meta-loss.

The small optimizer takes steps 100x larger than the default :class:`~selfopt.lopt.MLPLOpt`
(``step_mult`` 0.1, :data:`INNER_STEP_MULT`), so that at random initialisation it moves the
inner quadratic within the unroll, and the loss is informative from the first step.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from selfopt.lopt.mlp_lopt import MLPLOpt
from selfopt.tasks.base import SPLITS, Task, static_field, task_dataclass
from selfopt.tasks.classifiers import check_positive_int, check_widths

#: ``step_mult`` of the small learned optimizer being trained.
INNER_STEP_MULT = 0.1
#: Inner curvatures are drawn log-uniformly from ``[10**LOG_CURVATURE[0], 10**LOG_CURVATURE[1]]``.
LOG_CURVATURE = (-2.0, 0.0)


@task_dataclass
class LOptTraining(Task):
    """Training a small MLP learned optimizer on random quadratics (see the module docstring).

    A batch is ``{"curvature", "target", "start"}`` of shape ``(inner_dim,)`` and ``"noise"``
    of shape ``(unroll, inner_dim)``: the inner loss is ``0.5 * sum(c * (w - target) ** 2)``
    and its gradient at inner step ``t`` is perturbed by ``noise[t]``, which a training batch
    draws with standard deviation ``noise`` and a test batch sets to 0.
    """

    hidden: tuple[int, ...] = static_field()
    unroll: int = static_field()
    inner_dim: int = static_field()
    noise: jax.Array  # () float32: standard deviation of the inner gradient noise

    family = "lopt_training"
    loss_floor = 0.0

    @classmethod
    def create(cls, seed: int = 0, hidden: tuple[int, ...] = (8,), unroll: int = 10,
               inner_dim: int = 8, noise: float = 0.1) -> LOptTraining:
        """The task; ``seed`` is unused (the inner problems are drawn per batch).

        Args:
          seed: accepted for uniformity with the other families.
          hidden: hidden widths of the small learned optimizer.
          unroll: inner steps per loss evaluation.
          inner_dim: dimension of the inner quadratics.
          noise: standard deviation of the inner gradient noise (training batches).
        """
        del seed
        hidden = check_widths("hidden", hidden)
        if not hidden or max(hidden) > 64:
            raise ValueError(f"hidden must be 1 or more widths in [1, 64], got {list(hidden)}")
        for name, value, hi in (("unroll", unroll, 100), ("inner_dim", inner_dim, 256)):
            if check_positive_int(name, value) > hi:
                raise ValueError(f"{name} must be an int in [1, {hi}], got {value!r}")
        if (not isinstance(noise, numbers.Real) or isinstance(noise, bool)
                or not 0.0 <= noise <= 10.0):
            raise ValueError(f"noise must be a number in [0, 10], got {noise!r}")
        return cls(hidden=hidden, unroll=unroll, inner_dim=inner_dim,
                   noise=jnp.asarray(noise, jnp.float32))

    @property
    def small_lopt(self) -> MLPLOpt:
        """The learned optimizer whose weights are this task's parameters."""
        return MLPLOpt(hidden=self.hidden, step_mult=INNER_STEP_MULT)

    def init(self, key: jax.Array):
        """Random weights of the small learned optimizer (:meth:`MLPLOpt.init`)."""
        return self.small_lopt.init(key)

    def sample_batch(self, key: jax.Array, split: str = "train") -> dict[str, jax.Array]:
        """An inner problem: curvatures, target and start, and the gradient noise per step."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        k_curv, k_target, k_start, k_noise = jax.random.split(key, 4)
        shape = (self.inner_dim,)
        scale = self.noise if split == "train" else 0.0
        return {"curvature": 10.0 ** jax.random.uniform(k_curv, shape, minval=LOG_CURVATURE[0],
                                                        maxval=LOG_CURVATURE[1]),
                "target": jax.random.normal(k_target, shape),
                "start": jax.random.normal(k_start, shape),
                "noise": scale * jax.random.normal(k_noise, (self.unroll, self.inner_dim))}

    def loss(self, params, batch: dict[str, jax.Array]) -> jax.Array:
        """Mean inner loss over the unroll's steps divided by the inner loss at the start."""
        curvature, target = batch["curvature"], batch["target"]

        def inner_loss(w):
            return 0.5 * jnp.sum(curvature * jnp.square(w - target))

        opt = self.small_lopt.optimizer(params)

        def step(carry, noise):
            w, state = carry
            grad = curvature * (w - target) + noise
            update, state = opt.update(grad, state, w)
            w = w + update
            return (w, state), inner_loss(w)

        start = batch["start"]
        _, losses = jax.lax.scan(step, (start, opt.init(start)), batch["noise"])
        return jnp.mean(losses) / jnp.maximum(inner_loss(start), 1e-8)
