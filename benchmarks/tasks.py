"""Time one inner training step of every task family at its default size; prints JSON.

A step is what an unroll does per step (``selfopt.evaluate.train_losses``): sample a batch,
``jax.value_and_grad`` of the loss, and
an ``optax.adam`` update. Steps run in a jitted ``lax.scan`` of ``NUM_STEPS``; after a warm-up
call (the compile), the scan is timed ``NUM_REPEATS`` times and the median is divided by
``NUM_STEPS``. The paper's tasks each ran under 100 ms per step (method.md section 6); the
budget here is half that.

Run: ``python benchmarks/tasks.py [--smoke]``. ``--smoke``: two families, 2 steps per scan and
one repeat, for CI (it checks the benchmark runs; the times mean nothing).
"""
import argparse
import json
import platform
import statistics
import time

import jax
import optax

from selfopt.evaluate import train_losses
from selfopt.tasks import FAMILIES, full_config, make_task

NUM_STEPS = 50
NUM_REPEATS = 5
BUDGET_MS = 50.0
#: ``--smoke``: the families timed (a quadratic and an MLP on images: seconds to compile).
SMOKE_FAMILIES = ("quadratic", "mlp")


def time_family(family: str, num_steps: int = NUM_STEPS, num_repeats: int = NUM_REPEATS) -> dict:
    """Median milliseconds per step of the family's default task."""
    task = make_task({"family": family})
    optimizer = optax.adam(1e-3)
    train_losses(task, optimizer, jax.random.key(1), num_steps)  # compile
    seconds = []
    for repeat in range(num_repeats):
        start = time.perf_counter()
        train_losses(task, optimizer, jax.random.key(2 + repeat), num_steps)
        seconds.append(time.perf_counter() - start)
    ms_per_step = 1000.0 * statistics.median(seconds) / num_steps
    return {"config": full_config({"family": family}), "ms_per_step": round(ms_per_step, 3),
            "under_budget": ms_per_step < BUDGET_MS}


def main():
    """Times every family and prints the results as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="two families, 2 steps, one repeat: checks that the benchmark runs")
    args = parser.parse_args()
    num_steps, num_repeats = (2, 1) if args.smoke else (NUM_STEPS, NUM_REPEATS)
    families = SMOKE_FAMILIES if args.smoke else tuple(FAMILIES)
    results = {family: time_family(family, num_steps, num_repeats) for family in families}
    print(json.dumps({"device": f"{jax.devices()[0].device_kind} ({platform.machine()})",
                      "smoke": args.smoke, "budget_ms": BUDGET_MS, "steps_per_scan": num_steps,
                      "families": results}, indent=2))


if __name__ == "__main__":
    main()
