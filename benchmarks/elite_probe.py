"""Probes of a trained run's elite: why training stops improving it.

    python benchmarks/elite_probe.py heldin RUN [--tasks 12]
    python benchmarks/elite_probe.py continue RUN [--steps 200] [--every 50] [--set k=v ...]
    python benchmarks/elite_probe.py population RUN
    python benchmarks/elite_probe.py scale RUN [--factors 0.5 1 2] [--lopt k=v ...]
    python benchmarks/elite_probe.py curve RUN [--task 11] [--factors 0.5 1]
    python benchmarks/elite_probe.py updates RUN
    python benchmarks/elite_probe.py fresh RUN [RUN ...]

``heldin``: the elite against Adam tuned per task (14 rates, as ``selfopt eval``) on ``--tasks``
configurations drawn from the run's *own training distribution* (training seeds), instead of
the held-out suite. Comparing the two separates what the learned optimizer cannot do at all
from what it does not carry over to new tasks.

``continue``: every member starts from the elite (weights and outer state), then trains
``--steps`` more outer steps (PBT rounds included: whatever they copy descends from the elite)
with the run's configuration changed by ``--set`` (for example
``max_update=0.0003``, ``num_pairs=32``, ``estimator='"pes"'``, ``families='["mlp"]'``), with
no validation or evaluation in between. Every ``--every`` steps all members are scored on
*fresh* held-in problems (instance seeds and draws that validation never used, so the elite,
which validation selected, has no head start there), with the validation's horizon and loss.
If the meta-gradient pointed towards better validation, some member would improve on the
elite's starting score.

``population``: how far the last checkpoint's members are from the elite (RMS distance per
weight, against the elite's own RMS), and the quick-suite margin of the elite, of the mean of
all members' weights and of the mean of the best half on validation (a weight average).

``scale``: the elite with its whole step multiplied by each of ``--factors`` (``MLPLOpt.step_mult``)
on the quick suite, per task as a ratio to tuned Adam's loss. A task whose ratio falls at
another factor wants a different step size, which the learned optimizer did not adapt to; a
task whose ratio stays put loses for another reason than the step size. ``--lopt`` changes
fields of the learned optimizer's architecture that leave its weights' shapes alone before
scaling (for example ``ratio_step_scale=true ratio_step_knee=0.1``): what a rule would do to
weights trained without it.

``curve``: the elite's mean training loss (the evaluation's seeds and 300 steps) on one
held-out task (``--task``, an index into the held-out suite; 11 is the digits autoencoder) at
each of ``--factors``, beside tuned Adam's, at steps 0, 10, 20, 40, 60, 100, 150, 200, 250
and 299: where along the run the learned optimizer falls behind.

``updates``: the size of the elite's step, the RMS over all parameters of one update, at the
steps of ``curve``, on every quick-suite task beside tuned Adam's (its own rate; the
evaluation's seeds, averaged), and their ratio. Tuned Adam's step differs from task to task by
the rate it picked and shrinks as its moment estimates see more noise; a learned optimizer
whose step is the same on every task has learned one step size, not how to adapt it.

``fresh``: each run's elite on its validation problems and on fresh held-in problems (the
instance seeds and draws of ``continue``). Of two elites of one run, the later validated
better; if it is better on the fresh problems too, it is better on the training families
themselves, not only on the problems that selected it.

All print JSON; the run directory is only read (``continue`` trains in a temporary folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import optax

from selfopt.cli import parse_assignment
from selfopt.config import make_config
from selfopt.evaluate import (Evaluation, TaskComparison, default_cache_dir, evaluate,
                              lopt_candidate, seed_keys, suite, task_label, tune_adam,
                              update_sizes)
from selfopt.tasks import make_task
from selfopt.population.self_training import member_rms
from selfopt.train import Trainer, open_checkpoint, repeat_member

#: Instance seeds and draws of the fresh held-in problems (validation uses others).
FRESH_SEEDS = (777, 778)


def ratio_to_adam(task: TaskComparison) -> float | None:
    """The elite's normalised loss over tuned Adam's on one task (None where Adam's is 0)."""
    return task.normalized / task.adam_normalized if task.adam_normalized else None


def on_quick_suite(trainer: Trainer, lopt, theta, name: str) -> Evaluation:
    """``theta`` (with architecture ``lopt``) against tuned Adam on the quick suite, with the
    run's evaluation steps and seeds, as the run's own evaluations."""
    cfg = trainer.cfg
    return evaluate(lopt_candidate(lopt, theta, name), suite("quick"), cfg.eval_steps,
                    cfg.eval_seeds, cache_dir=default_cache_dir())


def heldin(run: Path, num_tasks: int) -> dict:
    trainer, state, _ = open_checkpoint(run)
    cfg = trainer.cfg
    configs = [trainer.comps.distribution.sample(500_000 + i) for i in range(num_tasks)]
    result = evaluate(lopt_candidate(trainer.comps.lopt, state.elite["theta"], "elite"),
                      configs, cfg.eval_steps, cfg.eval_seeds, cache_dir=default_cache_dir())
    return {**result.summary(), "elite_id": state.elite_id,
            "tasks_by_label": [{"task": t.label, "elite": t.normalized, "adam": t.adam_normalized,
                                "ratio": ratio_to_adam(t)} for t in result.tasks]}


def fresh_validation(trainer: Trainer, thetas) -> np.ndarray:
    cfg = trainer.cfg
    return np.mean([trainer.held_in_meta_loss(thetas, cfg.validate_steps,
                                              jax.random.key(seed), seed=seed,
                                              loss=cfg.score_loss)
                    for seed in FRESH_SEEDS], axis=0)


def fresh(runs: list[Path]) -> list[dict]:
    rows = []
    for run in runs:
        trainer, state, _ = open_checkpoint(run)
        thetas = repeat_member(state.elite["theta"], 2)  # a population of two: vmapped as always
        rows.append({"run": str(run), "elite_id": state.elite_id, "elite_step": state.elite_step,
                     "validation": float(trainer.validation_scores(thetas)[0]),
                     "fresh": float(fresh_validation(trainer, thetas)[0])})
    return rows


def continue_from_elite(run: Path, steps: int, every: int, changes: dict) -> dict:
    original, state, _ = open_checkpoint(run)
    cfg = make_config({**original.cfg.to_json(), **changes, "validate_interval": 0,
                       "eval_minutes": 0})
    trainer = Trainer(cfg, Path(tempfile.mkdtemp(prefix="elite-probe-")))
    state.thetas = repeat_member(state.elite["theta"], cfg.population)
    state.outer_state = repeat_member(state.elite["outer_state"], cfg.population)
    slots = [trainer.fresh_slot(s, state.step, state.thetas) for s in range(cfg.num_slots)]
    state.slot_configs, state.slot_inner = [c for c, _ in slots], [x for _, x in slots]
    # scored by the original run's trainer: the same problems whatever the changes
    start = float(fresh_validation(original, state.thetas)[0])
    curve, started = [], time.monotonic()
    for i in range(1, steps + 1):
        trainer.one_step(state)
        if i % every == 0 or i == steps:
            scores = fresh_validation(original, state.thetas)
            curve.append({"step": i, "seconds": round(time.monotonic() - started, 1),
                          "best": float(scores.min()), "median": float(np.median(scores))})
            print(json.dumps(curve[-1]), flush=True)
    return {"run": str(run), "elite_id": state.elite_id, "changes": changes, "start": start,
            "best": min(c["best"] for c in curve), "end_median": curve[-1]["median"],
            "improved": min(c["best"] for c in curve) < start, "curve": curve}


def population(run: Path) -> dict:
    trainer, state, _ = open_checkpoint(run)
    cfg = trainer.cfg
    elite = state.elite["theta"]
    distance = member_rms(jax.tree.map(lambda x, e: x - e, state.thetas, elite))
    scores = trainer.validation_scores(state.thetas)
    best_half = np.argsort(scores)[:max(1, cfg.population // 2)]
    candidates = {"elite": elite,
                  "mean of all members": jax.tree.map(lambda x: x.mean(0), state.thetas),
                  "mean of the best half": jax.tree.map(lambda x: x[best_half].mean(0),
                                                        state.thetas)}
    margins = {name: on_quick_suite(trainer, trainer.comps.lopt, theta, name).summary()["margin"]
               for name, theta in candidates.items()}
    return {"run": str(run), "step": state.step, "elite_id": state.elite_id,
            "elite_rms": float(member_rms(repeat_member(elite, 1))[0]),
            "distance_to_elite_rms": [float(d) for d in distance],
            "validation": [float(x) for x in scores], "quick_margin": margins}


def scaled(lopt, factor: float):
    """``lopt`` with its whole step multiplied by ``factor`` (``MLPLOpt.step_mult``)."""
    return dataclasses.replace(lopt, step_mult=lopt.step_mult * factor)


class LoptChangeError(ValueError):
    """``--lopt`` changes that the elite's learned optimizer cannot take."""


def scale(run: Path, factors: list[float], changes: dict | None = None) -> dict:
    trainer, state, _ = open_checkpoint(run)
    try:
        lopt = dataclasses.replace(trainer.comps.lopt, **(changes or {}))
    except (TypeError, ValueError) as err:  # an unknown field, a bad value
        raise LoptChangeError(str(err)) from None
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    if shapes(jax.eval_shape(lopt.init, jax.random.key(0))) != shapes(state.elite["theta"]):
        raise LoptChangeError(f"{changes} changes the shapes of the learned optimizer's "
                              f"weights; the elite's cannot be read by it")
    by_factor = {}
    for factor in factors:
        result = on_quick_suite(trainer, scaled(lopt, factor), state.elite["theta"],
                                f"elite x{factor:g}")
        summary = result.summary()
        by_factor[f"{factor:g}"] = {
            "margin": summary["margin"], "wins": summary["wins"],
            "ratio_by_task": {t.label: ratio_to_adam(t) for t in result.tasks}}
        print(json.dumps({"factor": factor, "margin": summary["margin"]}), file=sys.stderr,
              flush=True)
    return {"run": str(run), "elite_id": state.elite_id, "lopt_changes": changes or {},
            "by_factor": by_factor}


CURVE_STEPS = (0, 10, 20, 40, 60, 100, 150, 200, 250, 299)


def curve(run: Path, task_index: int, factors: list[float], num_steps: int = 300,
          num_seeds: int = 3) -> dict:
    trainer, state, _ = open_checkpoint(run)
    config = suite("heldout")[task_index]
    task, keys = make_task(config), jax.numpy.stack(seed_keys(config, num_seeds))
    adam = tune_adam(config, num_steps, num_seeds, cache_dir=default_cache_dir())
    steps = [t for t in CURVE_STEPS if t < num_steps]
    at = lambda losses: [float(losses[t]) for t in steps]
    by_factor = {}
    for factor in factors:
        candidate = lopt_candidate(scaled(trainer.comps.lopt, factor), state.elite["theta"])
        losses, _ = candidate.runs(task, keys, num_steps)
        by_factor[f"{factor:g}"] = at(np.asarray(losses).mean(axis=0))
    return {"run": str(run), "elite_id": state.elite_id, "task": config, "steps": steps,
            "adam": {"learning_rate": adam.learning_rate,
                     "loss": at(np.asarray(adam.train_losses).mean(axis=0))},
            "elite_by_factor": by_factor}


def updates(run: Path, num_steps: int = 300, num_seeds: int = 3) -> dict:
    trainer, state, _ = open_checkpoint(run)
    lopt_optimizer = trainer.comps.lopt.optimizer(state.elite["theta"], num_steps)
    steps = [t for t in CURVE_STEPS if t < num_steps]
    by_task = {}
    for config in suite("quick"):
        task, keys = make_task(config), seed_keys(config, num_seeds)
        rate = tune_adam(config, num_steps, num_seeds, cache_dir=default_cache_dir()).learning_rate
        sizes = {name: np.mean([np.asarray(update_sizes(task, opt, k, num_steps)) for k in keys],
                               axis=0)
                 for name, opt in (("elite", lopt_optimizer), ("adam", optax.adam(rate)))}
        by_task[task_label(config)] = {
            "adam_learning_rate": rate,
            "elite": [float(sizes["elite"][t]) for t in steps],
            "adam": [float(sizes["adam"][t]) for t in steps],
            "elite_over_adam": [float(sizes["elite"][t] / sizes["adam"][t]) for t in steps]}
        print(json.dumps({"task": task_label(config)}), file=sys.stderr, flush=True)
    return {"run": str(run), "elite_id": state.elite_id, "steps": steps, "by_task": by_task}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("heldin", help="the elite against tuned Adam on training-distribution tasks")
    p.add_argument("run", type=Path)
    p.add_argument("--tasks", type=int, default=12)
    p = sub.add_parser("continue", help="train on from the elite; score on fresh problems")
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--set", type=parse_assignment, action="append", default=[])
    p = sub.add_parser("population", help="members' distance to the elite; weight averages")
    p.add_argument("run", type=Path)
    p = sub.add_parser("scale", help="the elite with its step scaled, per task")
    p.add_argument("run", type=Path)
    p.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--lopt", type=parse_assignment, nargs="+", default=[],
                   help="MLPLOpt fields to change first, FIELD=VALUE (value as JSON)")
    p = sub.add_parser("curve", help="the elite's loss curve on one held-out task, and Adam's")
    p.add_argument("run", type=Path)
    p.add_argument("--task", type=int, default=11, help="index into the held-out suite (0-11)")
    p.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0])
    p = sub.add_parser("updates", help="the elite's step size against tuned Adam's, per task")
    p.add_argument("run", type=Path)
    p = sub.add_parser("fresh", help="elites on their validation problems and on fresh ones")
    p.add_argument("runs", type=Path, nargs="+")
    args = parser.parse_args()
    if args.probe in ("scale", "curve") and not all(f > 0 for f in args.factors):
        parser.error("--factors must be positive")
    if args.probe == "curve" and not 0 <= args.task < len(suite("heldout")):
        parser.error(f"--task must be in [0, {len(suite('heldout')) - 1}]")
    if args.probe == "heldin":
        print(json.dumps(heldin(args.run, args.tasks), indent=1))
    elif args.probe == "population":
        print(json.dumps(population(args.run), indent=1))
    elif args.probe == "scale":
        try:
            result = scale(args.run, args.factors, dict(args.lopt))
        except LoptChangeError as err:
            parser.error(f"--lopt: {err}")
        print(json.dumps(result, indent=1))
    elif args.probe == "curve":
        print(json.dumps(curve(args.run, args.task, args.factors), indent=1))
    elif args.probe == "updates":
        print(json.dumps(updates(args.run), indent=1))
    elif args.probe == "fresh":
        print(json.dumps(fresh(args.runs), indent=1))
    else:
        print(json.dumps(continue_from_elite(args.run, args.steps, args.every, dict(args.set)),
                         indent=1))


if __name__ == "__main__":
    main()
