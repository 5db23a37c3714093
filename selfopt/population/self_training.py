"""The self-training update: learned optimizers from the population update each other.

Method.md sections 1 and 4. Member ``i``'s weights are ordinary parameters, and a learned
optimizer taken from the population itself turns its meta-gradient estimate into a step:

    theta_i <- theta_i + exp(log_step_mult_i) * LO_{theta_j}(clip(g_i), outer_state_i, theta_i)

exactly as the LO updates any task's parameters (the same ``optimizer(theta).update`` call).
``outer_state_i`` (momenta etc. of member i's own training) is kept per member. Which member
``j`` lends its optimizer is the *policy* **(ours)**: ``self`` (j = i), ``best`` (the member
PBT last ranked first) or ``random``. No hand-designed optimizer is involved.

:class:`AdamControl` is the conventional control: the same architecture meta-trained by optax
Adam, with the same interface, so the training loop runs either through one code path.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import optax

from selfopt.checks import check_bool, check_choice, check_number
from selfopt.lopt.base import LearnedOptimizer, Theta

POLICIES = ("self", "best", "random")


def _member_mean(tree: Theta, fn) -> jax.Array:
    """``(K,)`` the mean of elementwise ``fn`` over all weights of each member (leading axis
    K); ``fn`` sees each leaf as ``(K, size)``."""
    leaves = jax.tree.leaves(tree)
    num = leaves[0].shape[0]
    total = sum(jnp.sum(fn(x.reshape(num, -1)), axis=1) for x in leaves)
    return total / sum(x[0].size for x in leaves)


def _per_member(value: jax.Array, like: jax.Array) -> jax.Array:
    """``(K,)`` ``value`` reshaped to broadcast against ``like`` (leading axis K)."""
    return value.reshape((-1,) + (1,) * (like.ndim - 1))


def member_rms(tree: Theta) -> jax.Array:
    """``(K,)`` root mean square over all weights of each member (leading axis K)."""
    return jnp.sqrt(_member_mean(tree, jnp.square))


def clip_threshold(grads: Theta, clip: float, relative: bool = False) -> jax.Array:
    """``(K,)`` each member's elementwise clip threshold for its ES estimate (method.md
    section 3): ``clip`` itself, or with ``relative`` **(ours)** ``clip`` times the RMS of the
    member's estimate over all its weights. An absolute threshold turns ES into sign-ES once
    the estimate's scale grows well past it; a relative one cuts only the outliers, whatever
    the scale."""
    num = jax.tree.leaves(grads)[0].shape[0]
    return clip * member_rms(grads) if relative else jnp.full((num,), clip, jnp.float32)


def clip_estimate(grads: Theta, threshold: jax.Array) -> Theta:
    """Elementwise clip of each member's ES estimate to ``[-t_i, t_i]``, ``threshold`` ``(K,)``."""
    return jax.tree.map(lambda g: jnp.clip(g, -_per_member(threshold, g),
                                           _per_member(threshold, g)), grads)


def clipped_fraction(grads: Theta, threshold: jax.Array) -> jax.Array:
    """``(K,)`` the fraction of each member's estimate that :func:`clip_estimate` changes."""
    return _member_mean(grads, lambda g: jnp.abs(g) > _per_member(threshold, g))


def scale_and_add(thetas: Theta, updates: Theta, log_step_mult: jax.Array,
                  max_update: float) -> tuple[Theta, jax.Array]:
    """``theta_i + s_i * exp(log_step_mult_i) * update_i`` for every member (leading axis).

    ``s_i <= 1`` shrinks member i's whole step so that its root mean square over all weights is
    at most ``max_update`` **(ours)**: a trust region that keeps the direction and the relative
    sizes the optimizer chose. An LO that learned to take large steps on its tasks takes equally
    large steps on its own weights; without a bound that positive feedback runs away
    (docs/population.md).

    Returns:
      The new weights and ``(K,)`` the fraction ``s_i`` applied (1: the bound was not reached).
    """
    mult = jnp.exp(log_step_mult)
    steps = jax.tree.map(lambda u: _per_member(mult, u) * u, updates)
    shrink = jnp.minimum(1.0, max_update / jnp.maximum(member_rms(steps), 1e-30))
    new = jax.tree.map(lambda t, u: t + _per_member(shrink, u) * u, thetas, steps)
    return new, shrink


@dataclasses.dataclass(frozen=True)
class OuterUpdate:
    """What both outer optimizers share: the clip of the ES estimate and the trust region.

    Attributes:
      clip: elementwise clip of the ES estimate before it is used (method.md section 3).
      clip_relative: ``clip`` is in units of the estimate's RMS (see :func:`clip_threshold`).
      max_update: bound on the RMS of a member's step (see :func:`scale_and_add`).
    """

    clip: float = 3.0
    clip_relative: bool = True
    max_update: float = 0.003

    def __post_init__(self):
        check_number(self, "clip", 0, 1e6, open_low=True)
        check_bool(self, "clip_relative")
        check_number(self, "max_update", 0, 1e6, open_low=True)

    def threshold(self, grads: Theta) -> jax.Array:
        """``(K,)`` each member's clip threshold (:func:`clip_threshold`)."""
        return clip_threshold(grads, self.clip, self.clip_relative)

    def clipped(self, grads: Theta) -> Theta:
        """Each member's ES estimate, clipped elementwise."""
        return clip_estimate(grads, self.threshold(grads))


@dataclasses.dataclass(frozen=True)
class SelfTraining(OuterUpdate):
    """Members are updated by learned optimizers of the population (method.md section 4).

    Attributes (besides :class:`OuterUpdate`'s):
      policy: whose weights update member i: ``self``, ``best`` or ``random``.
    """

    kind: ClassVar[str] = "self"
    label: ClassVar[str] = "self-training"

    policy: str = "self"

    def __post_init__(self):
        super().__post_init__()
        check_choice(self, "policy", POLICIES)

    def init(self, lopt: LearnedOptimizer, thetas: Theta) -> Any:
        """Per-member outer state: the LO's state for member i's weights (leading axis K)."""
        return jax.vmap(lambda theta: lopt.optimizer(theta).init(theta))(thetas)

    def donors(self, num_members: int, best: jax.Array, key: jax.Array) -> jax.Array:
        """Index ``j`` of the member whose LO updates each member ``i``."""
        if self.policy == "self":
            return jnp.arange(num_members)
        if self.policy == "best":
            return jnp.full((num_members,), best)
        return jax.random.randint(key, (num_members,), 0, num_members)

    def update(self, lopt: LearnedOptimizer, thetas: Theta, outer_state: Any, grads: Theta,
               log_step_mult: jax.Array, best: jax.Array, key: jax.Array, losses: jax.Array
               ) -> tuple[Theta, Any, jax.Array]:
        """One self-training step of every member.

        Args:
          lopt: the members' architecture (and so the outer optimizers').
          thetas: members' weights, leading axis K.
          outer_state: from :meth:`init` (or a previous update).
          grads: members' meta-gradient estimates, leading axis K.
          log_step_mult: ``(K,)`` log step multipliers (PBT hyperparameters).
          best: index of the best member (used by the ``best`` policy).
          key: PRNG key (used by the ``random`` policy).
          losses: ``(K,)`` the members' meta-losses, the loss each LO is given with its
            gradient (the protocol's ``loss``).

        Returns:
          New weights, outer state, and ``(K,)`` the trust-region factor of each step.
        """
        num = log_step_mult.shape[0]
        donors = jax.tree.map(lambda t: t[self.donors(num, best, key)], thetas)

        def one(theta_i, state_i, grad_i, theta_j, loss_i):
            return lopt.optimizer(theta_j).update(grad_i, state_i, theta_i, loss=loss_i)

        updates, outer_state = jax.vmap(one)(thetas, outer_state, self.clipped(grads), donors,
                                             losses)
        new, shrink = scale_and_add(thetas, updates, log_step_mult, self.max_update)
        return new, outer_state, shrink


@dataclasses.dataclass(frozen=True)
class AdamControl(OuterUpdate):
    """The control: members meta-trained by optax Adam (hand-designed), same interface.

    The step is ``exp(log_step_mult_i) * adam_update(learning_rate)``, so PBT tunes the
    control's learning rate exactly as it tunes the self-training step multiplier.

    Attributes (besides :class:`OuterUpdate`'s):
      learning_rate: Adam's base learning rate.
    """

    kind: ClassVar[str] = "adam"
    label: ClassVar[str] = "adam-control"

    learning_rate: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        check_number(self, "learning_rate", 0, 10, open_low=True)

    def init(self, lopt: LearnedOptimizer, thetas: Theta) -> Any:
        del lopt
        return jax.vmap(optax.adam(self.learning_rate).init)(thetas)

    def update(self, lopt: LearnedOptimizer, thetas: Theta, outer_state: Any, grads: Theta,
               log_step_mult: jax.Array, best: jax.Array, key: jax.Array, losses: jax.Array
               ) -> tuple[Theta, Any, jax.Array]:
        """One Adam step of every member; arguments as :meth:`SelfTraining.update`."""
        del lopt, best, key, losses
        updates, outer_state = jax.vmap(optax.adam(self.learning_rate).update)(
            self.clipped(grads), outer_state, thetas)
        new, shrink = scale_and_add(thetas, updates, log_step_mult, self.max_update)
        return new, outer_state, shrink


OuterOptimizer = SelfTraining | AdamControl
