"""Probes of a trained run's elite: why training stops improving it.

    python benchmarks/elite_probe.py heldin RUN [--tasks 12]
    python benchmarks/elite_probe.py continue RUN [--steps 200] [--every 50] [--set k=v ...]
    python benchmarks/elite_probe.py population RUN
    python benchmarks/elite_probe.py scale RUN [--factors 0.5 1 2] [--lopt k=v ...]
    python benchmarks/elite_probe.py curve RUN [--task 11] [--factors 0.5 1]
    python benchmarks/elite_probe.py updates RUN
    python benchmarks/elite_probe.py all RUN
    python benchmarks/elite_probe.py PROBE [RUN] --smoke

``heldin``: the elite against Adam tuned per task (14 rates, as ``selfopt eval``) on ``--tasks``
configurations drawn from the run's *own training distribution* (training seeds), instead of
the held-out suite. Comparing the two separates what the learned optimizer cannot do at all
from what it does not carry over to new tasks.

``continue``: every member starts from the elite (weights and outer state), then trains
``--steps`` more outer steps (PBT rounds included: whatever they copy descends from the elite)
with the run's configuration changed by ``--set`` (dotted names, as ``selfopt train --set``;
for example ``outer.max_update=0.0003``, ``estimator.num_pairs=32``, ``estimator.kind=pes``,
``tasks.families='["mlp"]'``), with no validation or evaluation in between. Every ``--every``
steps all members are scored as validation scores them (the original run's held-in problems,
``validate_steps`` steps, ``pbt.score_loss``; the same problems whatever the changes). The
elite was selected on these problems, so it starts with an advantage there: a member that
beats its starting score improved on the problems that picked it. If the meta-gradient pointed
towards better validation, some member would.

``population``: how far the last checkpoint's members are from the elite (RMS distance per
weight, against the elite's own RMS), their validation scores, and the quick-suite margin of
the elite, of the mean of all members' weights and of the mean of the best half on validation
(a weight average).

``scale``: the elite with its whole step multiplied by each of ``--factors`` (``MLPLOpt.step_mult``)
on the quick suite, per task as a ratio to tuned Adam's loss. A task whose ratio falls at
another factor wants a different step size, which the learned optimizer did not adapt to; a
task whose ratio stays put loses for another reason than the step size. ``--lopt`` changes
fields of the learned optimizer's architecture that leave its weights' shapes alone before
scaling (for example ``width_base=0 depth_power=0``): what a rule would do to weights trained
with another.

``curve``: the elite's mean training loss (the evaluation's seeds and 300 steps) on one
held-out task (``--task``, an index into the held-out suite; 11 is the digits autoencoder) at
each of ``--factors``, beside tuned Adam's, at steps 0, 10, 20, 40, 60, 100, 150, 200, 250
and 299: where along the run the learned optimizer falls behind.

``updates``: the size of the elite's step, the RMS over all parameters of one update, at the
steps of ``curve``, on every quick-suite task beside tuned Adam's (its own rate; the
evaluation's seeds, averaged), and their ratio. Tuned Adam's step differs from task to task by
the rate it picked and shrinks as its moment estimates see more noise; a learned optimizer
whose step is the same on every task has learned one step size, not how to adapt it.

``all``: every probe above in turn, with its defaults; one JSON object keyed by probe.

``--smoke`` (any probe): toy sizes (the quick suite's first task, 10 steps, one seed; 2 more
outer steps for ``continue``; one task for ``heldin``), for CI: it checks the probes still run,
and their numbers mean nothing. Without RUN it first trains a tiny run of its own in a
temporary folder (:data:`SMOKE_RUN`).

All print JSON on stdout (progress goes to stderr); the run directory is only read
(``continue`` trains in a temporary folder).
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
from selfopt.config import SECTIONS, ConfigError, make_config
from selfopt.evaluate import (Evaluation, TaskComparison, default_cache_dir, evaluate,
                              lopt_candidate, seed_keys, suite, task_label, tune_adam,
                              update_sizes)
from selfopt.tasks import make_task
from selfopt.population.self_training import member_rms
from selfopt.population import slots
from selfopt.run_dir import open_checkpoint
from selfopt.train import train
from selfopt.train_step import held_in_scores, train_step

#: ``--smoke`` without RUN: the tiny run the probes are tried on (a few seconds of training).
SMOKE_RUN = {"population": 4, "max_steps": 2, "estimator.num_pairs": 1,
             "estimator.truncation_length": 5, "estimator.min_inner_length": 10,
             "estimator.max_inner_length": 30, "tasks.families": ["quadratic"], "num_slots": 1,
             "task_steps": 3, "pbt.interval": 2, "pbt.score_steps": 5, "validate_interval": 1,
             "validate_steps": 5, "lopt.hidden": [8], "checkpoint_seconds": 1000.0,
             "eval_minutes": 0, "eval_steps": 10, "eval_seeds": 1}


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much the probes measure.

    Attributes:
      eval_steps, eval_seeds: of every comparison with tuned Adam (None: the run's).
      curve_steps, curve_seeds: of ``curve`` and ``updates``.
      quick_tasks: the quick suite's first tasks that are used (None: all).
      heldin_tasks, continue_steps, continue_every: the defaults of those probes' flags.
    """

    eval_steps: int | None = None
    eval_seeds: int | None = None
    curve_steps: int = 300
    curve_seeds: int = 3
    quick_tasks: int | None = None
    heldin_tasks: int = 12
    continue_steps: int = 200
    continue_every: int = 50

    def quick_suite(self) -> list[dict]:
        return suite("quick")[:self.quick_tasks]

    def evaluation(self, cfg) -> tuple[int, int]:
        """Steps and seeds of a comparison with tuned Adam for a run of configuration ``cfg``."""
        return self.eval_steps or cfg.eval_steps, self.eval_seeds or cfg.eval_seeds


FULL = Budget()
SMOKE = Budget(eval_steps=10, eval_seeds=1, curve_steps=10, curve_seeds=1, quick_tasks=1,
               heldin_tasks=1, continue_steps=2, continue_every=1)


def ratio_to_adam(task: TaskComparison) -> float | None:
    """The elite's normalised loss over tuned Adam's on one task (None where Adam's is 0)."""
    return task.normalized / task.adam_normalized if task.adam_normalized else None


def progress(row: dict) -> None:
    print(json.dumps(row), file=sys.stderr, flush=True)


def on_quick_suite(cfg, lopt, theta, name: str, budget: Budget) -> Evaluation:
    """``theta`` (with architecture ``lopt``) against tuned Adam on the quick suite, with the
    run's evaluation steps and seeds, as the run's own evaluations."""
    return evaluate(lopt_candidate(lopt, theta, name), budget.quick_suite(),
                    *budget.evaluation(cfg), cache_dir=default_cache_dir())


def repeat_member(value, num: int):
    """A population pytree of ``num`` copies of one member's pytree ``value``."""
    return jax.tree.map(lambda x: jax.numpy.broadcast_to(x, (num, *jax.numpy.shape(x))), value)


def heldin(run: Path, num_tasks: int, budget: Budget = FULL) -> dict:
    cfg, state, _ = open_checkpoint(run)
    configs = [cfg.tasks.sample(500_000 + i) for i in range(num_tasks)]
    result = evaluate(lopt_candidate(cfg.lopt, state.elite.theta, "elite"), configs,
                      *budget.evaluation(cfg), cache_dir=default_cache_dir())
    return {**result.summary(), "elite_id": state.elite.id,
            "tasks_by_label": [{"task": t.label, "elite": t.normalized, "adam": t.adam_normalized,
                                "ratio": ratio_to_adam(t)} for t in result.tasks]}


def changed_config(stored: dict, changes: dict):
    """The configuration ``stored`` (nested JSON) with dotted ``changes``. A change of a
    section's ``kind`` drops the stored fields that the new kind does not have (the control's
    ``learning_rate`` when switching back to self-training, say)."""
    stored = {k: dict(v) if isinstance(v, dict) else v for k, v in stored.items()}
    for name, value in changes.items():
        section, _, field = name.partition(".")
        if field == "kind" and section in SECTIONS and isinstance(stored.get(section), dict):
            kinds = {cls.kind: cls for cls in SECTIONS[section]}
            if value in kinds:
                keep = {f.name for f in dataclasses.fields(kinds[value])}
                stored[section] = {k: v for k, v in stored[section].items() if k in keep}
    return make_config({**stored, **changes})


def continue_from_elite(run: Path, steps: int, every: int, changes: dict) -> dict:
    original, state, _ = open_checkpoint(run)
    cfg = changed_config(original.to_json(),
                         {**changes, "validate_interval": 0, "eval_minutes": 0})
    thetas = repeat_member(state.elite.theta, cfg.population)
    configs = tuple(slots.slot_config(cfg, s, state.step) for s in range(cfg.num_slots))
    state = state.replace(
        thetas=thetas, outer_state=(repeat_member(state.elite.outer_state, cfg.population)
                                    if type(cfg.outer) is type(original.outer)
                                    else cfg.outer.init(cfg.lopt, thetas)),
        slot_configs=configs, slot_problems=tuple(
            slots.fresh_problems(cfg, c, s, state.step, thetas) for s, c in enumerate(configs)))
    # scored by the original run's validation: the same problems whatever the changes
    start = float(held_in_scores(original, state.thetas)[0])
    curve, started = [], time.monotonic()
    for i in range(1, steps + 1):
        state, _ = train_step(cfg, state)
        if i % every == 0 or i == steps:
            scores = held_in_scores(original, state.thetas)
            curve.append({"step": i, "seconds": round(time.monotonic() - started, 1),
                          "best": float(scores.min()), "median": float(np.median(scores))})
            progress(curve[-1])
    return {"run": str(run), "elite_id": state.elite.id, "changes": changes, "start": start,
            "best": min(c["best"] for c in curve), "end_median": curve[-1]["median"],
            "improved": min(c["best"] for c in curve) < start, "curve": curve}


def population(run: Path, budget: Budget = FULL) -> dict:
    cfg, state, _ = open_checkpoint(run)
    elite = state.elite.theta
    distance = member_rms(jax.tree.map(lambda x, e: x - e, state.thetas, elite))
    scores = held_in_scores(cfg, state.thetas)
    best_half = np.argsort(scores)[:max(1, cfg.population // 2)]
    candidates = {"elite": elite,
                  "mean of all members": jax.tree.map(lambda x: x.mean(0), state.thetas),
                  "mean of the best half": jax.tree.map(lambda x: x[best_half].mean(0),
                                                        state.thetas)}
    margins = {name: on_quick_suite(cfg, cfg.lopt, theta, name, budget).summary()["margin"]
               for name, theta in candidates.items()}
    return {"run": str(run), "step": state.step, "elite_id": state.elite.id,
            "elite_rms": float(member_rms(repeat_member(elite, 1))[0]),
            "distance_to_elite_rms": [float(d) for d in distance],
            "validation": [float(x) for x in scores], "quick_margin": margins}


def scaled(lopt, factor: float):
    """``lopt`` with its whole step multiplied by ``factor`` (``MLPLOpt.step_mult``)."""
    return dataclasses.replace(lopt, step_mult=lopt.step_mult * factor)


class LoptChangeError(ValueError):
    """``--lopt`` changes that the elite's learned optimizer cannot take."""


def scale(run: Path, factors: list[float], changes: dict | None = None,
          budget: Budget = FULL) -> dict:
    cfg, state, _ = open_checkpoint(run)
    try:
        lopt = dataclasses.replace(cfg.lopt, **(changes or {}))
    except (TypeError, ValueError) as err:  # an unknown field, a bad value
        raise LoptChangeError(str(err)) from None
    shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
    if shapes(jax.eval_shape(lopt.init, jax.random.key(0))) != shapes(state.elite.theta):
        raise LoptChangeError(f"{changes} changes the shapes of the learned optimizer's "
                              f"weights; the elite's cannot be read by it")
    by_factor = {}
    for factor in factors:
        result = on_quick_suite(cfg, scaled(lopt, factor), state.elite.theta,
                                f"elite x{factor:g}", budget)
        summary = result.summary()
        by_factor[f"{factor:g}"] = {
            "margin": summary["margin"], "wins": summary["wins"],
            "ratio_by_task": {t.label: ratio_to_adam(t) for t in result.tasks}}
        progress({"factor": factor, "margin": summary["margin"]})
    return {"run": str(run), "elite_id": state.elite.id, "lopt_changes": changes or {},
            "by_factor": by_factor}


CURVE_STEPS = (0, 10, 20, 40, 60, 100, 150, 200, 250, 299)


def curve_steps(num_steps: int) -> list[int]:
    """The steps of :data:`CURVE_STEPS` within a run of ``num_steps`` (and its last)."""
    return sorted({t for t in CURVE_STEPS if t < num_steps} | {num_steps - 1})


def curve(run: Path, task_index: int, factors: list[float], budget: Budget = FULL) -> dict:
    cfg, state, _ = open_checkpoint(run)
    num_steps, num_seeds = budget.curve_steps, budget.curve_seeds
    config = suite("heldout")[task_index]
    task, keys = make_task(config), jax.numpy.stack(seed_keys(config, num_seeds))
    adam = tune_adam(config, num_steps, num_seeds, cache_dir=default_cache_dir())
    steps = curve_steps(num_steps)
    at = lambda losses: [float(losses[t]) for t in steps]
    by_factor = {}
    for factor in factors:
        candidate = lopt_candidate(scaled(cfg.lopt, factor), state.elite.theta)
        losses, _ = candidate.runs(task, keys, num_steps)
        by_factor[f"{factor:g}"] = at(np.asarray(losses).mean(axis=0))
    return {"run": str(run), "elite_id": state.elite.id, "task": config, "steps": steps,
            "adam": {"learning_rate": adam.learning_rate,
                     "loss": at(np.asarray(adam.train_losses).mean(axis=0))},
            "elite_by_factor": by_factor}


def updates(run: Path, budget: Budget = FULL) -> dict:
    cfg, state, _ = open_checkpoint(run)
    num_steps, num_seeds = budget.curve_steps, budget.curve_seeds
    lopt_optimizer = cfg.lopt.optimizer(state.elite.theta)
    steps = curve_steps(num_steps)
    by_task = {}
    for config in budget.quick_suite():
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
        progress({"task": task_label(config)})
    return {"run": str(run), "elite_id": state.elite.id, "steps": steps, "by_task": by_task}


PROBES = ("heldin", "continue", "population", "scale", "curve", "updates")


def run_probe(name: str, args: argparse.Namespace, budget: Budget) -> dict:
    """Probe ``name`` on ``args.run`` with the flags in ``args`` (their defaults for ``all``)."""
    def get(flag, default):
        value = getattr(args, flag, None)  # absent for ``all``; None where not given
        return default if value is None else value

    if name == "heldin":
        return heldin(args.run, get("tasks", budget.heldin_tasks), budget)
    if name == "continue":
        return continue_from_elite(args.run, get("steps", budget.continue_steps),
                                   get("every", budget.continue_every), dict(get("set", [])))
    if name == "population":
        return population(args.run, budget)
    if name == "scale":
        return scale(args.run, get("factors", [0.5, 1.0, 2.0]), dict(get("lopt", [])), budget)
    if name == "curve":
        default_task = 0 if budget is SMOKE else 11  # 0: a quadratic, compiled in a second
        return curve(args.run, get("task", default_task), get("factors", [0.5, 1.0]), budget)
    if name == "updates":
        return updates(args.run, budget)
    raise ValueError(f"unknown probe {name!r}")


def train_smoke_run(run_dir: Path) -> Path:
    """A tiny run with an elite and a checkpoint (:data:`SMOKE_RUN`), for ``--smoke``."""
    summary = train(make_config(SMOKE_RUN), run_dir)
    progress({"smoke_run": str(run_dir), "steps": summary["steps"]})
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", dest="smoke_first",
                        help="toy sizes: checks that the probe runs (for CI)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("run", type=Path, nargs="?",
                        help="a run directory (optional with --smoke: a tiny one is trained)")
    common.add_argument("--smoke", action="store_true",
                        help="toy sizes: checks that the probe runs (for CI)")
    sub = parser.add_subparsers(dest="probe", required=True)
    add = lambda name, help: sub.add_parser(name, help=help, parents=[common])
    p = add("heldin", "the elite against tuned Adam on training-distribution tasks")
    p.add_argument("--tasks", type=int, help="tasks drawn (default 12)")
    p = add("continue", "train on from the elite; score as validation does")
    p.add_argument("--steps", type=int, help="outer steps (default 200)")
    p.add_argument("--every", type=int, help="outer steps between scores (default 50)")
    p.add_argument("--set", type=parse_assignment, action="append",
                   metavar="FIELD=VALUE", help="configuration changes (dotted names)")
    add("population", "members' distance to the elite; weight averages")
    p = add("scale", "the elite with its step scaled, per task")
    p.add_argument("--factors", type=float, nargs="+", help="default 0.5 1 2")
    p.add_argument("--lopt", type=parse_assignment, nargs="+",
                   help="MLPLOpt fields to change first, FIELD=VALUE (value as JSON)")
    p = add("curve", "the elite's loss curve on one held-out task, and Adam's")
    p.add_argument("--task", type=int, help="index into the held-out suite (0-11; default 11)")
    p.add_argument("--factors", type=float, nargs="+", help="default 0.5 1")
    add("updates", "the elite's step size against tuned Adam's, per task")
    add("all", "every probe in turn, with its defaults")
    args = parser.parse_args()
    args.smoke = args.smoke or args.smoke_first  # before or after the probe's name
    if args.run is None and not args.smoke:
        parser.error("RUN is required (or --smoke, which trains a tiny run of its own)")
    if getattr(args, "factors", None) and not all(f > 0 for f in args.factors):
        parser.error("--factors must be positive")
    if getattr(args, "task", None) is not None and not 0 <= args.task < len(suite("heldout")):
        parser.error(f"--task must be in [0, {len(suite('heldout')) - 1}]")
    for flag in ("tasks", "steps", "every"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    budget = SMOKE if args.smoke else FULL
    with tempfile.TemporaryDirectory(prefix="elite-probe-smoke-") as tmp:
        if args.run is None:
            args.run = train_smoke_run(Path(tmp) / "run")
        try:
            if args.probe == "all":
                result = {name: run_probe(name, args, budget) for name in PROBES}
            else:
                result = run_probe(args.probe, args, budget)
        except LoptChangeError as err:
            parser.error(f"--lopt: {err}")
        except ConfigError as err:  # raised before anything trains
            parser.error(f"--set: {err}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
