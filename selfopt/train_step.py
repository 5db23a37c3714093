"""One training step of the self-training population, as a pure function of its state.

    population -> ES/PES unrolls on a slot's task -> meta-gradients -> self-update
               -> replace failed members -> PBT (every pbt.interval) -> elite (every
                  validate_interval)

:func:`train_step` takes a :class:`~selfopt.population.state.PopulationState` and returns the
next one with the rows the step logs; it writes nothing. The device work of a step is the
members' estimates (:func:`member_estimates`, in ``shards`` blocks that a :data:`Backend` runs
here or on Ray workers) and one call of :func:`self_update`; or :func:`outer_steps` for
``steps_per_call`` whole steps in one ``lax.scan``. PBT and the elite run on the host.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from selfopt.cache import COMPILER_OPTIONS
from selfopt.config import TrainConfig
from selfopt.estimators.inner_problem import ratio_scale
from selfopt.population import Hyperparams, replace_failed, slots
from selfopt.population.elite import held_in_meta_loss, keep_best, score
from selfopt.population.lineage import copy_members, hparams_at
from selfopt.population.self_training import clipped_fraction, member_rms
from selfopt.population.state import (ESTIMATE, EXPLORE, INIT, REPLACE, SCORE, Lineage,
                                      PopulationState, finite_or_none, step_key, step_rng)


class StepOutput(NamedTuple):
    """What one :func:`train_step` reports."""

    metrics: dict[str, Any]  # the last outer step's per-member metrics; ``replaced``: {position:
    # kind} of the members replaced after it
    logs: dict[str, list[dict]]  # rows for each log file of the run directory


def member_estimates(lopt, estimator, task, thetas, log_sigma, inner, keys):
    """ES/PES meta-gradient estimates of a block of members (leading axis) on their problems
    of ``task``: one antithetic estimate per member, each with its own noise scale
    ``exp(log_sigma)`` and key.

    Returns:
      The members' :class:`~selfopt.estimators.es.Estimate` and their advanced problems.
    """
    return jax.vmap(estimator.estimate, in_axes=(None, None, 0, 0, 0, 0))(
        lopt, task, thetas, jnp.exp(log_sigma), inner, keys)


def self_update(lopt, outer, thetas, outer_state, hparams, best, estimates, key):
    """Every member's update from its estimate (the self-update, or the control's Adam step).

    Returns:
      New weights and outer state, and per-member metrics: the meta-loss near theta, whether
      the member is finite, the sizes of its estimate and update, and the trust-region factor
      applied to the update (1: not bounded).
    """
    new_thetas, outer_state, shrink = outer.update(lopt, thetas, outer_state, estimates.grad,
                                                   hparams.log_step_mult, best, key,
                                                   estimates.meta_loss)
    finite = jnp.isfinite(estimates.meta_loss)
    for leaf in jax.tree.leaves(new_thetas):
        finite &= jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)
    metrics = {"meta_loss": estimates.meta_loss, "finite": finite,
               "grad_rms": member_rms(estimates.grad),
               "clipped": clipped_fraction(estimates.grad, outer.threshold(estimates.grad)),
               "update_rms": member_rms(jax.tree.map(jnp.subtract, new_thetas, thetas)),
               "trust": shrink}
    return new_thetas, outer_state, metrics


def step_keys(key: jax.Array, num: int) -> tuple[jax.Array, jax.Array]:
    """An outer step's key as ``num`` members' estimate keys and the update's key."""
    es_key, update_key = jax.random.split(key)
    return jax.random.split(es_key, num), update_key


def outer_step(lopt, estimator, outer, thetas, outer_state, hparams, best, inner, task, key):
    """One outer step of the whole population: :func:`member_estimates`, then
    :func:`self_update`; returns new weights, outer state, problems and the metrics."""
    keys, update_key = step_keys(key, jax.tree.leaves(thetas)[0].shape[0])
    estimates, inner = member_estimates(lopt, estimator, task, thetas, hparams.log_sigma,
                                        inner, keys)
    new_thetas, outer_state, metrics = self_update(lopt, outer, thetas, outer_state, hparams,
                                                   best, estimates, update_key)
    return new_thetas, outer_state, inner, metrics


#: :func:`member_estimates` compiled: the work of a block of members, where a backend runs it.
estimate_block = jax.jit(member_estimates, static_argnames=("lopt", "estimator"),
                         compiler_options=COMPILER_OPTIONS)
_update = jax.jit(self_update, static_argnames=("lopt", "outer"),
                  compiler_options=COMPILER_OPTIONS)
_step_keys = jax.jit(step_keys, static_argnames="num")


class BackendError(RuntimeError):
    """A backend could not run a step (its workers or cluster are gone); the state before the
    step is intact."""


#: Where the estimates of an outer step run: ``backend(cfg, task_config, blocks)`` returns each
#: block's ``(estimates, problems)`` of :func:`member_estimates`, in order; a block is
#: ``(thetas, log_sigma, problems, keys)`` of some members (leading axis). Every backend runs the
#: same compiled program on the same inputs, so where the blocks run changes no result.
Backend = Callable[[TrainConfig, dict, list[tuple]], list[tuple]]


def in_process(cfg: TrainConfig, task_config: dict, blocks: list[tuple]) -> list[tuple]:
    """The default :data:`Backend`: every block in this process, one after another."""
    task = slots.task(task_config)
    return [estimate_block(cfg.lopt, cfg.estimator, task, *block) for block in blocks]


@functools.partial(jax.jit, static_argnames=("lopt", "estimator", "outer", "num_steps"),
                   compiler_options=COMPILER_OPTIONS)
def outer_steps(lopt, estimator, outer, thetas, outer_state, hparams, best, inner, task, seed,
                first_step, num_steps):
    """``num_steps`` outer steps on one task in one compiled call (``lax.scan`` over
    :func:`outer_step`), with no trip to the host in between: what a GPU needs, where one
    outer step takes milliseconds. Step ``first_step + i`` uses the key :func:`step_key` gives it.

    Returns:
      New weights, outer states and problems, and every metric of :func:`self_update` stacked
      over the steps: ``(num_steps, K)``.
    """
    def body(carry, i):
        thetas, outer_state, inner = carry
        key = step_key(seed, first_step + i, ESTIMATE)
        thetas, outer_state, inner, metrics = outer_step(
            lopt, estimator, outer, thetas, outer_state, hparams, best, inner, task, key)
        return (thetas, outer_state, inner), metrics

    (thetas, outer_state, inner), metrics = jax.lax.scan(
        body, (thetas, outer_state, inner), jnp.arange(num_steps))
    return thetas, outer_state, inner, metrics


def initial_thetas(cfg: TrainConfig) -> Any:
    """The members' random initial weights (a function of the seed only)."""
    return _init(cfg.lopt, cfg.outer, step_key(cfg.seed, 0, INIT), cfg.population)[0]


@functools.partial(jax.jit, static_argnames=("lopt", "outer", "num"))
def _init(lopt, outer, key, num):
    """``num`` members' random weights and their outer states: one program, not one per op."""
    thetas = jax.vmap(lopt.init)(jax.random.split(key, num))
    return thetas, outer.init(lopt, thetas)


def initial_state(cfg: TrainConfig) -> PopulationState:
    """A population of randomly initialised learned optimizers at step 0, nothing else."""
    thetas, outer_state = _init(cfg.lopt, cfg.outer, step_key(cfg.seed, 0, INIT), cfg.population)
    configs = tuple(slots.slot_config(cfg, s, 0) for s in range(cfg.num_slots))
    return PopulationState(
        thetas=thetas, outer_state=outer_state,
        hparams=Hyperparams(*map(jnp.asarray, cfg.pbt.initial(step_rng(cfg.seed, 0, INIT),
                                                               cfg.population))),
        slot_problems=tuple(slots.fresh_problems(cfg, c, s, 0, thetas)
                            for s, c in enumerate(configs)),
        elite=None, step=0, slot_configs=configs, lineage=Lineage.start(cfg.population),
        scores=(math.inf,) * cfg.population, best=0, elapsed=0.0, start_meta_loss=None)


def train_step(cfg: TrainConfig, state: PopulationState, backend: Backend = in_process
               ) -> tuple[PopulationState, StepOutput]:
    """``steps_per_call`` outer steps on one slot's task, then PBT and the elite when due.
    ``backend`` runs the ES work of the members (:data:`Backend`); everything else runs here.

    Returns:
      The next state and what the step reports (metrics and log rows).
    """
    state, slot = _refresh_slot(cfg, state)
    task = slots.task(state.slot_configs[slot])
    state, history = estimate_and_update(cfg, state, slot, task, backend)
    metrics = {k: v[-1] for k, v in history.items()}
    rows = _metric_rows(cfg, state, slot, history)
    state, replaced, lineage = replace_failed_members(cfg, state, metrics)
    for row in rows[-cfg.population:]:  # the call's last step: who was replaced after it
        row["replaced"] = replaced.get(row["member"])
    logs = {"metrics.jsonl": rows, "lineage.jsonl": lineage, "validation.jsonl": []}
    state = state.replace(step=state.step + cfg.steps_per_call)
    if _crossed(state.step, cfg.steps_per_call, cfg.pbt.interval):
        state, events = pbt_round(cfg, state, task)
        logs["lineage.jsonl"] += events
    if cfg.validate_interval and _crossed(state.step, cfg.steps_per_call, cfg.validate_interval):
        state, events, row = validate(cfg, state)
        logs["lineage.jsonl"] += events
        logs["validation.jsonl"].append(row)
    metrics["replaced"] = replaced
    return state, StepOutput(metrics, logs)


def estimate_and_update(cfg: TrainConfig, state: PopulationState, slot: int, task,
                        backend: Backend = in_process
                        ) -> tuple[PopulationState, dict[str, np.ndarray]]:
    """Every member's ES/PES meta-gradient on ``slot``'s problems and its self-update: the
    estimates in ``cfg.shards`` blocks run by ``backend``, then :func:`self_update` here; or,
    with ``steps_per_call`` above 1, ``steps_per_call`` whole outer steps in one compiled call.

    Returns:
      The state with new weights, outer states and problems (the step not yet advanced), and
      each metric of :func:`self_update` as ``(steps_per_call, K)``, the meta-loss on the ratio
      scale (1 = no progress) as it is logged, shown and checked.
    """
    problems = state.slot_problems[slot]
    if cfg.steps_per_call == 1:
        keys, update_key = _step_keys(step_key(cfg.seed, state.step, ESTIMATE), cfg.population)
        members = (state.thetas, state.hparams.log_sigma, problems, keys)
        size = cfg.population // cfg.shards
        blocks = [members] if cfg.shards == 1 else [
            jax.tree.map(lambda x: x[b * size:(b + 1) * size], members)
            for b in range(cfg.shards)]
        results = backend(cfg, state.slot_configs[slot], blocks)
        estimates, problems = results[0] if len(results) == 1 else jax.tree.map(
            lambda *xs: jnp.concatenate(xs), *results)
        thetas, outer_state, metrics = _update(cfg.lopt, cfg.outer, state.thetas,
                                               state.outer_state, state.hparams,
                                               jnp.asarray(state.best), estimates, update_key)
        history = {k: np.asarray(v)[None] for k, v in metrics.items()}
    else:
        thetas, outer_state, problems, metrics = outer_steps(
            cfg.lopt, cfg.estimator, cfg.outer, state.thetas, state.outer_state, state.hparams,
            jnp.asarray(state.best), problems, task, cfg.seed, state.step, cfg.steps_per_call)
        history = {k: np.asarray(v) for k, v in metrics.items()}
    history["meta_loss"] = ratio_scale(history["meta_loss"], cfg.estimator.normalization)
    state = _set_slot(state, slot, state.slot_configs[slot], problems).replace(
        thetas=thetas, outer_state=outer_state)
    if state.start_meta_loss is None:
        first = history["meta_loss"][0][np.isfinite(history["meta_loss"][0])]
        state = state.replace(start_meta_loss=float(np.median(first)) if first.size else None)
    return state, history


def replace_failed_members(cfg: TrainConfig, state: PopulationState, metrics: dict[str, Any]
                           ) -> tuple[PopulationState, dict[int, str], list[dict]]:
    """Replaces non-finite members, and members whose meta-loss reached
    ``diverged_meta_loss``, by copies of healthy ones (method.md section 5).

    If no member is healthy, the non-finite ones are replaced by copies of finite (diverged)
    ones, which stay: a diverged member is still a usable starting point.

    Returns:
      The new state, the kind of each replaced position (``replace_non_finite``,
      ``replace_diverged``), and the lineage events.

    Raises:
      FloatingPointError: no member is finite; nothing is left to copy.
    """
    finite = metrics["finite"]
    healthy = finite & (np.nan_to_num(metrics["meta_loss"], nan=np.inf) < cfg.diverged_meta_loss)
    if healthy.all():
        return state, {}, []
    if not finite.any():
        raise FloatingPointError(
            f"step {state.step}: every member's weights or meta-loss are not finite; nothing is "
            "left to copy (try a smaller pbt.step_mult_prior, outer.max_update or "
            "pbt.sigma_prior)")
    sources, copies = replace_failed(healthy if healthy.any() else finite,
                                     np.asarray(state.scores), step_rng(cfg.seed, state.step, REPLACE))
    kinds = {c: "replace_diverged" if finite[c] else "replace_non_finite" for c, _ in copies}
    state, events = copy_members(state, sources, copies, kinds)
    return state, kinds, events


def pbt_round(cfg: TrainConfig, state: PopulationState, task) -> tuple[PopulationState, list]:
    """Scores every member on ``task`` (the same fresh problems, unperturbed weights), then
    exploit and explore (method.md section 5)."""
    scores = np.asarray(score(cfg.lopt, state.thetas, task, step_key(cfg.seed, state.step, SCORE),
                              cfg.pbt.score_steps, loss=cfg.pbt.score_loss))
    state = state.replace(scores=tuple(float(s) for s in scores))
    sources, hparams, copies = cfg.pbt.exploit_and_explore(
        scores, jax.tree.map(np.asarray, state.hparams), step_rng(cfg.seed, state.step, EXPLORE))
    state, events = copy_members(state, sources, copies, {c: "exploit" for c, _ in copies},
                                 hparams)
    return state.replace(best=int(np.argmin(np.nan_to_num(state.scores, nan=np.inf)))), events


def held_in_scores(cfg: TrainConfig, thetas: Any) -> np.ndarray:
    """``(K,)`` each member's held-in validation (the measure of the elite)."""
    return held_in_meta_loss(cfg.lopt, cfg.tasks.families, thetas, cfg.validate_steps,
                             cfg.pbt.score_loss, augmented=cfg.tasks.reparam_scale > 1)


def validate(cfg: TrainConfig, state: PopulationState
             ) -> tuple[PopulationState, list[dict], dict]:
    """Held-in validation of every member; keeps the best weights seen as the elite
    (:func:`~selfopt.population.elite.keep_best`)."""
    return keep_best(state, held_in_scores(cfg, state.thetas), cfg.restore_elite)


def _refresh_slot(cfg: TrainConfig, state: PopulationState) -> tuple[PopulationState, int]:
    """The slot of this step, with fresh problems if its task has moved on."""
    slot = slots.slot_of(cfg, state.step)
    if (config := slots.slot_config(cfg, slot, state.step)) != state.slot_configs[slot]:
        state = _set_slot(state, slot, config,
                          slots.fresh_problems(cfg, config, slot, state.step, state.thetas))
    return state, slot


def _set_slot(state: PopulationState, slot: int, config: dict, problems: Any) -> PopulationState:
    configs, inner = list(state.slot_configs), list(state.slot_problems)
    configs[slot], inner[slot] = config, problems
    return state.replace(slot_configs=tuple(configs), slot_problems=tuple(inner))


def _crossed(step: int, n: int, interval: int) -> bool:
    """Whether the last ``n`` steps, ending at ``step``, passed a multiple of ``interval``."""
    return step // interval > (step - n) // interval


def _metric_rows(cfg: TrainConfig, state: PopulationState, slot: int,
                 history: dict[str, np.ndarray]) -> list[dict]:
    """``metrics.jsonl`` rows of one call on ``slot``: every step and member, with the
    lineage and hyperparameters of ``state`` (before any replacement)."""
    n, hparams = len(history["meta_loss"]), jax.tree.map(np.asarray, state.hparams)
    return [{
        "step": state.step + j, "elapsed": round(state.elapsed, 3), "member": i,
        "id": state.lineage.ids[i], "generation": state.lineage.generation[i],
        **{k: finite_or_none(history[k][j, i])
           for k in ("meta_loss", "grad_rms", "clipped", "update_rms", "trust")},
        **hparams_at(hparams, i), "task": state.slot_configs[slot]["family"],
        "outer_optimizer": cfg.outer.label, "replaced": None,
    } for j in range(n) for i in range(cfg.population)]
