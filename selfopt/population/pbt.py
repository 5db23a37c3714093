"""Population-based training: rank members fairly, copy the good over the bad, perturb.

Method.md section 5 (Jaderberg et al. 2017). Every ``interval`` outer steps the members are
scored on the *same* freshly drawn inner problems with their *unperturbed* weights (a score on
the ES pairs would reward a small sigma, which perturbs less, rather than a better optimizer);
the bottom ``exploit_fraction`` copy weights, outer state and hyperparameters of a member drawn
from the top fraction (exploit), then multiply each hyperparameter by 0.8 or 1.25, or with
``resample_probability`` redraw it from its prior (explore). Every copy is recorded in the
lineage. A member whose weights or meta-loss are not finite, or whose meta-loss shows its inner
problems diverging, is replaced at once.

Hyperparameters are kept as logs, so "multiply by 0.8" is "add log 0.8" and priors are
log-uniform.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.checks import (as_tuple, check_bool, check_choice, check_int, check_number,
                            is_number, require)
from selfopt.estimators import inner_problem
from selfopt.lopt.base import LearnedOptimizer, Theta
from selfopt.tasks.base import Task


#: Problems every member trains, and averages, in a score (:func:`score_members`).
SCORE_PROBLEMS = 2


class Hyperparams(NamedTuple):
    """Per-member hyperparameters under PBT's control, as logs; each leaf ``(K,)``."""

    log_step_mult: Any  # log multiplier of the outer (self-training) update
    log_sigma: Any  # log ES perturbation scale


@dataclasses.dataclass(frozen=True)
class PBT:
    """Exploit-and-explore configuration.

    Attributes:
      interval: outer steps between PBT rounds.
      exploit_fraction: fraction of members replaced each round (and size of the top pool; at
        least one member when above 0; 0: PBT only scores).
      perturb_factors: explore multiplies a hyperparameter by one of these.
      resample_probability: chance that explore redraws a hyperparameter from its prior.
      step_mult_prior: log-uniform range of the outer step multiplier.
      sigma_prior: log-uniform range of the ES sigma.
      explore_sigma: whether sigma is a PBT hyperparameter at all.
      score_steps: inner steps of the scoring unroll.
      score_loss: what a score averages (:func:`score_members`'s ``loss``; also the held-in
        validation's): ``mean`` over every step or ``final``, the last 10% of the steps.
    """

    interval: int = 50
    exploit_fraction: float = 0.25
    perturb_factors: tuple[float, float] = (0.8, 1.25)
    resample_probability: float = 0.1
    step_mult_prior: tuple[float, float] = (0.3, 30.0)
    sigma_prior: tuple[float, float] = (0.003, 0.03)
    explore_sigma: bool = True
    score_steps: int = 50
    score_loss: str = "final"

    def __post_init__(self):
        as_tuple(self, "perturb_factors", "step_mult_prior", "sigma_prior")
        check_int(self, "interval", 1, 1_000_000)
        check_number(self, "exploit_fraction", 0, 0.5)
        check_number(self, "resample_probability", 0, 1)
        require("perturb_factors", isinstance(self.perturb_factors, tuple)
                and len(self.perturb_factors) >= 1
                and all(is_number(f) and f > 0 for f in self.perturb_factors),
                "one or more positive factors", self.perturb_factors)
        for name, hi in (("step_mult_prior", 1000), ("sigma_prior", 1)):
            value = getattr(self, name)
            require(name, isinstance(value, tuple) and len(value) == 2
                    and all(is_number(v) and 0 < v <= hi for v in value) and value[0] <= value[1],
                    f"a pair [low, high] with 0 < low <= high <= {hi}", value)
        check_bool(self, "explore_sigma")
        check_int(self, "score_steps", 1, 1_000_000)
        check_choice(self, "score_loss", inner_problem.LOSS_AVERAGES)

    def priors(self) -> dict[str, tuple[float, float]]:
        """Hyperparameter name -> (low, high) of its log."""
        log = lambda lo_hi: (math.log(lo_hi[0]), math.log(lo_hi[1]))
        return {"log_step_mult": log(self.step_mult_prior), "log_sigma": log(self.sigma_prior)}

    def initial(self, rng: np.random.Generator, num_members: int) -> Hyperparams:
        """Hyperparameters drawn from their priors, one set per member."""
        return Hyperparams(**{name: rng.uniform(lo, hi, num_members).astype(np.float32)
                              for name, (lo, hi) in self.priors().items()})

    def explored(self, value: float, name: str, rng: np.random.Generator) -> float:
        """One hyperparameter (a log) after explore."""
        if name == "log_sigma" and not self.explore_sigma:
            return value
        lo, hi = self.priors()[name]
        if rng.uniform() < self.resample_probability:
            return float(rng.uniform(lo, hi))
        return float(value + math.log(rng.choice(self.perturb_factors)))

    def exploit_and_explore(self, scores: np.ndarray, hparams: Hyperparams,
                            rng: np.random.Generator) -> tuple[np.ndarray, Hyperparams, list]:
        """One PBT round on the host.

        Args:
          scores: ``(K,)`` lower is better; non-finite scores rank last.
          hparams: current hyperparameters (numpy).
          rng: randomness of the round.

        Returns:
          ``sources``: for each member, the index it now copies (itself if kept);
          the new hyperparameters; and ``(child, parent)`` index pairs of the copies made.
        """
        num = len(scores)
        order = np.argsort(np.where(np.isfinite(scores), scores, np.inf), kind="stable")
        count = (max(1, int(round(self.exploit_fraction * num)))
                 if num > 1 and self.exploit_fraction > 0 else 0)
        top, bottom = order[:count], order[num - count:] if count else []
        sources = np.arange(num)
        new = {name: np.array(values, np.float32) for name, values in hparams._asdict().items()}
        copies = []
        for child in bottom:
            parent = int(rng.choice(top))
            sources[child] = parent
            for name in new:
                new[name][child] = self.explored(float(new[name][parent]), name, rng)
            copies.append((int(child), parent))
        return sources, Hyperparams(**new), copies


def replace_failed(healthy: np.ndarray, scores: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Sources that replace every failed member by a random healthy top member.

    Args:
      healthy: ``(K,)`` whether each member is fine (finite and not diverging).
      scores: latest scores (lower is better), used to pick the parents.
      rng: randomness of the choice.

    Returns:
      ``sources`` as in :meth:`PBT.exploit_and_explore` and the ``(child, parent)`` pairs
      (none if no member is healthy: there is nothing to copy).
    """
    sources = np.arange(len(healthy))
    good = np.flatnonzero(healthy)
    if good.size == 0:
        return sources, []
    ranked = good[np.argsort(np.where(np.isfinite(scores[good]), scores[good], np.inf),
                             kind="stable")]
    pool = ranked[:max(1, len(ranked) // 2)]
    copies = []
    for child in np.flatnonzero(~healthy):
        parent = int(rng.choice(pool))
        sources[child] = parent
        copies.append((int(child), parent))
    return sources, copies


@dataclasses.dataclass(frozen=True)
class _Horizon:
    """The length schedule of a score: every problem runs ``length`` steps (may be traced)."""

    length: jax.Array

    def sample(self, key: jax.Array) -> jax.Array:
        del key
        return self.length


def score_members(lopt: LearnedOptimizer, thetas: Theta, task: Task, key: jax.Array,
                  num_steps: int | jax.Array, loss: str = "mean") -> jax.Array:
    """Fair, low-noise scores: every member trains the same problems with unperturbed weights.

    ``num_steps`` may be traced (a ``while`` loop, not a ``scan`` of static length), so one
    compiled program per task shape serves PBT's short scores and the validation's long ones.

    Args:
      lopt: the members' architecture.
      thetas: members' weights, leading axis K.
      task: the task to score on.
      key: draws the :data:`SCORE_PROBLEMS` problems (initial parameters and batches), shared
        by all.
      num_steps: inner steps per problem (at least 1).
      loss: ``mean`` (normalised training loss averaged over all steps: rewards fast progress)
        or ``final`` (averaged over the last 10% of the steps, at least one: rewards where
        training ends, as evaluation does, so an optimizer that is fast at first and then
        unstable scores badly).

    Returns:
      ``(K,)`` scores, lower is better; capped and NaN-proof as the meta-loss is.
    """
    if loss not in inner_problem.LOSS_AVERAGES:
        raise ValueError(f"unknown loss average {loss!r}; choose one of "
                         f"{inner_problem.LOSS_AVERAGES}")
    keys = jax.random.split(key, SCORE_PROBLEMS)
    num_steps = jnp.asarray(num_steps, jnp.int32)
    # the steps averaged: all (mean), or the last 10%, at least one (final)
    tail = jnp.maximum(1, num_steps // 10) if loss == "final" else num_steps

    def one_member(theta):
        opt = lopt.optimizer(theta)

        def one_problem(k):
            state = inner_problem.new_inner_state(lopt, theta, task, k, _Horizon(num_steps))

            def step(t, carry):
                state, total = carry
                state, term = inner_problem.inner_step(opt, task, state)
                return state, total + jnp.where(t >= num_steps - tail, term, 0.0)

            return jax.lax.fori_loop(0, num_steps, step, (state, jnp.float32(0.0)))[1] / tail
        return jnp.mean(jax.vmap(one_problem)(keys))

    return jax.vmap(one_member)(thetas)
