"""Adam at one learning rate for every task, against Adam tuned per task: how much of the bar is
the per-task tuning.

    python benchmarks/adam_rates.py [--tasks quick|heldout] [--steps 300] [--seeds 3] [--smoke]

For each of Adam's 14 learning rates, the mean normalised loss over the suite when every task
uses that rate, and its margin over per-task tuned Adam (the bar of ``benchmarks/ttb.py``). A
learned optimizer is one set of weights for all tasks, so the best single rate is the
hand-designed optimizer it resembles most; below that margin it adapts to the task better than
Adam with one rate does. It also reports Adam tuned per task with a linear decay of the rate
to 0 (not the baseline: what a schedule alone is worth, which constant-rate Adam lacks). Reads
and fills the tuned-Adam cache of ``selfopt eval`` (``$SELFOPT_CACHE/adam``), so after a
``selfopt eval`` of the same suite it takes seconds (the decayed runs are cached too).
Prints JSON. ``--smoke``: the suite's first two tasks, 10 steps, one seed, for CI (it checks the
benchmark runs; the numbers mean nothing).
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from selfopt.evaluate import (ADAM_LEARNING_RATES, default_cache_dir, normalized_final, suite,
                              task_label, tune_adam)
from selfopt.tasks import make_task

#: ``--smoke``: the first tasks of the suite, and their steps.
SMOKE_TASKS, SMOKE_STEPS = 2, 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", choices=("quick", "heldout"), default="quick")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true",
                        help="two tasks, 10 steps, one seed: checks that the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.seeds = SMOKE_STEPS, 1
    if args.steps < 1 or args.seeds < 1:
        parser.error("--steps and --seeds must be at least 1")
    configs = suite(args.tasks)[:SMOKE_TASKS] if args.smoke else suite(args.tasks)

    per_task = {}  # label -> {rate: normalised final loss}
    tuned_rate = {}  # label -> the rate tuned Adam chose
    decayed = {}  # label -> (normalised loss, rate) of Adam tuned with a linear decay
    for config in configs:
        adam = tune_adam(config, args.steps, args.seeds, cache_dir=default_cache_dir())
        task, init = make_task(config), float(adam.train_losses[:, 0].mean())
        label = task_label(config)
        per_task[label] = {lr: normalized_final(task, final, init)
                           for lr, final in adam.final_by_rate.items()}
        tuned_rate[label] = adam.learning_rate
        # same seeds, so the same initial parameters and the same normaliser
        with_decay = tune_adam(config, args.steps, args.seeds, cache_dir=default_cache_dir(),
                               linear_decay=True)
        decayed[label] = (normalized_final(task, with_decay.final_by_rate[
            with_decay.learning_rate], init), with_decay.learning_rate)
    tuned = float(np.mean([rows[tuned_rate[label]] for label, rows in per_task.items()]))
    by_rate = []
    for lr in ADAM_LEARNING_RATES:
        mean = float(np.mean([rows[lr] for rows in per_task.values()]))
        by_rate.append({"learning_rate": lr, "mean_normalized": mean, "margin": mean / tuned})
    best = min(by_rate, key=lambda row: row["mean_normalized"])
    decayed_mean = float(np.mean([value for value, _ in decayed.values()]))
    linear_decay = {
        "mean_normalized": decayed_mean, "margin": decayed_mean / tuned,
        "wins": sum(value < per_task[label][tuned_rate[label]]
                    for label, (value, _) in decayed.items()),
        "by_task": {label: {"normalized": value, "constant_rate": per_task[label][
            tuned_rate[label]], "learning_rate": rate} for label, (value, rate) in decayed.items()},
    }
    print(json.dumps({"benchmark": "adam_single_rate", "smoke": args.smoke,
                      "tasks": args.tasks, "steps": args.steps,
                      "seeds": args.seeds, "tuned_mean_normalized": tuned,
                      "tuned_rate_by_task": tuned_rate, "best_single_rate": best,
                      "by_rate": by_rate, "tuned_with_linear_decay": linear_decay}, indent=1))


if __name__ == "__main__":
    main()
