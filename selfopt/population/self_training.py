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
from typing import Any

import jax
import jax.numpy as jnp
import optax

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
    the estimate's scale grows past it (in a laptop run the median member's estimate has RMS
    0.1-0.4 after its first 100 outer steps, and the paper's 0.1 clips 70% of it); a relative
    one cuts only the outliers, whatever the scale."""
    num = jax.tree.leaves(grads)[0].shape[0]
    return clip * member_rms(grads) if relative else jnp.full((num,), clip, jnp.float32)


def clip_estimate(grads: Theta, threshold: jax.Array) -> Theta:
    """Elementwise clip of each member's ES estimate to ``[-t_i, t_i]``, ``threshold`` ``(K,)``."""
    return jax.tree.map(lambda g: jnp.clip(g, -_per_member(threshold, g),
                                           _per_member(threshold, g)), grads)


def clipped_fraction(grads: Theta, threshold: jax.Array) -> jax.Array:
    """``(K,)`` the fraction of each member's estimate that :func:`clip_estimate` changes."""
    return _member_mean(grads, lambda g: jnp.abs(g) > _per_member(threshold, g))


#: What the trust region bounds: the ``step`` itself, or the optimizer's ``proposal`` before
#: the step multiplier scales it.
TRUST_REGIONS = ("step", "proposal")


def scale_and_add(thetas: Theta, updates: Theta, log_step_mult: jax.Array,
                  max_update: float, trust_region: str = "step") -> Theta:
    """``theta_i + s_i * exp(log_step_mult_i) * update_i`` for every member (leading axis).

    ``s_i <= 1`` shrinks member i's whole step so that its root mean square over all weights is
    at most ``max_update`` **(ours)**: a trust region that keeps the direction and the relative
    sizes the optimizer chose. An LO that learned to take large steps on its tasks takes equally
    large steps on its own weights; without a bound that positive feedback ran away within a
    minute of a laptop run (docs/population.md).

    With ``trust_region="proposal"`` the bound applies to ``update_i`` before the multiplier,
    so the step's RMS is at most ``max_update * exp(log_step_mult_i)``: the multiplier (which
    PBT tunes) sets the step length even when the bound is active, as it is on nearly every
    step of a laptop run; with ``"step"`` it no longer matters then.

    Returns:
      The new weights and ``(K,)`` the fraction ``s_i`` applied (1: the bound was not reached).
    """
    if trust_region not in TRUST_REGIONS:
        raise ValueError(f"trust_region must be one of {TRUST_REGIONS}, got {trust_region!r}")
    mult = jnp.exp(log_step_mult)
    steps = jax.tree.map(lambda u: _per_member(mult, u) * u, updates)
    bounded = member_rms(steps if trust_region == "step" else updates)
    shrink = jnp.minimum(1.0, max_update / jnp.maximum(bounded, 1e-30))
    new = jax.tree.map(lambda t, u: t + _per_member(shrink, u) * u, thetas, steps)
    return new, shrink


@dataclasses.dataclass(frozen=True)
class SelfTraining:
    """Members are updated by learned optimizers of the population.

    Attributes:
      lopt: the architecture of every member (and so of every outer optimizer).
      policy: whose weights update member i: ``self``, ``best`` or ``random``.
      clip: elementwise clip of the ES estimate before it is used.
      clip_relative: ``clip`` is in units of the estimate's RMS (see :func:`clip_threshold`).
      max_update: bound on the RMS of a member's step (see :func:`scale_and_add`).
      trust_region: what ``max_update`` bounds (see :func:`scale_and_add`).
      horizon: the number of outer steps the members' optimizers are told self-training takes
        (their ``num_steps``; only an LO that reads the fraction of training done uses it).
        Self-training is open-ended, so this is nominal: longer than a run, so the LOs treat
        their own training as early in a long run.
    """

    lopt: LearnedOptimizer
    policy: str = "self"
    clip: float = 0.1
    max_update: float = 0.01
    trust_region: str = "step"
    horizon: int = 10_000
    clip_relative: bool = False

    label = "self-training"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")

    @property
    def outer_lopt(self) -> LearnedOptimizer:
        """The LO as it updates the members: without ``step_adaptation`` (its first two outputs
        only) and with a constant ``step_schedule``. On the noisy ES estimates a member's step
        scale integrated down to its bound within 600 outer steps and froze self-training
        (docs/results.md); the trust region and PBT's step multiplier set the length of the
        members' steps instead. Self-training is open-ended: no schedule decays its steps."""
        changes = {}
        if getattr(self.lopt, "step_adaptation", 0):
            changes["step_adaptation"] = 0.0
        if getattr(self.lopt, "step_schedule", "constant") != "constant":
            changes["step_schedule"] = "constant"
        return dataclasses.replace(self.lopt, **changes) if changes else self.lopt

    def init(self, thetas: Theta) -> Any:
        """Per-member outer state: the LO's state for member i's weights (leading axis K)."""
        return jax.vmap(lambda theta: self.outer_lopt.optimizer(theta, self.horizon).init(theta))(
            thetas)

    def donors(self, num_members: int, best: jax.Array, key: jax.Array) -> jax.Array:
        """Index ``j`` of the member whose LO updates each member ``i``."""
        if self.policy == "self":
            return jnp.arange(num_members)
        if self.policy == "best":
            return jnp.full((num_members,), best)
        return jax.random.randint(key, (num_members,), 0, num_members)

    def update(self, thetas: Theta, outer_state: Any, grads: Theta, log_step_mult: jax.Array,
               best: jax.Array, key: jax.Array, losses: jax.Array | None = None
               ) -> tuple[Theta, Any, jax.Array]:
        """One self-training step of every member.

        Args:
          thetas: members' weights, leading axis K.
          outer_state: from :meth:`init` (or a previous update).
          grads: members' meta-gradient estimates, leading axis K.
          log_step_mult: ``(K,)`` log step multipliers (PBT hyperparameters).
          best: index of the best member (used by the ``best`` policy).
          key: PRNG key (used by the ``random`` policy).
          losses: ``(K,)`` the members' meta-losses, the loss each LO is given with its
            gradient (required by an LO that reads the loss, ``MLPLOpt(loss_features=True)``).

        Returns:
          New weights, outer state, and ``(K,)`` the trust-region factor of each step.
        """
        num = log_step_mult.shape[0]
        extra = {} if losses is None else {"loss": losses}
        donors = jax.tree.map(lambda t: t[self.donors(num, best, key)], thetas)
        grads = clip_estimate(grads, clip_threshold(grads, self.clip, self.clip_relative))

        def one(theta_i, state_i, grad_i, theta_j, extra_i):
            return self.outer_lopt.optimizer(theta_j).update(grad_i, state_i, theta_i, **extra_i)

        updates, outer_state = jax.vmap(one)(thetas, outer_state, grads, donors, extra)
        new, shrink = scale_and_add(thetas, updates, log_step_mult, self.max_update,
                                   self.trust_region)
        return new, outer_state, shrink


@dataclasses.dataclass(frozen=True)
class AdamControl:
    """The control: members meta-trained by optax Adam (hand-designed), same interface.

    The step is ``exp(log_step_mult_i) * adam_update(learning_rate)``, so PBT tunes the
    control's learning rate exactly as it tunes the self-training step multiplier.

    Attributes:
      learning_rate: Adam's base learning rate.
      clip: elementwise clip of the ES estimate before it is used.
      max_update: bound on the RMS of a member's step, as for self-training.
      trust_region: what ``max_update`` bounds, as for self-training.
      clip_relative: ``clip`` is in units of the estimate's RMS, as for self-training.
    """

    learning_rate: float = 1e-3
    clip: float = 0.1
    max_update: float = 0.01
    trust_region: str = "step"
    clip_relative: bool = False

    label = "adam-control"

    def init(self, thetas: Theta) -> Any:
        return jax.vmap(optax.adam(self.learning_rate).init)(thetas)

    def update(self, thetas: Theta, outer_state: Any, grads: Theta, log_step_mult: jax.Array,
               best: jax.Array, key: jax.Array, losses: jax.Array | None = None
               ) -> tuple[Theta, Any, jax.Array]:
        """One Adam step of every member; arguments as :meth:`SelfTraining.update`."""
        del best, key, losses
        adam = optax.adam(self.learning_rate)
        grads = clip_estimate(grads, clip_threshold(grads, self.clip, self.clip_relative))
        updates, outer_state = jax.vmap(adam.update)(grads, outer_state, thetas)
        new, shrink = scale_and_add(thetas, updates, log_step_mult, self.max_update,
                                   self.trust_region)
        return new, outer_state, shrink


OuterOptimizer = SelfTraining | AdamControl
