"""Outer steps per second in-process and on a local Ray instance with 1 and 2 workers.

Prints one JSON object: for each setting the seconds per outer step (median over the timed
steps, after ``--warmup`` steps that compile), the steps per second, the ratio to the
in-process run of the same configuration (same ``shards``: the same numbers), and for Ray the
fraction of each step the driver spends waiting on its workers (the rest is its own work:
the update, PBT, validation, logging), from which a cluster's speed-up can be projected
(docs/scaling.md).

    python benchmarks/ray_scaling.py --steps 20

``--smoke``: a population of 2, one warm-up and one timed step, for CI (it checks the benchmark
runs; the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from selfopt.cache import enable_compilation_cache
from selfopt.config import make_config
from selfopt.train_step import in_process, initial_state, train_step


def seconds_per_step(cfg, backend, warmup: int, steps: int) -> tuple[float, float]:
    """Median seconds of an outer step, and the fraction of the timed steps' time that the
    backend spent waiting on its workers."""
    state = initial_state(cfg)
    for _ in range(warmup):
        state, _ = train_step(cfg, state, backend)
    waited = getattr(backend, "waited", 0.0)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        state, _ = train_step(cfg, state, backend)
        times.append(time.perf_counter() - started)
    return statistics.median(times), (getattr(backend, "waited", 0.0) - waited) / sum(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed outer steps per setting")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (compiling)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--smoke", action="store_true",
                        help="population 2, one step each: checks that the benchmark runs (CI)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.warmup, args.shards = 1, 1, 2
    enable_compilation_cache()
    from selfopt.ray_backend import RayBackend

    cfg = make_config({"shards": args.shards, "validate_interval": 0, "eval_minutes": 0,
                       **({"population": 2} if args.smoke else {})})
    base, _ = seconds_per_step(cfg, in_process, args.warmup, args.steps)
    out = {"benchmark": "ray_scaling", "smoke": args.smoke, "cpus": os.cpu_count(),
           "shards": args.shards, "population": cfg.population,
           "in_process": {"s_per_step": round(base, 4), "steps_per_s": round(1 / base, 2)}}
    for workers in (1, 2):
        backend = RayBackend(cfg, workers=workers)
        sec, waiting = seconds_per_step(cfg, backend, args.warmup, args.steps)
        backend.close()
        out[f"ray_{workers}_workers"] = {"s_per_step": round(sec, 4),
                                         "steps_per_s": round(1 / sec, 2),
                                         "vs_in_process": round(sec / base, 3),
                                         "driver_waiting_fraction": round(waiting, 3)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
