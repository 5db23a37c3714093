"""What every learned optimizer is, and how its weights are checked.

A learned optimizer (LO) is a small, static, hashable description of an architecture with two
functions, in the shape optax gives to hand-designed optimizers:

* ``init(key) -> theta``: fresh LO weights, one pytree of float arrays (a few thousand numbers,
  so that a population of thetas and their perturbations can be ``vmap``-ed);
* ``optimizer(theta, num_steps=None) -> optax.GradientTransformationExtraArgs``: the optimizer
  those weights define, with ``init(params) -> state`` and ``update(grads, state, params,
  loss=...)``. ``num_steps`` (the number of updates the run will take) and ``loss`` (the loss at
  ``params``) are there for architectures that read the time left or the loss's trend; one
  that does not ignores them.

Nothing here knows about populations or meta-gradients; the LO is just an optimizer family
indexed by ``theta``.
"""
from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import optax

Theta = Any


class LearnedOptimizer(Protocol):
    """The protocol every learned-optimizer architecture follows (see the module docstring)."""

    def init(self, key: jax.Array) -> Theta: ...

    def optimizer(self, theta: Theta, num_steps: int | jax.Array | None = None
                  ) -> optax.GradientTransformationExtraArgs: ...


def check_theta(lopt: LearnedOptimizer, theta: Theta) -> None:
    """Raises ``ValueError`` if ``theta`` is not a set of weights for ``lopt``.

    Compares pytree structure and leaf shapes with ``lopt.init``'s output (computed abstractly,
    no FLOPs). Works inside ``jit``/``vmap`` because only static shapes are compared.
    """
    expected = jax.eval_shape(lopt.init, jax.random.key(0))
    exp_leaves, exp_def = jax.tree_util.tree_flatten_with_path(expected)
    try:
        got_leaves = exp_def.flatten_up_to(theta)
    except (ValueError, TypeError) as err:
        got_def = jax.tree_util.tree_structure(theta)
        raise ValueError(
            f"theta does not fit {type(lopt).__name__}: its structure {got_def} differs from {exp_def}"
        ) from err
    for (path, exp), got in zip(exp_leaves, got_leaves):
        shape = jnp.shape(got)
        if shape != exp.shape:
            raise ValueError(
                f"theta does not fit {type(lopt).__name__}: leaf {jax.tree_util.keystr(path)} has shape "
                f"{shape}, expected {exp.shape}"
            )


def check_float_params(tree: Any, what: str = "params") -> None:
    """Raises ``TypeError`` naming the first leaf of ``tree`` that is not floating point."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{what} leaf {jax.tree_util.keystr(path) or '<root>'} has dtype {dtype}; a "
                "learned optimizer can only train floating-point parameters"
            )


def as_optax(lopt: LearnedOptimizer, theta: Theta, num_steps: int | None = None
             ) -> optax.GradientTransformationExtraArgs:
    """The optax optimizer that ``lopt`` with weights ``theta`` defines, after checking theta.

    Use it like any optax optimizer: ``opt = as_optax(lopt, theta, num_steps=1000); state =
    opt.init(params); updates, state = opt.update(grads, state, params, loss=loss)``.
    """
    check_theta(lopt, theta)
    return lopt.optimizer(theta, num_steps)
