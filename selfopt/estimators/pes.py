"""Persistent evolution strategies (PES; Vicol, Metz, Sohl-Dickstein, ICML 2021).

Truncated ES (:mod:`selfopt.estimators.es`) differentiates each truncation's meta-loss as if its
starting state did not depend on ``theta``; that makes it biased towards greedy, short-horizon
behaviour. PES removes the bias: the two branches of every antithetic pair keep *their own*
inner states across truncations, and each pair accumulates the perturbations it has applied since
its inner problem started. With ``xi = sum of eps`` over the truncations so far,

    g = mean over pairs of (L+ - L-) / (2 sigma) * xi,

which is an unbiased estimate of the gradient of the (smoothed) meta-loss of the current
truncation with respect to the ``theta`` used along the *whole* unroll so far. Summed over a
problem's truncations it is unbiased for the gradient of the whole-unroll meta-loss. When the
problem restarts (at a truncation boundary, see :mod:`selfopt.estimators.inner_problem`) both branches
restart from the same fresh state and ``xi`` resets to zero.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

from selfopt.estimators import inner_problem
from selfopt.estimators.es import (EstimateSums, TruncatedES, pair_sums, split_pair_keys,
                                   tree_normal_like)
from selfopt.lopt.base import LearnedOptimizer, Theta
from selfopt.tasks.base import Task


class PESState(NamedTuple):
    """The inner problems of PES; every leaf has a leading pair axis."""

    pos: inner_problem.InnerState  # branch unrolled with theta + sigma * eps
    neg: inner_problem.InnerState  # branch unrolled with theta - sigma * eps
    accumulated: Theta  # sum of eps since the pair's problem (re)started


@dataclasses.dataclass(frozen=True)
class PES(TruncatedES):
    """Antithetic PES; same attributes as :class:`~selfopt.estimators.es.TruncatedES`."""

    kind: ClassVar[str] = "pes"

    def init_state(self, lopt: LearnedOptimizer, task: Task, theta: Theta, key: jax.Array
                   ) -> PESState:
        """``num_pairs`` staggered problems, both branches equal, nothing accumulated."""
        inner = super().init_state(lopt, task, theta, key)
        zeros = jax.tree.map(lambda t: jnp.zeros((self.num_pairs, *jnp.shape(t)), jnp.result_type(t)),
                             theta)
        return PESState(pos=inner, neg=inner, accumulated=zeros)

    def partial_sums(self, lopt: LearnedOptimizer, task: Task, theta: Theta, sigma: jax.Array,
                     state: PESState, keys: jax.Array) -> tuple[EstimateSums, PESState]:
        """Sums of the PES estimate over the pairs in ``state``; arguments as in TruncatedES."""
        restart_keys, eps_keys = split_pair_keys(keys)

        def restart(pos, neg, acc, k):
            done = inner_problem.is_done(pos) | inner_problem.is_done(neg)
            fresh = inner_problem.new_inner_state(lopt, theta, task, k, self.schedule)
            zeros = jax.tree.map(jnp.zeros_like, acc)
            return tuple(inner_problem.replace_where(done, new, old)
                         for new, old in ((fresh, pos), (fresh, neg), (zeros, acc)))

        pos, neg, accumulated = jax.vmap(restart)(state.pos, state.neg, state.accumulated,
                                                  restart_keys)
        eps = jax.vmap(lambda k: tree_normal_like(k, theta))(eps_keys)
        accumulated = jax.tree.map(jnp.add, accumulated, eps)

        (loss_pos, loss_neg), (end_pos, end_neg) = self.unroll_pairs(
            lopt, task, theta, sigma, eps, pos, neg)
        sums = pair_sums(loss_pos, loss_neg, sigma, accumulated)
        return sums, PESState(pos=end_pos, neg=end_neg, accumulated=accumulated)
