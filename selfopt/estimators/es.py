"""Antithetic evolution strategies over truncated unrolls (method.md section 3).

For a member with weights ``theta`` and ES scale ``sigma``, each of ``num_pairs`` persistent
inner problems is unrolled for one truncation twice, from the same state and with the same
minibatches, under ``theta + sigma * eps`` and ``theta - sigma * eps``. With ``L+`` and ``L-``
the two meta-losses (mean normalised loss over the truncation), the estimate is

    g = mean over pairs of (L+ - L-) / (2 sigma) * eps,

the gradient of the Gaussian-smoothed meta-loss of the truncation (Salimans et al. 2017, as used
by Metz et al. 2020). It ignores how ``theta`` shaped the state the truncation starts from, which
is the *truncation bias* that PES (:mod:`selfopt.estimators.pes`) removes.

After the truncation an inner problem continues from the end state of its positive branch
**(ours**; with a small sigma the two branches barely differ, and continuing from one keeps the
pair's shared starting point without a third unroll).

Everything is a pure function of (theta, sigma, state, key), so a population's estimates are one
``jax.vmap`` over members, and :meth:`TruncatedES.partial_sums` on a shard of pairs can run on
another device or host and be summed.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from selfopt.checks import check_choice, check_int, check_number, is_int, require
from selfopt.estimators import inner_problem
from selfopt.estimators.truncation import LogUniformLength
from selfopt.lopt.base import LearnedOptimizer, Theta
from selfopt.tasks.base import Task


class EstimateSums(NamedTuple):
    """Sums over a shard of antithetic pairs; divide by ``count`` for the estimate."""

    grad_sum: Theta  # sum over pairs of (L+ - L-) / (2 sigma) * direction
    loss_sum: jax.Array  # sum over pairs of (L+ + L-) / 2, the meta-loss near theta
    count: jax.Array  # number of pairs summed


class Estimate(NamedTuple):
    """A meta-gradient estimate and the meta-loss it was measured at."""

    grad: Theta
    meta_loss: jax.Array


def tree_normal_like(key: jax.Array, tree: Theta) -> Theta:
    """Standard normal noise with the structure and shapes of ``tree``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)])


def perturb(theta: Theta, eps: Theta, scale: jax.Array) -> Theta:
    """``theta + scale * eps``, leaf by leaf."""
    return jax.tree.map(lambda t, e: t + scale * e, theta, eps)


def weighted_sum(weights: jax.Array, trees: Theta) -> Theta:
    """``sum_i weights[i] * trees[i]`` over the leading axis of every leaf."""
    return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1), trees)


@dataclasses.dataclass(frozen=True)
class TruncatedES:
    """Antithetic ES over truncated unrolls of persistent inner problems.

    The learned-optimizer architecture is an argument of every method, not a field: the
    estimator's configuration is its own (``TrainConfig.estimator``), and the same estimator
    serves any architecture.

    Attributes:
      num_pairs: antithetic pairs (= inner problems in flight) per estimate.
      truncation_length: inner steps per truncation.
      min_inner_length, max_inner_length: inner-problem lengths are drawn log-uniformly from
        this range (:class:`~selfopt.estimators.truncation.LogUniformLength`).
      normalization: ``"ratio"`` or ``"log"`` (see ``inner_problem.normalized_loss``).
      loss_cap: largest normalised loss; a diverged step counts as this.
      log_floor: with ``log`` normalisation, the smallest normalised loss that counts:
        precision beyond it earns nothing.
    """

    kind: ClassVar[str] = "es"

    num_pairs: int = 4
    truncation_length: int = 20
    min_inner_length: int = 100
    max_inner_length: int = 1000
    normalization: str = "log"
    loss_cap: float = 10.0
    log_floor: float = 1e-6

    def __post_init__(self):
        check_int(self, "num_pairs", 1, 4096)
        check_int(self, "truncation_length", 1, 1_000_000)
        check_int(self, "min_inner_length", 1, 10**7)
        require("max_inner_length", is_int(self.max_inner_length)
                and is_int(self.min_inner_length)
                and self.min_inner_length <= self.max_inner_length <= 10**7,
                "an integer in [min_inner_length, 10000000]", self.max_inner_length)
        check_choice(self, "normalization", inner_problem.NORMALIZATIONS)
        check_number(self, "loss_cap", 1, 1e6, open_low=True)
        check_number(self, "log_floor", 1e-30, 0.1, open_low=True)

    @property
    def schedule(self) -> LogUniformLength:
        """The distribution of inner-problem lengths."""
        return LogUniformLength(self.min_inner_length, self.max_inner_length)

    def init_state(self, lopt: LearnedOptimizer, task: Task, theta: Theta, key: jax.Array
                   ) -> inner_problem.InnerState:
        """``num_pairs`` staggered inner problems (leading axis = pair)."""
        keys = jax.random.split(key, self.num_pairs)
        return jax.vmap(lambda k: inner_problem.staggered_inner_state(
            lopt, theta, task, k, self.schedule, self.truncation_length))(keys)

    def unroll_pairs(self, lopt: LearnedOptimizer, task: Task, theta: Theta, sigma: jax.Array,
                     eps: Theta,
                     pos: inner_problem.InnerState, neg: inner_problem.InnerState):
        """Unrolls ``pos`` under ``theta + sigma * eps`` and ``neg`` under ``theta - sigma * eps``.

        Both branches of every pair run in one ``vmap`` of ``2 * num_pairs`` unrolls.

        Returns:
          ``(loss_pos, loss_neg), (end_pos, end_neg)``.
        """
        num = jnp.shape(jax.tree.leaves(eps)[0])[0]
        join = lambda a, b: jax.tree.map(lambda x, y: jnp.concatenate([x, y]), a, b)
        signs = jnp.concatenate([jnp.ones(num), -jnp.ones(num)])
        thetas = jax.vmap(lambda e, s: perturb(theta, e, s * sigma))(join(eps, eps), signs)
        end, losses = jax.vmap(lambda t, s: inner_problem.unroll(
            lopt, t, task, s, self.truncation_length, self.normalization, self.loss_cap,
            log_floor=self.log_floor))(thetas, join(pos, neg))
        first, second = (jax.tree.map(lambda x: x[:num], end), jax.tree.map(lambda x: x[num:], end))
        return (losses[:num], losses[num:]), (first, second)

    def partial_sums(self, lopt: LearnedOptimizer, task: Task, theta: Theta, sigma: jax.Array,
                     state: inner_problem.InnerState, keys: jax.Array
                     ) -> tuple[EstimateSums, inner_problem.InnerState]:
        """Sums of the estimate over the pairs in ``state`` (any number of them).

        Splitting the pairs (and their keys) into shards and adding the shards' sums gives
        exactly the sums of one call over all pairs.

        Args:
          lopt: the learned-optimizer architecture.
          task: the task all pairs train.
          theta: the member's LO weights.
          sigma: ES perturbation scale (a traced scalar: it may differ per member).
          state: inner problems, leading axis = pair.
          keys: one PRNG key per pair (restart and perturbation of that pair).

        Returns:
          The partial sums and the advanced inner problems.
        """
        restart_keys, eps_keys = split_pair_keys(keys)
        state = jax.vmap(lambda s, k: inner_problem.restart_if_done(
            lopt, theta, task, s, k, self.schedule))(state, restart_keys)
        eps = jax.vmap(lambda k: tree_normal_like(k, theta))(eps_keys)
        (loss_pos, loss_neg), (end_pos, _) = self.unroll_pairs(lopt, task, theta, sigma, eps,
                                                               state, state)
        return pair_sums(loss_pos, loss_neg, sigma, eps), end_pos

    def estimate(self, lopt: LearnedOptimizer, task: Task, theta: Theta, sigma: jax.Array,
                 state: inner_problem.InnerState, key: jax.Array
                 ) -> tuple[Estimate, inner_problem.InnerState]:
        """The meta-gradient estimate over all pairs in ``state`` (see the module docstring)."""
        sums, state = self.partial_sums(lopt, task, theta, sigma, state,
                                        jax.random.split(key, self.num_pairs))
        return finish(sums), state


def split_pair_keys(keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-pair keys -> (restart keys, perturbation keys), each one per pair."""
    both = jax.vmap(jax.random.split)(keys)
    return both[:, 0], both[:, 1]


def pair_sums(loss_pos: jax.Array, loss_neg: jax.Array, sigma: jax.Array,
              directions: Theta) -> EstimateSums:
    """``EstimateSums`` of antithetic pairs whose perturbation directions are ``directions``."""
    return EstimateSums(
        grad_sum=weighted_sum((loss_pos - loss_neg) / (2 * sigma), directions),
        loss_sum=jnp.sum(0.5 * (loss_pos + loss_neg)),
        count=jnp.asarray(jnp.shape(loss_pos)[0], jnp.float32),
    )


def finish(sums: EstimateSums) -> Estimate:
    """Turns (possibly combined) partial sums into the mean estimate."""
    return Estimate(grad=jax.tree.map(lambda g: g / sums.count, sums.grad_sum),
                    meta_loss=sums.loss_sum / sums.count)
