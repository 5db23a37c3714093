"""Time of one learned-optimizer update against one optax Adam update, on MLPs of three sizes.

    python benchmarks/lopt_step.py [--repeats 20] [--smoke]

Prints JSON: for MLPs of about 10k, 100k and 1M parameters, the median wall time of one jitted
``update`` of the MLP learned optimizer (2x32 hidden) and of ``optax.adam``, both measured in
this process on the same gradients, their ratio and the learned optimizer's FLOP rate
(``flops_per_param`` times the parameters over its time); and the FLOP rate of a plain jitted
float32 matrix product of the largest size (``n_params x 32`` times ``32 x 32``, the shape of
the MLP's hidden layer), the rate its compute-bound update could reach. ``--smoke``: one tiny
MLP and one repeat, for CI (it checks the benchmark runs; the numbers mean nothing).
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


def flops_per_param(lopt: MLPLOpt) -> int:
    """Multiply-adds of the per-parameter MLP, times 2 (the shared features are folded into
    the first layer's bias; the elementwise features add a few tens more)."""
    sizes = (lopt.num_features - lopt.num_shared_features, *lopt.hidden, 2)
    return 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def median_seconds(fn, args, repeats):
    """Median seconds of ``fn(*args)`` (jitted; compiled first)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmul_gflops(n: int, repeats: int) -> float:
    a = jax.random.normal(jax.random.key(2), (n, 32))
    b = jax.random.normal(jax.random.key(3), (32, 32))
    return 2 * n * 32 * 32 / median_seconds(jax.jit(jnp.matmul), (a, b), repeats) / 1e9


def time_update(opt, params, grads, repeats):
    """Median seconds of one jitted ``opt.update`` + ``apply_updates`` (after compiling)."""
    @jax.jit
    def step(params, state):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return median_seconds(step, (params, opt.init(params)), repeats)


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
        num_params = int(sum(x.size for x in jax.tree.leaves(params)))
        rows.append({
            "model": name,
            "num_params": num_params,
            "lopt_ms": round(lo * 1e3, 4),
            "adam_ms": round(adam * 1e3, 4),
            "ratio": round(lo / adam, 2),
            "lopt_gflops": round(flops_per_param(lopt) * num_params / lo / 1e9, 2),
        })
    matmul = matmul_gflops(rows[-1]["num_params"], repeats)
    print(json.dumps({
        "benchmark": "lopt_step",
        "smoke": args.smoke,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "jax": jax.__version__,
        "flops_per_param": flops_per_param(lopt),
        "results": rows,
        "matmul_gflops": round(matmul, 2),
        "lopt_fraction_of_matmul_rate": round(rows[-1]["lopt_gflops"] / matmul, 3),
    }, indent=2))


if __name__ == "__main__":
    main()
