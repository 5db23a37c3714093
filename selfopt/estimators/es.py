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
from typing import NamedTuple

import jax
import jax.numpy as jnp

from selfopt.estimators import inner_problem
from selfopt.estimators.truncation import LengthSchedule, LogUniformLength
from selfopt.lopt.base import LearnedOptimizer, Theta
from selfopt.tasks.base import SPLITS, Task


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

    Attributes:
      lopt: the learned-optimizer architecture whose weights are meta-trained.
      num_pairs: antithetic pairs (= inner problems in flight) per estimate.
      truncation_length: inner steps per truncation.
      schedule: distribution of inner-problem lengths.
      normalization: ``"ratio"`` or ``"log"`` (see ``inner_problem.normalized_loss``).
      loss_cap: largest normalised loss; a diverged step counts as this.
      log_floor: with ``log`` normalisation, the smallest normalised loss that counts (1e-6:
        precision beyond a millionth of the initial loss earns nothing).
      meta_loss: ``"mean"``, the normalised loss averaged over the truncation's steps, or
        ``"final"``, over its last 10% (``inner_problem.LOSS_AVERAGES``) **(ours)**: with a
        truncation as long as the inner problem, that is the final loss evaluation measures.
      meta_split: the data the meta-loss is measured on (``inner_problem.unroll``'s
        ``split``): ``"train"``, the training loss, or ``"test"``, the same parameters' loss on
        the task's test split **(ours; the paper's choice is open)**: an optimizer that
        overfits its minibatches is then not rewarded for it.
    """

    lopt: LearnedOptimizer
    num_pairs: int = 4
    truncation_length: int = 20
    schedule: LengthSchedule = LogUniformLength(100, 1000)
    normalization: str = "ratio"
    loss_cap: float = 10.0
    log_floor: float = 1e-6
    meta_loss: str = "mean"
    meta_split: str = "train"

    def __post_init__(self):
        if self.num_pairs < 1 or self.truncation_length < 1:
            raise ValueError("TruncatedES needs num_pairs >= 1 and truncation_length >= 1, got "
                             f"{self.num_pairs} and {self.truncation_length}")
        if self.normalization not in inner_problem.NORMALIZATIONS:
            raise ValueError(f"unknown normalization {self.normalization!r}; choose one of "
                             f"{inner_problem.NORMALIZATIONS}")
        if self.meta_loss not in inner_problem.LOSS_AVERAGES:
            raise ValueError(f"unknown meta_loss {self.meta_loss!r}; choose one of "
                             f"{inner_problem.LOSS_AVERAGES}")
        if self.meta_split not in SPLITS:
            raise ValueError(f"unknown meta_split {self.meta_split!r}; choose one of {SPLITS}")

    def init_state(self, task: Task, theta: Theta, key: jax.Array) -> inner_problem.InnerState:
        """``num_pairs`` staggered inner problems (leading axis = pair)."""
        keys = jax.random.split(key, self.num_pairs)
        return jax.vmap(lambda k: inner_problem.staggered_inner_state(
            self.lopt, theta, task, k, self.schedule, self.truncation_length))(keys)

    def unroll_pairs(self, task: Task, theta: Theta, sigma: jax.Array, eps: Theta,
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
        tail = inner_problem.tail_steps(self.truncation_length, self.meta_loss)
        end, losses = jax.vmap(lambda t, s: inner_problem.unroll(
            self.lopt, t, task, s, self.truncation_length, self.normalization, self.loss_cap,
            tail, self.meta_split, self.log_floor))(thetas, join(pos, neg))
        first, second = (jax.tree.map(lambda x: x[:num], end), jax.tree.map(lambda x: x[num:], end))
        return (losses[:num], losses[num:]), (first, second)

    def partial_sums(self, task: Task, theta: Theta, sigma: jax.Array,
                     state: inner_problem.InnerState, keys: jax.Array
                     ) -> tuple[EstimateSums, inner_problem.InnerState]:
        """Sums of the estimate over the pairs in ``state`` (any number of them).

        Splitting the pairs (and their keys) into shards and adding the shards' sums gives
        exactly the sums of one call over all pairs.

        Args:
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
            self.lopt, theta, task, s, k, self.schedule))(state, restart_keys)
        eps = jax.vmap(lambda k: tree_normal_like(k, theta))(eps_keys)
        (loss_pos, loss_neg), (end_pos, _) = self.unroll_pairs(task, theta, sigma, eps, state, state)
        return pair_sums(loss_pos, loss_neg, sigma, eps), end_pos

    def estimate(self, task: Task, theta: Theta, sigma: jax.Array, state: inner_problem.InnerState,
                 key: jax.Array) -> tuple[Estimate, inner_problem.InnerState]:
        """The meta-gradient estimate over all pairs in ``state`` (see the module docstring)."""
        sums, state = self.partial_sums(task, theta, sigma, state,
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
