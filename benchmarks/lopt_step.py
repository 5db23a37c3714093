"""Time of one learned-optimizer update against one optax Adam update, on MLPs of three sizes.

    python benchmarks/lopt_step.py [--repeats 20] [--smoke]

Prints JSON: for MLPs of about 10k, 100k and 1M parameters, the median wall time of one jitted
``update`` of the MLP learned optimizer (2x32 hidden) and of ``optax.adam``, both measured in
this process on the same gradients, and their ratio. ``--smoke``: one tiny MLP and one repeat,
for CI (it checks the benchmark runs; the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from selfopt.lopt import MLPLOpt

# Layer widths of the benchmark MLPs and their parameter counts.
SIZES = {"10k": (96, 96, 10), "100k": (784, 128, 10), "1M": (784, 1024, 256, 10)}
#: ``--smoke``: one MLP of about 100 parameters.
SMOKE_SIZES = {"100": (8, 8, 4)}


def mlp_params(widths, key):
    keys = jax.random.split(key, len(widths) - 1)
    return [{"w": jax.random.normal(k, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)}
            for k, a, b in zip(keys, widths[:-1], widths[1:])]


def time_update(opt, params, grads, repeats):
    """Median seconds of one jitted ``opt.update`` + ``apply_updates`` (after compiling)."""
    @jax.jit
    def step(params, state):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    out = step(params, state)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(params, state))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny MLP, one repeat: checks that the benchmark runs (for CI)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    sizes, repeats = (SMOKE_SIZES, 1) if args.smoke else (SIZES, args.repeats)
    lopt = MLPLOpt()
    theta = lopt.init(jax.random.key(0))
    rows = []
    for name, widths in sizes.items():
        params = mlp_params(widths, jax.random.key(1))
        grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
        lo = time_update(lopt.optimizer(theta), params, grads, repeats)
        adam = time_update(optax.adam(1e-3), params, grads, repeats)
        rows.append({
            "model": name,
            "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
            "lopt_ms": round(lo * 1e3, 4),
            "adam_ms": round(adam * 1e3, 4),
            "ratio": round(lo / adam, 2),
        })
    print(json.dumps({
        "benchmark": "lopt_step",
        "smoke": args.smoke,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "results": rows,
    }, indent=2))


if __name__ == "__main__":
    main()
