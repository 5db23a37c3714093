"""SGD with a learned (log) step size: the smallest learned optimizer.

``theta = {"log_lr": scalar}`` and the update is ``-exp(log_lr) * g``. Its meta-gradient can be
computed exactly with ``jax.grad`` through an unroll, which makes it the reference problem for
checking ES and PES estimates; it is also a baseline that a richer LO should beat.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from selfopt.lopt.base import Theta, check_float_params


@dataclasses.dataclass(frozen=True)
class LearnedSGD:
    """SGD whose log learning rate is the learned weight.

    Attributes:
      init_log_lr: the log learning rate that :meth:`init` returns.
    """

    init_log_lr: float = float(jnp.log(1e-2))

    def init(self, key: jax.Array) -> Theta:
        """Returns ``{"log_lr": init_log_lr}`` (the key is unused: the start is fixed)."""
        del key
        return {"log_lr": jnp.asarray(self.init_log_lr, jnp.float32)}

    def optimizer(self, theta: Theta, num_steps: int | jax.Array | None = None
                  ) -> optax.GradientTransformationExtraArgs:
        """Plain SGD with learning rate ``exp(theta["log_lr"])`` (``num_steps`` is ignored)."""
        del num_steps

        def init_fn(params):
            check_float_params(params)
            return optax.EmptyState()

        def update_fn(grads, state, params=None, **extra_args):
            del params, extra_args
            check_float_params(grads, "grads")
            lr = jnp.exp(theta["log_lr"])
            return jax.tree.map(lambda g: -lr * g, grads), state

        return optax.GradientTransformationExtraArgs(init_fn, update_fn)
