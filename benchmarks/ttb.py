"""Time to beat Adam (TTB): how long self-training takes to beat per-task tuned Adam.

    python benchmarks/ttb.py [--minutes 10] [--eval-minutes 1] [--control] [--heldout]
                             [--set FIELD=VALUE ...] [--grid FAMILY.FIELD=VALUES ...]
                             [--out DIR] [--smoke]

Runs ``selfopt train`` (the default configuration plus ``--set`` overrides, dotted names as
``selfopt train --set``: ``--set outer.max_update=0.001 --set lopt.hidden=[16]``; random
initialisation, no hand-designed optimizer in the loop) for ``--minutes`` of training, with the
run's elite (its best held-in validation so far) evaluated against Adam tuned per task over 14
learning rates on the quick held-out suite every ``--eval-minutes`` (``eval.jsonl``;
evaluation time is not training time). Prints JSON: the training seconds until the elite first
*beats tuned Adam* (a lower mean normalised loss and a win on the majority of tasks; ``null``
if it never did), the best margin reached (mean normalised loss of the learned optimizer / of
tuned Adam; below 1 is better than Adam) and the margin at 10, 30 and 60 minutes where the run
got there. ``--control`` runs the Adam-meta-trained control (``outer.kind=adam``; ``--set``
changes of the self-training outer optimizer's own fields, such as ``outer.policy``, are left
out of it) with the same budget afterwards and reports it the same way; ``--heldout`` also
evaluates each run's final elite on the whole held-out suite (12 tasks).
``--grid mlp.hidden='[[32]]'`` replaces the values one field of a family draws from in
the run's task grid (``selfopt.tasks.distribution.GRIDS[tasks.grid]``; ``compact`` by
default), for this process only: a run resumed later with ``selfopt train --resume`` uses the
shipped grid. Each value is checked by building its task before anything trains.
The curves (the elite's quick-suite loss against training time, each arm, and tuned Adam's)
go to ``OUT/curve.png``.

Like ``selfopt train``, it uses the compilation cache in ``$SELFOPT_CACHE/jax``; the JSON says
how many compiled programs were there at the start. Point ``SELFOPT_CACHE`` at an empty folder
(with a copy of ``adam/`` to skip re-tuning Adam) to measure a first run on a new machine.

``--smoke``: a toy configuration (:data:`SMOKE`, under any ``--set``) for 2 outer steps (each
arm), evaluated at the start and the end on the first two tasks of the quick suite (and of the
held-out one with ``--heldout``), 10 steps and one seed, in a temporary folder unless ``--out``
is given: seconds of work, for CI (it checks the benchmark runs; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax

from selfopt.cache import enable_compilation_cache
from selfopt.cli import parse_assignment
from selfopt.config import ConfigError, make_config
from selfopt.evaluate import default_cache_dir, evaluate, suite
from selfopt.experiment import heldout_over_time_figure
from selfopt.population import AdamControl
from selfopt.tasks.distribution import GRIDS, full_config, make_task
import selfopt.train
from selfopt.run_dir import open_checkpoint, read_jsonl
from selfopt.train import candidate, time_to_beat_adam, train

MARGIN_MINUTES = (10, 30, 60)
#: ``--smoke``: a toy configuration, 2 outer steps, evaluated at the start and the end.
SMOKE = {"population": 2, "max_steps": 2, "estimator.num_pairs": 1,
         "estimator.truncation_length": 5, "estimator.min_inner_length": 10,
         "estimator.max_inner_length": 30, "tasks.families": ["quadratic"], "num_slots": 1,
         "task_steps": 3, "pbt.interval": 2, "pbt.score_steps": 5, "validate_interval": 2,
         "validate_steps": 5, "lopt.hidden": [4], "checkpoint_seconds": 1000.0,
         "eval_steps": 10, "eval_seeds": 1}
#: ``--smoke``: the first tasks of each suite that are evaluated.
SMOKE_TASKS = 2


def smoke_suites() -> None:
    """Cuts the suites the runs and this script evaluate on to their first tasks, for this
    process only (``--smoke``)."""
    full = selfopt.train.suite
    selfopt.train.suite = lambda name="heldout": full(name)[:SMOKE_TASKS]
    globals()["suite"] = selfopt.train.suite


def margins(rows: list[dict]) -> dict:
    """TTB and margins from the rows of ``eval.jsonl``."""
    margin = [r["mean_normalized"] / r["adam_mean_normalized"] for r in rows]
    best = min(range(len(rows)), key=margin.__getitem__)
    at = {}
    for minutes in MARGIN_MINUTES:
        before = [m for r, m in zip(rows, margin) if r["elapsed"] <= 60 * minutes + 1]
        if rows[-1]["elapsed"] >= 60 * minutes - 30:  # the run reached that time
            at[str(minutes)] = min(before)
    return {"time_to_beat_adam_s": time_to_beat_adam(rows),
            "best_margin": margin[best], "best_margin_at_s": rows[best]["elapsed"],
            "best_wins": max(r["wins"] for r in rows), "tasks": rows[-1]["tasks"],
            "best_margin_by_minute": at,
            "curve": [{"elapsed_s": r["elapsed"], "step": r["step"], "margin": m,
                       "wins": r["wins"], "mean_normalized": r["mean_normalized"]}
                      for r, m in zip(rows, margin)],
            "adam_mean_normalized": rows[-1]["adam_mean_normalized"]}


def run_arm(run_dir: Path, overrides: dict, heldout: bool) -> dict:
    cfg = make_config(overrides)
    started = time.monotonic()
    summary = train(cfg, run_dir)
    result = {"run_dir": str(run_dir), "outer_optimizer": summary["outer_optimizer"],
              "steps": summary["steps"], "training_s": summary["elapsed_s"],
              "wall_s": round(time.monotonic() - started, 1),
              **margins(read_jsonl(run_dir / "eval.jsonl"))}
    if heldout:
        _, state, _ = open_checkpoint(run_dir)
        full = evaluate(candidate(cfg, state)[0], suite("heldout"), cfg.eval_steps,
                        cfg.eval_seeds, cache_dir=default_cache_dir())
        result["heldout_at_end"] = full.summary()
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), file=sys.stderr)
    return result


def edit_grid(edits: list[tuple[str, object]], grid: str = "compact") -> dict[str, dict]:
    """Applies ``--grid FAMILY.FIELD=VALUES`` edits to the task grid ``GRIDS[grid]`` in place.

    Returns the edited families' grids (for the report). Raises ``ValueError`` (one line) for
    an unknown family or field, a value list that is not a non-empty JSON list, or a value its
    task refuses."""
    grids = GRIDS[grid]
    for name, values in edits:
        family, _, field = name.partition(".")
        if family not in grids or not field:
            raise ValueError(f"--grid {name}: expected FAMILY.FIELD, FAMILY one of "
                             f"{sorted(grids)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"--grid {name}: the values must be a non-empty JSON list, got "
                             f"{values!r}")
        for value in values:
            try:
                make_task(full_config({"family": family, field: value}))
            except (ValueError, TypeError) as error:
                raise ValueError(f"--grid {name}: {error}") from None
        grids[family] = {**grids[family],
                         field: tuple(tuple(v) if isinstance(v, list) else v for v in values)}
    return {family: {k: list(v) for k, v in grids[family].items()}
            for family in {name.partition(".")[0] for name, _ in edits}}


def control_overrides(overrides: dict) -> dict:
    """``overrides`` for the Adam control: ``outer.kind=adam``, without the changes of outer
    fields that only self-training has."""
    fields = {f.name for f in dataclasses.fields(AdamControl)}
    kept = {k: v for k, v in overrides.items()
            if not (k.startswith("outer.") and k.partition(".")[2] not in fields)}
    return {**kept, "outer.kind": "adam"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--eval-minutes", type=float, default=1.0)
    parser.add_argument("--control", action="store_true", help="also run the Adam control")
    parser.add_argument("--heldout", action="store_true",
                        help="evaluate the final elites on all 12 held-out tasks")
    parser.add_argument("--set", type=parse_assignment, action="append", default=[],
                        metavar="FIELD=VALUE")
    parser.add_argument("--grid", type=parse_assignment, action="append", default=[],
                        metavar="FAMILY.FIELD=VALUES",
                        help="the values a family's field draws from in the run's task grid")
    parser.add_argument("--out", type=Path,
                        help="run folder (default runs/ttb-DATE-TIME; with --smoke a "
                             "temporary one)")
    parser.add_argument("--smoke", action="store_true",
                        help="toy runs of 2 steps: checks that the benchmark runs (for CI)")
    args = parser.parse_args()
    if args.smoke:
        smoke_suites()
    overrides = {**(SMOKE if args.smoke else {}), **dict(args.set), "minutes": args.minutes,
                 "eval_minutes": args.eval_minutes}
    try:
        grids = edit_grid(args.grid, make_config(overrides).tasks.grid)
        if args.control:
            make_config(control_overrides(overrides))
    except (ValueError, ConfigError) as error:
        parser.error(str(error).splitlines()[0])
    with tempfile.TemporaryDirectory(prefix="ttb-smoke-") as tmp:
        if args.out is None:
            args.out = (Path(tmp) if args.smoke
                        else Path("runs") / f"ttb-{time.strftime('%Y%m%d-%H%M%S')}")
        report = run(args, overrides, grids)
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace, overrides: dict, grids: dict) -> dict:
    """The arms, their margins and the figure: the report."""
    cache = enable_compilation_cache()
    report = {"benchmark": "time_to_beat_adam", "smoke": args.smoke,
              "overrides": dict(args.set),
              "grid_edits": grids,
              "minutes": args.minutes, "machine": {
                  "platform": platform.platform(), "cpus": os.cpu_count(),
                  "devices": [str(d) for d in jax.devices()]},
              "compilation_cache": {"dir": str(cache) if cache else None,
                                    "programs_at_start": len(list(cache.iterdir())) if cache
                                    else 0}}
    report["self"] = run_arm(args.out / "self", overrides, args.heldout)
    arms = [("self-training", args.out / "self")]
    if args.control:
        report["control"] = run_arm(args.out / "control", control_overrides(overrides),
                                    args.heldout)
        arms.append(("control (Adam-meta-trained)", args.out / "control"))
    try:  # a figure that fails to draw must not lose the runs' report
        heldout_over_time_figure(arms).savefig(args.out / "curve.png", dpi=110)
        report["figure"] = str(args.out / "curve.png")
    except Exception as error:  # noqa: BLE001
        report["figure_error"] = f"{type(error).__name__}: {error}"
    return report


if __name__ == "__main__":
    main()
