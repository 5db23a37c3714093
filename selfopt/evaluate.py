"""Evaluation against per-task tuned Adam (method.md section 7).

The measurements every comparison in ``selfopt`` is built on: the same task, initial parameters
and minibatches for every optimizer under test (learned or hand-designed), so that differences in
the loss curves come from the optimizers alone. The baseline of the literature is Adam with its
learning rate tuned per task over 14 log-spaced values from 1e-4 to 1 (learned_optimization's
``AdamLR`` baselines); :func:`tune_adam` computes it and caches it on disk per task
configuration, so evaluating many learned optimizers stays cheap.

:func:`evaluate` runs a :class:`Candidate` (a learned optimizer's weights, or any optax optimizer
by name) over a task suite (:func:`suite`) and compares it with tuned Adam task by task: final
and mean training loss, validation loss, the loss normalised per task, wins, and the speedup.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfopt.cache import COMPILER_OPTIONS, cache_root
from selfopt.lopt.base import LearnedOptimizer, check_theta
from selfopt.safe_io import atomic_write_bytes
from selfopt.tasks.base import Task
from selfopt.tasks.distribution import HELDOUT_CONFIGS, TEST_CONFIGS, full_config, make_task

#: Adam's learning-rate grid: 14 log-spaced values from 1e-4 to 1.
ADAM_LEARNING_RATES = tuple(float(x) for x in np.logspace(-4, 0, 14))
#: Test-split batches averaged for the validation loss at the end of a run.
NUM_VALID_BATCHES = 4
#: A task's normalised loss is capped here (as the meta-loss is): a diverged run counts as 10x
#: its initial loss, so one blow-up cannot make a suite's mean infinite.
NORMALIZED_CAP = 10.0
#: Held-out families too slow to evaluate every few minutes during training (``quick`` suite).
SLOW_FAMILIES = ("convnet", "language_model")
#: Task suites by name (see :func:`suite`).
SUITES = ("heldout", "quick", "test")
_CACHE_VERSION = 2
#: Tuned Adam of the held-out suite at the default budget (300 steps, 3 seeds, seed 0), shipped
#: so that a first run's held-out checks neither tune nor compile Adam: cache files as
#: :func:`tune_adam` writes them (``scripts/ship_tuned_adam.py`` makes them; a test recomputes
#: one).
SHIPPED_ADAM = Path(__file__).parent / "tuned_adam"


class RunResult(NamedTuple):
    """One training run of one optimizer on one task."""

    train_losses: np.ndarray  # (num_steps,) training loss before each update
    valid_loss: float  # mean test-split loss of the final parameters


def _run(task: Task, optimizer: optax.GradientTransformation, key: jax.Array, num_steps: int,
         scale: jax.Array | float = 1.0,
         record: Callable[[jax.Array, Any], jax.Array] | None = None
         ) -> tuple[jax.Array, jax.Array]:
    """Losses and validation loss of one run; updates are multiplied by ``scale`` (traced, so
    a learning-rate grid shares one compilation). ``record(loss, updates)``, where given, is
    what each step returns in place of its loss."""
    init_key, data_key, valid_key = jax.random.split(key, 3)
    params = task.init(init_key)

    def step(carry, t):
        params, state = carry
        batch = task.sample_batch(jax.random.fold_in(data_key, t))
        loss, grads = jax.value_and_grad(task.loss)(params, batch)
        extra = {"loss": loss} if isinstance(optimizer, optax.GradientTransformationExtraArgs) else {}
        updates, state = optimizer.update(grads, state, params, **extra)
        updates = jax.tree.map(lambda u: scale * u, updates)
        return ((optax.apply_updates(params, updates), state),
                loss if record is None else record(loss, updates))

    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)),
                                       jnp.arange(num_steps))
    valid_keys = jax.random.split(valid_key, NUM_VALID_BATCHES)
    valid = jnp.mean(jax.vmap(lambda k: task.loss(params, task.sample_batch(k, "test")))(valid_keys))
    return losses, valid


_run_jit = jax.jit(_run, static_argnames=("optimizer", "num_steps"),
                   compiler_options=COMPILER_OPTIONS)
#: Adam without its learning rate: ``optax.adam(lr)`` is this followed by a scale of ``-lr``.
_SCALE_BY_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnames=("num_steps", "linear_decay"),
                   compiler_options=COMPILER_OPTIONS)
def _adam_grid(task: Task, keys: jax.Array, learning_rates: jax.Array, num_steps: int,
               linear_decay: bool = False):
    """Every (learning rate, seed) run of Adam in one compiled call: ``(rates, seeds, ...)``.

    With ``linear_decay`` the rate decays linearly from its value to 0 over the run (not the
    baseline: ``benchmarks/adam_rates.py`` measures what a schedule alone is worth)."""
    adam = _SCALE_BY_ADAM
    if linear_decay:
        adam = optax.chain(adam, optax.scale_by_schedule(optax.linear_schedule(1.0, 0.0,
                                                                               num_steps)))
    over_keys = jax.vmap(lambda k, lr: _run(task, adam, k, num_steps, -lr), in_axes=(0, None))
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


def _update_rms(loss: jax.Array, updates: Any) -> jax.Array:
    del loss
    flat = jnp.concatenate([jnp.ravel(u) for u in jax.tree.leaves(updates)])
    return jnp.sqrt(jnp.mean(flat ** 2))


@functools.partial(jax.jit, static_argnames=("optimizer", "num_steps"),
                   compiler_options=COMPILER_OPTIONS)
def update_sizes(task: Task, optimizer: optax.GradientTransformation, key: jax.Array,
                 num_steps: int) -> jax.Array:
    """The RMS over all parameters of each of the ``num_steps`` updates of
    :func:`run_training`'s run (same initial parameters and batches)."""
    return _run(task, optimizer, key, num_steps, record=_update_rms)[0]


def train_losses(task: Task, optimizer: optax.GradientTransformation, key: jax.Array,
                 num_steps: int) -> np.ndarray:
    """The training loss before each update of :func:`run_training`."""
    return run_training(task, optimizer, key, num_steps).train_losses


def seed_keys(config: Mapping[str, Any], num_seeds: int, seed: int = 0) -> list[jax.Array]:
    """The keys of a configuration's evaluation seeds: ``fold_in(key(config seed), i)``, and
    for ``seed`` > 0 ``fold_in`` of that with ``seed`` (another draw of the same runs)."""
    base = jax.random.key(full_config(config)["seed"])
    if seed:
        base = jax.random.fold_in(base, 1_000_003 * seed)
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


def _cache_path(cache_dir: Path, config: dict, num_steps: int, num_seeds: int, seed: int,
                learning_rates: tuple[float, ...], linear_decay: bool = False) -> Path:
    spec = {"version": _CACHE_VERSION, "config": config, "num_steps": num_steps,
            "num_seeds": num_seeds, "seed": seed, "learning_rates": list(learning_rates)}
    if linear_decay:  # only then: the constant-rate baseline's key is as before
        spec["linear_decay"] = True
    spec = json.dumps(spec, sort_keys=True)
    return Path(cache_dir) / f"adam-{hashlib.sha256(spec.encode()).hexdigest()[:24]}.json"


def tune_adam(config: Mapping[str, Any], num_steps: int, num_seeds: int = 3,
              learning_rates: tuple[float, ...] = ADAM_LEARNING_RATES,
              cache_dir: Path | None = None, seed: int = 0,
              linear_decay: bool = False) -> TunedAdam:
    """Adam with its learning rate tuned on this task: the rate with the lowest mean final
    training loss over ``num_seeds`` seeds (each rate sees the same seeds).

    Args:
      config: the task configuration (see :func:`selfopt.tasks.make_task`).
      num_steps: inner steps per run.
      num_seeds: seeds per rate (:func:`seed_keys`).
      learning_rates: the grid (default :data:`ADAM_LEARNING_RATES`).
      cache_dir: if given, results are read from a JSON file there (or from the results
        shipped in the package, :data:`SHIPPED_ADAM`), keyed by everything else, and written
        there (atomically).
      seed: the evaluation seed (:func:`seed_keys`).
      linear_decay: decay the rate linearly to 0 over the run. Not the baseline (a constant
        rate, as in the literature); what a schedule alone is worth.

    Returns:
      The tuned baseline.
    """
    config = full_config(config)
    path = (_cache_path(cache_dir, config, num_steps, num_seeds, seed, learning_rates,
                        linear_decay) if cache_dir else None)
    found = path and next((p for p in (path, SHIPPED_ADAM / path.name) if p.is_file()), None)
    if found:
        cached = json.loads(found.read_text())
        return TunedAdam(cached["learning_rate"], np.asarray(cached["train_losses"], np.float32),
                         np.asarray(cached["valid_losses"], np.float32),
                         {float(k): float("inf") if v is None else v
                          for k, v in cached["final_by_rate"].items()})
    keys = jnp.stack(seed_keys(config, num_seeds, seed))
    losses, valid = _adam_grid(make_task(config), keys, jnp.asarray(learning_rates), num_steps,
                               linear_decay)
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


# -- the optimizer under test ------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("optimizer", "num_steps"),
                   compiler_options=COMPILER_OPTIONS)
def _optax_seeds(task: Task, optimizer: optax.GradientTransformation, keys: jax.Array,
                 num_steps: int):
    return jax.vmap(lambda k: _run(task, optimizer, k, num_steps))(keys)


@functools.partial(jax.jit, static_argnames=("lopt", "num_steps"),
                   compiler_options=COMPILER_OPTIONS)
def _lopt_seeds(lopt: LearnedOptimizer, theta: Any, task: Task, keys: jax.Array, num_steps: int):
    # theta is traced: evaluating another member or checkpoint reuses the compiled code.
    return jax.vmap(lambda k: _run(task, lopt.optimizer(theta, num_steps), k, num_steps))(keys)


@dataclasses.dataclass(frozen=True)
class Candidate:
    """An optimizer under evaluation: ``runs(task, keys, num_steps)`` trains ``task`` once per
    key and returns the training losses ``(seeds, steps)`` and validation losses ``(seeds,)``."""

    name: str
    runs: Callable[[Task, jax.Array, int], tuple[Any, Any]]


def lopt_candidate(lopt: LearnedOptimizer, theta: Any, name: str = "learned optimizer"
                   ) -> Candidate:
    """A learned optimizer with weights ``theta`` (checked against ``lopt``)."""
    check_theta(lopt, theta)
    theta = jax.tree.map(jnp.asarray, theta)
    return Candidate(name, lambda task, keys, n: _lopt_seeds(lopt, theta, task, keys, n))


def optax_candidate(spec: str) -> Candidate:
    """A hand-designed optax optimizer named ``NAME[:LEARNING_RATE]``, e.g. ``sgd:0.1`` or
    ``adamw:3e-4`` (default rate 1e-3): any ``optax`` alias whose first argument is the
    learning rate.

    Raises:
      ValueError: an unknown name, a name that is not such an alias, or a bad rate.
    """
    name, _, rate = spec.partition(":")
    factory = getattr(optax, name, None)
    params = list(inspect.signature(factory).parameters) if callable(factory) else []
    if not name.isidentifier() or not params or params[0] != "learning_rate":
        raise ValueError(f"unknown optax optimizer {name!r}: expected an optax alias taking a "
                         "learning rate, e.g. sgd, adam, adamw, lion, rmsprop")
    try:
        learning_rate = float(rate) if rate else 1e-3
    except ValueError:
        raise ValueError(f"learning rate of {spec!r} is not a number: {rate!r}") from None
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning rate of {spec!r} must be a positive number")
    optimizer = factory(learning_rate)
    return Candidate(f"optax.{name}(lr={learning_rate:g})",
                     lambda task, keys, n: _optax_seeds(task, optimizer, keys, n))


# -- task suites and the comparison -------------------------------------------------------------

def suite(name: str = "heldout") -> list[dict[str, Any]]:
    """The task configurations of a named suite.

    ``heldout``: the 12 held-out configurations (:data:`HELDOUT_CONFIGS`), the *validation*
    suite that options and defaults are chosen on. ``quick``: those minus the slow families
    (:data:`SLOW_FAMILIES`): 9 tasks, seconds each; what ``selfopt train`` evaluates during a
    run. ``test``: :data:`~selfopt.tasks.distribution.TEST_CONFIGS`, which chooses nothing; its
    new tasks carry their own ``steps``.

    Raises:
      ValueError: an unknown suite name.
    """
    if name not in SUITES:
        raise ValueError(f"unknown task suite {name!r}; choose one of {list(SUITES)}")
    if name == "test":
        return [{**full_config({k: v for k, v in c.items() if k != "steps"}),
                 **({"steps": c["steps"]} if "steps" in c else {})} for c in TEST_CONFIGS]
    configs = [full_config(c) for c in HELDOUT_CONFIGS]
    if name == "quick":
        configs = [c for c in configs if c["family"] not in SLOW_FAMILIES]
    return configs


def task_label(config: Mapping[str, Any]) -> str:
    """A short readable name of a task configuration: its family and what sets it apart."""
    config = full_config(config)
    family = config["family"]
    default = full_config({"family": family})
    differs = [f"{k}={v}" for k, v in config.items()
               if k not in ("family", "seed") and v != default.get(k)]
    return f"{family}({', '.join(differs)})" if differs else family


@dataclasses.dataclass(frozen=True)
class TaskComparison:
    """The optimizer under test against tuned Adam on one task (means over seeds)."""

    label: str
    config: dict[str, Any]
    steps: int  # inner steps of every run
    init_loss: float  # training loss at step 0 (same initial parameters for both)
    final: float  # final training loss (:func:`final_loss`)
    mean: float  # mean training loss over the run (area under the curve)
    valid: float  # validation loss of the final parameters (test split)
    normalized: float  # (final - floor) / (init - floor), capped at NORMALIZED_CAP
    adam_final: float
    adam_mean: float
    adam_valid: float
    adam_normalized: float
    adam_learning_rate: float
    speedup: float  # steps tuned Adam needs to reach ``final`` / steps of the run

    @property
    def wins(self) -> bool:
        """Lower final training loss than tuned Adam."""
        return self.final < self.adam_final

    def to_json(self) -> dict[str, Any]:
        row = {k: _json_number(v) for k, v in dataclasses.asdict(self).items()}
        row["wins"] = self.wins
        return row


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """A whole suite: per-task comparisons and their summary."""

    candidate: str
    num_steps: int
    num_seeds: int
    seed: int
    tasks: tuple[TaskComparison, ...]

    @property
    def mean_normalized(self) -> float:
        return float(np.mean([t.normalized for t in self.tasks]))

    @property
    def adam_mean_normalized(self) -> float:
        return float(np.mean([t.adam_normalized for t in self.tasks]))

    @property
    def num_wins(self) -> int:
        return sum(t.wins for t in self.tasks)

    @property
    def beats_adam(self) -> bool:
        """The project's criterion (issue 6): a lower mean normalised loss than tuned Adam,
        and a win on the majority of the tasks."""
        return (self.mean_normalized < self.adam_mean_normalized
                and self.num_wins > len(self.tasks) / 2)

    def summary(self) -> dict[str, Any]:
        ratios = [t.normalized / max(t.adam_normalized, 1e-12) for t in self.tasks]
        return {"candidate": self.candidate, "steps": self.num_steps, "seeds": self.num_seeds,
                "seed": self.seed, "tasks": len(self.tasks), "wins": self.num_wins,
                "win_fraction": self.num_wins / len(self.tasks),
                "mean_normalized": self.mean_normalized,
                "adam_mean_normalized": self.adam_mean_normalized,
                "margin": self.mean_normalized / max(self.adam_mean_normalized, 1e-12),
                "median_ratio": float(np.median(ratios)),
                "median_speedup": _json_number(np.median([t.speedup for t in self.tasks])),
                "beats_adam": self.beats_adam}

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "tasks": [t.to_json() for t in self.tasks]}

    def save(self, path: Path, **source: Any) -> None:
        """Writes the evaluation as JSON (atomically), after ``source`` fields saying what was
        evaluated (``evaluation.json``, which the report reads)."""
        atomic_write_bytes(Path(path), (json.dumps({**source, **self.to_json()}, indent=2)
                                        + "\n").encode())


def _json_number(value: Any) -> Any:
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def normalized_final(task: Task, final: float, init: float) -> float:
    """A final loss normalised by the task (:meth:`Task.normalize`), capped at
    :data:`NORMALIZED_CAP` (also for a diverged, non-finite one): what the suite averages."""
    value = float(task.normalize(final, init))
    return min(value, NORMALIZED_CAP) if math.isfinite(value) else NORMALIZED_CAP


def compare_on_task(candidate: Candidate, config: Mapping[str, Any], num_steps: int,
                    num_seeds: int = 3, seed: int = 0, cache_dir: Path | None = None
                    ) -> TaskComparison:
    """``candidate`` against tuned Adam on one task: same seeds, initialisations and batches.

    Args:
      candidate: the optimizer under test.
      config: the task configuration; a ``steps`` entry, where present, replaces
        ``num_steps`` for this task (the test suite's longer horizons).
      num_steps: inner steps of every run.
      num_seeds: runs per optimizer (and per Adam learning rate).
      seed: the evaluation seed (:func:`seed_keys`).
      cache_dir: where tuned Adam is cached (:func:`tune_adam`).

    Returns:
      The comparison; losses are means over the seeds.
    """
    config = dict(config)
    steps = config.pop("steps", num_steps)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps of a task must be a positive int, got {steps!r}")
    label = task_label(config) + ("" if steps == num_steps else f" @{steps} steps")
    config, num_steps = full_config(config), steps
    task = make_task(config)
    adam = tune_adam(config, num_steps, num_seeds, cache_dir=cache_dir, seed=seed)
    losses, valid = candidate.runs(task, jnp.stack(seed_keys(config, num_seeds, seed)), num_steps)
    losses, valid = np.asarray(losses, np.float64), np.asarray(valid, np.float64)
    init = float(adam.train_losses[:, 0].mean())  # equal to losses[:, 0]: same init and batch
    final, adam_final = float(final_loss(losses).mean()), float(final_loss(adam.train_losses).mean())
    mean_curve = losses.mean(axis=0)
    return TaskComparison(
        label=label, config=config, steps=num_steps, init_loss=init, final=final,
        mean=float(np.mean(losses)) if np.isfinite(losses).all() else math.inf,
        valid=float(valid.mean()) if np.isfinite(valid).all() else math.inf,
        normalized=normalized_final(task, final, init), adam_final=adam_final,
        adam_mean=float(np.mean(adam.train_losses)), adam_valid=float(adam.valid_losses.mean()),
        adam_normalized=normalized_final(task, adam_final, init),
        adam_learning_rate=adam.learning_rate,
        speedup=speedup_over(adam.train_losses.mean(axis=0), mean_curve)
        if np.isfinite(mean_curve).all() else 0.0)


def evaluate(candidate: Candidate, configs: Sequence[Mapping[str, Any]], num_steps: int = 300,
             num_seeds: int = 3, seed: int = 0, cache_dir: Path | None = None,
             progress: Callable[[int, int, TaskComparison], None] | None = None) -> Evaluation:
    """``candidate`` against tuned Adam on every task of ``configs``.

    Reproducible: the same candidate, configurations, steps, seeds and ``seed`` give the same
    numbers. ``progress(i, total, comparison)`` is called after each task.
    """
    rows = []
    for i, config in enumerate(configs):
        rows.append(compare_on_task(candidate, config, num_steps, num_seeds, seed, cache_dir))
        if progress:
            progress(i + 1, len(configs), rows[-1])
    return Evaluation(candidate.name, num_steps, num_seeds, seed, tuple(rows))


def print_progress(prefix: str = "") -> Callable[[int, int, TaskComparison], None]:
    """An :func:`evaluate` ``progress`` callback printing one line per task on stderr."""
    def progress(i: int, total: int, row: TaskComparison) -> None:
        print(f"  {prefix}[{i}/{total}] {row.label}: {row.normalized:.4f} vs tuned Adam "
              f"{row.adam_normalized:.4f}", file=sys.stderr, flush=True)
    return progress


def default_cache_dir() -> Path:
    """Where tuned-Adam results are cached: ``$SELFOPT_CACHE/adam`` (``~/.cache/selfopt/adam``)."""
    return cache_root() / "adam"
