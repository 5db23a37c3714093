"""Throughput of the self-training outer step, against plain optax-Adam unrolls of the same work.

    python benchmarks/throughput.py [--repeats 5] [--quick] [--smoke]

Reference configuration (the one learned_optimization's ES path was measured on): an MLP
64-32-10 (ReLU, softmax cross-entropy) on Fashion-MNIST 8x8, batch 128; 8 inner problems x 2
antithetic branches x 20-step truncations, inner length 200; the per-parameter MLP LO with 2x32
hidden units. Prints JSON with:

* ``reference``: outer steps/s and inner learned-optimizer steps/s of one member's whole outer
  step (ES unrolls + self-update), and, measured in the same process on the same inner problems,
  inner steps/s of the identical unroll code driven by ``optax.adam``; their ratio is the
  learned optimizer's overhead;
* ``population_scaling``: outer-step time for populations of 4, 8 and 16 members;
* ``truncation_scaling``: outer-step time for truncations of 10, 20 and 40 steps;
* ``fused``: 10 outer steps of 8 members as 10 calls, each read back to the host (what
  ``steps_per_call=1`` does), against one ``outer_steps`` call of 10 (``steps_per_call=10``).

``--smoke``: the same measurements at toy sizes (one member, a 1-pair, 2-step truncation of a
tiny MLP, one repeat), seconds of work, for CI: it checks the benchmark still runs; its numbers
mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from selfopt.estimators import ConstantLength, TruncatedES
from selfopt.estimators import inner_problem
from selfopt.lopt import MLPLOpt
from selfopt.population import Hyperparams, SelfTraining
from selfopt.tasks import make_task
from selfopt.population.slots import init_problems
from selfopt.cache import COMPILER_OPTIONS
from selfopt.train_step import outer_step as one_outer_step, outer_steps

#: One whole outer step (estimates and update) in one compiled call.
outer_step = jax.jit(one_outer_step, static_argnames=("lopt", "estimator", "outer"),
                     compiler_options=COMPILER_OPTIONS)

TASK = {"family": "mlp", "dataset": "fashion_mnist8", "hidden": [32], "batch_size": 128,
        "activation": "relu"}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What is measured: the reference setting and the scaling sweeps."""

    task: dict = dataclasses.field(default_factory=lambda: dict(TASK))
    lopt: MLPLOpt = MLPLOpt()
    pairs: int = 8
    truncation: int = 20
    inner_length: int = 200
    populations: tuple[int, ...] = (4, 8, 16)
    truncations: tuple[int, ...] = (10, 20, 40)
    fused_population: int = 8
    fused_steps: int = 10


#: ``--smoke``: every measurement once, at toy sizes (one member and one truncation length
#: throughout, so the sweeps reuse the reference's compiled step).
SMOKE = Sizes(task={**TASK, "hidden": [4], "batch_size": 8}, lopt=MLPLOpt(hidden=(4,)),
              pairs=1, truncation=2, inner_length=10, populations=(1,), truncations=(2,),
              fused_population=1, fused_steps=2)


@dataclasses.dataclass(frozen=True)
class FixedAdam:
    """optax Adam dressed as a learned optimizer with no weights, to drive the same unroll."""

    learning_rate: float = 1e-3

    def init(self, key):
        return {}

    def optimizer(self, theta, num_steps=None):
        del num_steps  # the protocol's horizon; constant-rate Adam does not read it
        return optax.with_extra_args_support(optax.adam(self.learning_rate))


def median_seconds(fn, repeats):
    jax.block_until_ready(fn())  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def population_setup(sizes, task, population, truncation):
    lopt = sizes.lopt
    estimator = TruncatedES(num_pairs=sizes.pairs, truncation_length=truncation,
                            min_inner_length=sizes.inner_length,
                            max_inner_length=sizes.inner_length)
    outer = SelfTraining()
    thetas = jax.vmap(lopt.init)(jax.random.split(jax.random.key(0), population))
    inner = init_problems(lopt, estimator, task, thetas, jax.random.key(1))
    hparams = Hyperparams(jnp.zeros(population), jnp.full(population, jnp.log(0.01)))
    return lopt, estimator, outer, thetas, outer.init(lopt, thetas), hparams, inner


def time_outer_step(sizes, task, population, truncation, repeats):
    """Seconds of one jitted outer step of ``population`` members."""
    lopt, estimator, outer, thetas, outer_state, hparams, inner = population_setup(
        sizes, task, population, truncation)
    run = lambda: outer_step(lopt, estimator, outer, thetas, outer_state, hparams,
                             jnp.asarray(0), inner, task, jax.random.key(2))
    return median_seconds(run, repeats)


def time_fused(sizes, task, repeats):
    """Seconds of ``fused_steps`` outer steps of ``fused_population`` members: one call each
    with the metrics read back (as the trainer does with ``steps_per_call=1``), and one fused
    call."""
    lopt, estimator, outer, thetas, outer_state, hparams, inner = population_setup(
        sizes, task, sizes.fused_population, sizes.truncation)
    best, steps = jnp.asarray(0), sizes.fused_steps

    def one_by_one():
        carry = (thetas, outer_state, inner)
        for i in range(steps):
            *carry, metrics = outer_step(lopt, estimator, outer, carry[0], carry[1], hparams,
                                         best, carry[2], task, jax.random.key(i))
            jax.tree.map(lambda x: x.__array__(), metrics)  # the host round trip
        return carry

    fused = lambda: outer_steps(lopt, estimator, outer, thetas, outer_state, hparams, best,
                                inner, task, 0, 0, steps)
    return median_seconds(one_by_one, repeats), median_seconds(fused, repeats)


@functools.partial(jax.jit, static_argnames=("num_steps",))
def adam_unrolls(task, states, num_steps):
    """The same unroll code over the same number of problems, driven by optax Adam."""
    return jax.vmap(lambda s: inner_problem.unroll(FixedAdam(), {}, task, s, num_steps))(states)


def time_adam_unrolls(sizes, task, problems, repeats):
    keys = jax.random.split(jax.random.key(1), problems)
    states = jax.vmap(lambda k: inner_problem.new_inner_state(
        FixedAdam(), {}, task, k, ConstantLength(sizes.inner_length)))(keys)
    return median_seconds(lambda: adam_unrolls(task, states, sizes.truncation), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="reference only, no scaling")
    parser.add_argument("--smoke", action="store_true",
                        help="toy sizes, one repeat: checks that the benchmark runs (for CI)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    sizes, repeats = (SMOKE, 1) if args.smoke else (Sizes(), args.repeats)
    task = make_task({"family": "mlp", "seed": 0, **sizes.task})
    pairs, truncation = sizes.pairs, sizes.truncation
    lo_s = time_outer_step(sizes, task, 1, truncation, repeats)
    adam_s = time_adam_unrolls(sizes, task, 2 * pairs, repeats)
    inner_steps = 2 * pairs * truncation
    result = {
        "benchmark": "throughput", "smoke": args.smoke,
        "device": str(jax.devices()[0]), "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "reference": {
            "task": sizes.task, "lopt_hidden": list(sizes.lopt.hidden), "inner_problems": pairs,
            "antithetic": 2, "truncation": truncation, "inner_length": sizes.inner_length,
            "outer_steps_per_s": round(1 / lo_s, 2),
            "lopt_inner_steps_per_s": round(inner_steps / lo_s),
            "adam_inner_steps_per_s": round(inner_steps / adam_s),
            "es_path_cost_vs_adam_step": round(lo_s / adam_s, 2),
        },
    }
    if not args.quick:
        result["population_scaling"] = [
            {"population": k, "outer_step_s": round(time_outer_step(
                sizes, task, k, truncation, repeats), 4)} for k in sizes.populations]
        result["truncation_scaling"] = [
            {"truncation": t, "outer_step_s": round(time_outer_step(
                sizes, task, 1, t, repeats), 4)} for t in sizes.truncations]
    separate, fused = time_fused(sizes, task, repeats)
    result["fused"] = {"population": sizes.fused_population, "steps": sizes.fused_steps,
                       "separate_calls_s": round(separate, 4),
                       "one_fused_call_s": round(fused, 4),
                       "speedup": round(separate / fused, 2)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
