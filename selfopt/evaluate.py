"""Running an optimizer on a task, and the per-task tuned Adam baseline (method.md section 7).

The measurements every comparison in ``selfopt`` is built on: the same task, initial parameters
and minibatches for every optimizer under test (learned or hand-designed), so that differences in
the loss curves come from the optimizers alone. The baseline of the literature is Adam with its
learning rate tuned per task over 14 log-spaced values from 1e-4 to 1 (learned_optimization's
``AdamLR`` baselines); :func:`tune_adam` computes it and caches it on disk per task
configuration, so evaluating many learned optimizers stays cheap.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfopt.checkpoint import atomic_write_bytes
from selfopt.tasks.base import Task
from selfopt.tasks.distribution import full_config, make_task

#: Adam's learning-rate grid: 14 log-spaced values from 1e-4 to 1.
ADAM_LEARNING_RATES = tuple(float(x) for x in np.logspace(-4, 0, 14))
#: Test-split batches averaged for the validation loss at the end of a run.
NUM_VALID_BATCHES = 4
_CACHE_VERSION = 1


class RunResult(NamedTuple):
    """One training run of one optimizer on one task."""

    train_losses: np.ndarray  # (num_steps,) training loss before each update
    valid_loss: float  # mean test-split loss of the final parameters


def _run(task: Task, optimizer: optax.GradientTransformation, key: jax.Array, num_steps: int,
         scale: jax.Array | float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Losses and validation loss of one run; updates are multiplied by ``scale`` (traced, so
    a learning-rate grid shares one compilation)."""
    init_key, data_key, valid_key = jax.random.split(key, 3)
    params = task.init(init_key)

    def step(carry, t):
        params, state = carry
        batch = task.sample_batch(jax.random.fold_in(data_key, t))
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        extra = {"loss": loss} if isinstance(optimizer, optax.GradientTransformationExtraArgs) else {}
        updates, state = optimizer.update(grads, state, params, **extra)
        updates = jax.tree.map(lambda u: scale * u, updates)
        return (optax.apply_updates(params, updates), state), loss

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                       jnp.arange(num_steps))
    valid_keys = jax.random.split(valid_key, NUM_VALID_BATCHES)
    valid = jnp.mean(jax.vmap(lambda k: task.loss(params, task.sample_batch(k, "test")))(valid_keys))
    return losses, valid


_run_jit = jax.jit(_run, static_argnames=("optimizer", "num_steps"))
#: Adam without its learning rate: ``optax.adam(lr)`` is this followed by a scale of ``-lr``.
_SCALE_BY_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _adam_grid(task: Task, keys: jax.Array, learning_rates: jax.Array, num_steps: int):
    """Every (learning rate, seed) run of Adam in one compiled call: ``(rates, seeds, ...)``."""
    over_keys = jax.vmap(lambda k, lr: _run(task, _SCALE_BY_ADAM, k, num_steps, -lr),
                         in_axes=(0, None))
    return jax.vmap(over_keys, in_axes=(None, 0))(keys, learning_rates)


def run_training(task: Task, optimizer: optax.GradientTransformation, key: jax.Array,
                 num_steps: int) -> RunResult:
    """Trains ``task`` with ``optimizer`` for ``num_steps`` updates.

    One jitted ``lax.scan``, compiled once per (task shape, optimizer, num_steps). Initial
    parameters come from ``key``, and so does the batch of step ``t`` (``fold_in(data_key, t)``):
    two optimizers given the same key see the same problem.

    Args:
      task: the task (passed as an argument: its arrays are not baked into the program).
      optimizer: any optax optimizer (a static argument: reuse the same object to reuse the
        compiled code); a ``GradientTransformationExtraArgs``, such as a learned optimizer,
        also receives ``loss=``.
      key: PRNG key for the initial parameters, the batches and the validation batches.
      num_steps: number of updates.

    Returns:
      The training losses and the final validation loss.
    """
    losses, valid = _run_jit(task, optimizer, key, num_steps)
    return RunResult(np.asarray(losses), float(valid))


def train_losses(task: Task, optimizer: optax.GradientTransformation, key: jax.Array,
                 num_steps: int) -> np.ndarray:
    """The training loss before each update of :func:`run_training`."""
    return run_training(task, optimizer, key, num_steps).train_losses


def seed_keys(config: Mapping[str, Any], num_seeds: int) -> list[jax.Array]:
    """The keys of a configuration's evaluation seeds: ``fold_in(key(config seed), i)``."""
    base = jax.random.key(full_config(config)["seed"])
    return [jax.random.fold_in(base, i) for i in range(num_seeds)]


def final_loss(losses: np.ndarray) -> np.ndarray:
    """Mean training loss over the last 10% of steps (one batch is too noisy); last axis."""
    losses = np.asarray(losses, np.float64)
    window = max(1, losses.shape[-1] // 10)
    tail = losses[..., -window:]
    return np.where(np.isfinite(tail).all(axis=-1), tail.mean(axis=-1), np.inf)


def steps_to_reach(losses: np.ndarray, target: float) -> float:
    """First step at which the trailing mean training loss (window: 10% of the run) is at or
    below ``target``; ``inf`` if it never is."""
    losses = np.asarray(losses, np.float64)
    window = max(1, losses.shape[-1] // 10)
    trailing = np.convolve(np.nan_to_num(losses, nan=np.inf), np.ones(window) / window,
                           mode="valid")
    hits = np.flatnonzero(trailing <= target)
    return float(hits[0] + window - 1) if hits.size else float("inf")


def speedup_over(baseline_losses: np.ndarray, losses: np.ndarray) -> float:
    """How many times fewer steps an optimizer needed than the baseline.

    ``steps the baseline needs to reach the optimizer's final loss / the optimizer's steps``:
    above 1 the optimizer is faster; ``inf`` if the baseline never gets there.
    """
    return steps_to_reach(baseline_losses, float(final_loss(losses))) / len(losses)


class TunedAdam(NamedTuple):
    """Adam at its best learning rate on one task (over the seeds)."""

    learning_rate: float
    train_losses: np.ndarray  # (num_seeds, num_steps) at the chosen rate
    valid_losses: np.ndarray  # (num_seeds,)
    final_by_rate: dict[float, float]  # mean final training loss of every rate tried


def _cache_path(cache_dir: Path, config: dict, num_steps: int, num_seeds: int,
                learning_rates: tuple[float, ...]) -> Path:
    spec = json.dumps({"version": _CACHE_VERSION, "config": config, "num_steps": num_steps,
                       "num_seeds": num_seeds, "learning_rates": list(learning_rates)},
                      sort_keys=True)
    return Path(cache_dir) / f"adam-{hashlib.sha256(spec.encode()).hexdigest()[:24]}.json"


def tune_adam(config: Mapping[str, Any], num_steps: int, num_seeds: int = 3,
              learning_rates: tuple[float, ...] = ADAM_LEARNING_RATES,
              cache_dir: Path | None = None) -> TunedAdam:
    """Adam with its learning rate tuned on this task: the rate with the lowest mean final
    training loss over ``num_seeds`` seeds (each rate sees the same seeds).

    Args:
      config: the task configuration (see :func:`selfopt.tasks.make_task`).
      num_steps: inner steps per run.
      num_seeds: seeds per rate (:func:`seed_keys`).
      learning_rates: the grid (default :data:`ADAM_LEARNING_RATES`).
      cache_dir: if given, results are read from and written to a JSON file there, keyed by
        everything above (written atomically).

    Returns:
      The tuned baseline.
    """
    config = full_config(config)
    path = _cache_path(cache_dir, config, num_steps, num_seeds, learning_rates) if cache_dir else None
    if path is not None and path.is_file():
        cached = json.loads(path.read_text())
        return TunedAdam(cached["learning_rate"], np.asarray(cached["train_losses"], np.float32),
                         np.asarray(cached["valid_losses"], np.float32),
                         {float(k): float("inf") if v is None else v
                          for k, v in cached["final_by_rate"].items()})
    keys = jnp.stack(seed_keys(config, num_seeds))
    losses, valid = _adam_grid(make_task(config), keys, jnp.asarray(learning_rates), num_steps)
    losses, valid = np.asarray(losses), np.asarray(valid)
    finals = np.mean(final_loss(losses), axis=1)  # (rates,), inf where a seed diverged
    best = int(np.argmin(finals))
    final_by_rate = {lr: float(f) for lr, f in zip(learning_rates, finals)}
    result = TunedAdam(learning_rates[best], losses[best], valid[best], final_by_rate)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        finite = lambda x: x if np.isfinite(x) else None
        atomic_write_bytes(path, json.dumps({
            "learning_rate": result.learning_rate, "train_losses": result.train_losses.tolist(),
            "valid_losses": result.valid_losses.tolist(),
            "final_by_rate": {str(k): finite(v) for k, v in final_by_rate.items()},
        }).encode())
    return result
